"""Experiment 5 (paper §4.3): entity description, scored by ROUGE-L against a reference description.

Entities and references are built offline from the data the project ships:

- **corpus** entities: WikiText article titles (titles with `<unk>` dropped, a trailing parenthetical
  such as "(Slayer song)" removed) whose first kept sentence says what the title is ("X is/was …"); the
  reference is that sentence's predicate; a cross-model run takes them only from the test documents of
  its maps' split seed (`next_token.check_held_out` first refuses maps whose split is unknown);
- **LRE** entities: subjects of the relations, the reference written from the relation's data: the
  domain name, the template's words and the object ("landmark is in the country of France").

Source: the entity in the neutral context `common.SOURCE_CONTEXT`, its last token's state at ℓ.
Target: the paper's few-shot description prompt (`presets["description"]`), patched at ℓ* = ℓ (same
model) or through the registry's map of each (ℓ, ℓ*) pair (cross-model), greedy, `max_new_tokens`.
The description is the continuation up to its first comma or line end (the prompt's own separator).

Beside the Patchscope: the no-patch control (the prompt with `x`, nothing patched), the mean-state
control per ℓ* (the *target's* mean state at ℓ* over `layer_stats.WARMUP_TEXT` patched at `x`: what the
prompt and the layer say about no entity in particular), the text-only baseline (the entity's name
written in the prompt, nothing patched) and the shares of descriptions equal to either control.
Popular vs rare, by a stated proxy (no page views offline): the source model's mean
surprisal per token of the name in the source context (`name_surprisal`); an entity is *popular* when it
is below the median of the entities evaluated, so the split is about even by construction. A token-count
rule left one popular entity of 22, and corpus or LRE mention counts are zero for almost all of them.
ROUGE-L is the F-measure of `common.rouge_l`, with a bootstrap interval over entities.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from patchscope.engine.generation import PatchedRow, RowPatch
from patchscope.engine.hooks import extract
from patchscope.engine.models import LoadedModel
from patchscope.engine.presets import get_preset
from patchscope.engine.template import tokenize_prompt
from patchscope.eval.common import (
    SOURCE_CONTEXT,
    Progress,
    Relation,
    bootstrap_ci,
    layer_grid,
    mean_state_texts,
    no_progress,
    patched_texts,
    proportion,
    pyplot,
    rouge_l,
    save_figure,
    subsample,
    unpatched_texts,
)
from patchscope.eval.next_token import check_held_out
from patchscope.mapping.corpus import Document, detokenise, read_documents, split_documents

POPULARITY_PROXY = "source-model mean surprisal per name token (nats) in the source context, below the median"
_COPULA = re.compile(r"\b(?:is|was|are|were)\b\s+(.*)$")


@dataclass(frozen=True)
class Entity:
    """One entity: its name, a reference description, and where both came from."""

    name: str
    reference: str
    origin: str  # "corpus" or an LRE relation name


def corpus_entities(documents: Iterable[Document]) -> list[Entity]:
    """Article titles with the predicate of their first sentence that says what the title is.

    Cross-model runs pass only the maps' held-out documents: a map fitted on an entity's lead sentence has
    seen its reference, so its description would measure memory, not the state.
    """
    out = []
    for document in documents:
        if "<unk>" in document.title:
            continue
        name = re.sub(r"\s*\([^)]*\)\s*$", "", detokenise(document.title)).strip()
        head = name.split()[0].lower() if name.split() else ""
        for paragraph in document.paragraphs[:1]:
            sentence = re.split(r"(?<=[.!?])\s+", paragraph)[0]
            match = _COPULA.search(sentence)
            if head and head in sentence.lower()[: len(sentence) // 2 + len(head)] and match:
                out.append(Entity(name, match.group(1).rstrip("."), "corpus"))
    return out


def held_out_documents(mapping_set, corpus: Path, seed: int) -> list[Document]:
    """The corpus documents none of `mapping_set`'s maps was fitted on: the test part of their split.

    Raises `FittedOnEvaluation` (before any model runs) when a map fitted on this corpus recorded no split
    seed or another one, as the cross-model next-token eval does.
    """
    check_held_out(mapping_set, corpus, seed)
    return list(split_documents(read_documents(corpus), seed=seed).test)


def lre_entities(relations: Sequence[Relation], per_relation: int, seed: int) -> list[Entity]:
    """Subjects of each relation, described by the relation's own data (domain, template, object)."""
    out = []
    for relation in relations:
        domain = relation.domain_name or "entity"
        for sample in subsample(relation.samples, per_relation, seed):
            reference = f"{relation.template.format(domain).strip()} {sample.object}"
            out.append(Entity(sample.subject, reference, relation.name))
    return out


@torch.inference_mode()
def name_surprisal(model: LoadedModel, names: Sequence[str]) -> list[float]:
    """Mean −ln p of each name's tokens after the source context's prefix: low for names the model knows.

    A model's surprise at a name follows how often pretraining showed it, which is what the paper's page
    views stand for; it is read from the source model, the one whose state is described.
    """
    prefix, _ = SOURCE_CONTEXT.split("{}")
    lead = tokenize_prompt(model.tokenizer, prefix.rstrip())
    out = []
    for name in names:
        tail = model.tokenizer(" " + name, add_special_tokens=False).input_ids
        ids = torch.tensor([lead + tail], device=model.device)
        logprobs = torch.log_softmax(model.model(ids, use_cache=False).logits[0].float(), dim=-1)
        picked = logprobs[len(lead) - 1 : -1].gather(1, ids[0, len(lead) :, None])
        out.append(float(-picked.mean()))
    return out


def popular_by_median(surprisals: Sequence[float]) -> list[bool]:
    """Popular: surprisal strictly below the median (ties at the median count as rare)."""
    if not surprisals:
        return []
    median = statistics.median(surprisals)
    return [s < median for s in surprisals]


def description_of(text: str) -> str:
    """The description a continuation gives: after a leading colon, up to the first comma or line end."""
    text = text.split("\n", 1)[0].lstrip(" :")
    return text.split(",", 1)[0].strip()


def _score(descriptions: Sequence[str], entities: Sequence[Entity], seed: int) -> dict:
    scores = [rouge_l(d, e.reference) for d, e in zip(descriptions, entities, strict=True)]
    mean = sum(scores) / len(scores) if scores else 0.0
    return {
        "rouge_l": mean,
        "ci": list(bootstrap_ci(scores, seed=seed)),
        "n": len(scores),
        "per_item": scores,
    }


def summarise(
    entities: Sequence[Entity],
    popular: Sequence[bool],
    pairs: Sequence[tuple[int, int]],
    pair_descriptions: Sequence[Sequence[str]],
    text_descriptions: Sequence[str],
    control_description: str,
    seed: int,
    mean_state_descriptions: Mapping[int, str] | None = None,
) -> dict:
    """Every group's ROUGE-L from the descriptions alone, so a saved result can be rescored (`rescore`).

    `mean_state_descriptions` (per target layer ℓ*) scores each pair's mean-state control at its ℓ*.
    """

    def split(values: Sequence[str], keep) -> tuple[list[str], list[Entity]]:
        chosen = [k for k in range(len(entities)) if keep(k)]
        return [values[k] for k in chosen], [entities[k] for k in chosen]

    groups = {
        "all": lambda k: True,
        "popular": lambda k: popular[k],
        "rare": lambda k: not popular[k],
        "corpus": lambda k: entities[k].origin == "corpus",
        "lre": lambda k: entities[k].origin != "corpus",
    }
    pairs_out = []
    for (a, b), descriptions in zip(pairs, pair_descriptions, strict=True):
        same_share = sum(d.lower() == control_description.lower() for d in descriptions)
        entry = {
            "source_layer": a,
            "target_layer": b,
            **{name: _score(*split(descriptions, keep), seed) for name, keep in groups.items()},
            "same_as_unpatched": proportion(same_share, len(entities)),
        }
        if mean_state_descriptions is not None:
            mean = mean_state_descriptions[b]
            entry["mean_state_description"] = mean
            entry["mean_state_control"] = {
                name: _score(*split([mean] * len(entities), keep), seed) for name, keep in groups.items()
            }
            entry["same_as_mean_state"] = proportion(
                sum(d.lower() == mean.lower() for d in descriptions), len(entities)
            )
        pairs_out.append({**entry, "descriptions": list(descriptions)})
    controls = [control_description] * len(entities)
    return {
        "counts": {name: sum(1 for k in range(len(entities)) if keep(k)) for name, keep in groups.items()},
        "text_only_descriptions": list(text_descriptions),
        "text_only": {name: _score(*split(text_descriptions, keep), seed) for name, keep in groups.items()},
        "no_patch_control": {name: _score(*split(controls, keep), seed) for name, keep in groups.items()},
        "pairs": pairs_out,
    }


def rescore(result: dict, source: LoadedModel) -> dict:
    """A saved result with its popular/rare split redone by `name_surprisal` from its stored descriptions.

    Generation is greedy, so the stored descriptions are what a rerun would produce; only the grouping
    changes, and the result records that it was rescored.
    """
    if result["source"] != source.id:
        raise ValueError(f"the result's source is {result['source']}, not {source.id}")
    entities = [Entity(e["name"], e["reference"], e["origin"]) for e in result["entities"]]
    surprisals = name_surprisal(source, [e.name for e in entities])
    popular = popular_by_median(surprisals)
    pairs = [(p["source_layer"], p["target_layer"]) for p in result["pairs"]]
    saved = result.get("mean_state")
    mean_state = None if saved is None else {int(b): description_of(t) for b, t in saved.items()}
    scored = summarise(
        entities,
        popular,
        pairs,
        [p["descriptions"] for p in result["pairs"]],
        result["text_only_descriptions"],
        description_of(result["control"]),
        result["seed"],
        mean_state,
    )
    for old, new in zip(result["pairs"], scored["pairs"], strict=True):
        new.update({k: v for k, v in old.items() if k.startswith("mapping_")})
    out = {k: v for k, v in result.items() if k != "popular_tokens"}
    out.update(scored)
    out["popularity_proxy"] = POPULARITY_PROXY
    out["rescored"] = "popular/rare split redone from the stored descriptions (`eval description --rescore`)"
    for entry, value, flag in zip(out["entities"], surprisals, popular, strict=True):
        entry.update(name_surprisal=value, popular=flag)
    return out


def run(
    source: LoadedModel,
    target: LoadedModel,
    entities: Sequence[Entity],
    *,
    pairs: Sequence[tuple[int, int]] | None = None,
    layer_step: int = 3,
    mapping=None,
    max_new_tokens: int = 16,
    seed: int = 0,
    progress: Progress = no_progress,
) -> dict:
    """ROUGE-L of the description Patchscope per layer pair, beside the text-only and no-patch baselines.

    Same model: `pairs` default to ℓ* = ℓ on every `layer_step`-th layer. Cross-model: `mapping` (a
    `MappingSet`) must cover `pairs`.
    """
    started = time.perf_counter()
    same = source.fingerprint == target.fingerprint
    if pairs is None:
        if not same:
            raise ValueError("a cross-model description run needs its layer pairs and their mappings")
        pairs = [(a, a) for a in layer_grid(source.facts.num_layers, layer_step)]
    source_layers = sorted({a for a, _ in pairs})
    preset = get_preset("description")
    surprisals = name_surprisal(source, [e.name for e in entities])
    popular = popular_by_median(surprisals)

    rows = []
    for k, entity in enumerate(entities):
        states = extract(source, SOURCE_CONTEXT.format(entity.name), source_layers, [-1]).states[
            :, 0
        ]  # [l, d]
        for a, b in pairs:
            vector = states[source_layers.index(a)]
            if mapping is not None:
                vector = mapping(vector[None], a, b)[0]
            rows.append(PatchedRow(preset.template, preset.filler, (RowPatch(layer=b, vector=vector),)))
        progress("source states", k + 1, len(entities))
    texts = patched_texts(target, rows, max_new_tokens, progress=progress, phase="description Patchscope")
    (control,) = unpatched_texts(target, preset.template, preset.filler, max_new_tokens)
    target_layers = sorted({b for _, b in pairs})  # the target's own means, also across models
    mean_state = mean_state_texts(target, preset.template, preset.filler, target_layers, max_new_tokens)
    text_only = patched_texts(
        target,
        [PatchedRow(preset.template, " " + e.name, ()) for e in entities],
        max_new_tokens,
        phase="text only",
    )
    pair_descriptions = [
        [description_of(texts[k * len(pairs) + p]) for k in range(len(entities))] for p in range(len(pairs))
    ]
    scored = summarise(
        entities,
        popular,
        pairs,
        pair_descriptions,
        [description_of(t) for t in text_only],
        description_of(control),
        seed,
        {b: description_of(t) for b, t in mean_state.items()},
    )
    pairs_out = scored["pairs"]
    best = max(pairs_out, key=lambda e: e["all"]["rouge_l"]) if pairs_out else None
    return {
        "experiment": "description",
        "source": source.id,
        "target": target.id,
        "same_model": same,
        "source_context": SOURCE_CONTEXT,
        "template": preset.template,
        "max_new_tokens": max_new_tokens,
        "popularity_proxy": POPULARITY_PROXY,
        "seed": seed,
        "entities": [
            {
                "name": e.name,
                "reference": e.reference,
                "origin": e.origin,
                "name_surprisal": surprisals[k],
                "popular": popular[k],
            }
            for k, e in enumerate(entities)
        ],
        "control": control,
        "mean_state": {str(b): t for b, t in mean_state.items()},
        **scored,
        "best_pair": None if best is None else [best["source_layer"], best["target_layer"]],
        "mean_over_pairs": sum(e["all"]["rouge_l"] for e in pairs_out) / len(pairs_out) if pairs_out else 0.0,
        "seconds": round(time.perf_counter() - started, 1),
    }


def plot(result: dict, path: Path) -> Path:
    """ROUGE-L per layer pair (all, popular, rare), with the text-only and no-patch baselines as lines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.8, 3.8))
    labels = [
        f"{p['source_layer']}→{p['target_layer']}" if not result["same_model"] else str(p["source_layer"])
        for p in result["pairs"]
    ]
    x = list(range(len(labels)))
    for group, marker in (("all", "^-"), ("popular", "o--"), ("rare", "s--")):
        values = [p[group]["rouge_l"] for p in result["pairs"]]
        low = [v - p[group]["ci"][0] for v, p in zip(values, result["pairs"], strict=True)]
        high = [p[group]["ci"][1] - v for v, p in zip(values, result["pairs"], strict=True)]
        ax.errorbar(
            x,
            values,
            yerr=[low, high],
            fmt=marker,
            ms=3,
            capsize=2,
            label=f"Patchscope, {group} (n={result['counts'][group]})",
        )
    ax.axhline(
        result["text_only"]["all"]["rouge_l"], color="black", ls=":", label="text-only (name in prompt)"
    )
    ax.axhline(result["no_patch_control"]["all"]["rouge_l"], color="grey", ls="--", label="no-patch control")
    if all("mean_state_control" in p for p in result["pairs"]):
        values = [p["mean_state_control"]["all"]["rouge_l"] for p in result["pairs"]]
        ax.plot(x, values, "x--", ms=4, color="tab:red", label="mean-state control at ℓ*")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_xlabel("layer" if result["same_model"] else "ℓ → ℓ*")
    ax.set_ylabel("ROUGE-L")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"entity description: {result['source']} → {result['target']}", fontsize=10)
    save_figure(fig, path)
    plt.close(fig)
    return path
