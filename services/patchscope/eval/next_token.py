"""Experiments 1 and 3 (paper §4.1, §4.4): the next token, decoded from an intermediate layer.

For positions of held-out WikiText sentences, the reference is the source model's own final-layer
prediction. Three readers of the state at layer ℓ try to recover it:

- **logit lens**: the final norm and the unembedding applied to the state itself;
- **tuned lens**: an affine map ℓ → last layer (ridge, fitted on other documents), then the same head;
- **token identity Patchscope**: the (mapped) state patched into the target's few-shot identity prompt at
  ℓ*, and the target's first generated token.

Metrics per layer: Precision@1 (top-1 equals the reference) and surprisal (−log₂ of the reference under
the reader's distribution). Cross-model (smollm2 → gemma3) compares token strings, since the vocabularies
differ, and goes through the registry's mappings, whose held-out R² is reported beside each pair.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from patchscope.engine.hooks import capture
from patchscope.engine.models import LoadedModel
from patchscope.engine.presets import get_preset
from patchscope.engine.template import tokenize_prompt
from patchscope.eval.common import Progress, first_token_logits, no_progress, pyplot, save_figure
from patchscope.mapping.corpus import read_documents, split_documents, take_words
from patchscope.mapping.fit import RidgeBasis, fit_affine
from patchscope.mapping.registry import MappingRegistry
from patchscope.mapping.resolve import resolve_mappings

LOG2 = math.log(2.0)


@dataclass
class SourceStates:
    """States of sampled positions at every layer, and the model's own next-token prediction there."""

    states: torch.Tensor  # [L, N, d] float32
    reference: torch.Tensor  # [N] token ids: argmax of the final logits
    contexts: list[str]  # the text up to and including each position


def sentences_of(corpus: Path, part: str, seed: int) -> list[str]:
    """Paragraph texts of one part of the document split: `fit` (train) or `eval` (test)."""
    split = split_documents(read_documents(corpus), seed=seed)
    documents = split.train if part == "fit" else split.test
    return take_words(documents, None)


@torch.inference_mode()
def source_states(
    model: LoadedModel,
    texts: Sequence[str],
    count: int,
    *,
    per_text: int,
    seed: int,
    max_tokens: int = 64,
    progress: Progress = no_progress,
    phase: str = "source states",
) -> SourceStates:
    """`count` positions (at most `per_text` per text, never position 0 or a special token), all layers."""
    rng = random.Random(seed)
    specials = set(model.tokenizer.all_special_ids)
    layers = list(range(model.facts.num_layers))
    states, contexts, done = [], [], 0
    for text in texts:
        if done >= count:
            break
        ids = tokenize_prompt(model.tokenizer, text)[:max_tokens]
        candidates = [p for p in range(1, len(ids)) if ids[p] not in specials]
        if not candidates:
            continue
        picks = sorted(rng.sample(candidates, min(per_text, len(candidates), count - done)))
        captured = capture(model, torch.tensor([ids], device=model.device), layers)
        states.append(torch.stack([captured[layer][0, picks] for layer in layers]).float().cpu())  # [L, p, d]
        contexts += [model.tokenizer.decode(ids[: p + 1], skip_special_tokens=True) for p in picks]
        done += len(picks)
        progress(phase, done, count)
    if done < count:
        raise ValueError(
            f"{phase}: the texts hold only {done} usable positions at {per_text} per text, {count} asked for"
        )
    stacked = torch.cat(states, dim=1)  # [L, N, d]
    final = model.layout.logits(stacked[-1].to(model.device, model.dtype)).float()  # [N, V]
    return SourceStates(stacked, final.argmax(dim=-1).cpu(), contexts)


@dataclass
class Reader:
    """Top-1 token strings and reference surprisals (bits) of one reader at one layer."""

    top1: list[str]
    top1_ids: list[int]
    surprisal: list[float]


def _read_logprobs(model: LoadedModel, logprobs: torch.Tensor, reference: torch.Tensor) -> Reader:
    top = logprobs.argmax(dim=-1)
    picked = logprobs.gather(1, reference[:, None].to(logprobs.device))[:, 0]
    return Reader(
        [model.tokenizer.decode([int(t)]) for t in top],
        top.tolist(),
        (-picked / LOG2).tolist(),
    )


@torch.inference_mode()
def head_reader(model: LoadedModel, states: torch.Tensor, reference: torch.Tensor) -> Reader:
    """The model's own head on states ([N, d]): the logit lens, or the tuned lens after its map."""
    logits = model.layout.logits(states.to(model.device, model.dtype)).float()
    return _read_logprobs(model, torch.log_softmax(logits, dim=-1), reference)


def fit_tuned_lens(fit: SourceStates, validation: float = 0.1) -> list[dict[str, torch.Tensor]]:
    """One ridge map per layer to the last layer, regularisation chosen on a held-out tenth of `fit`."""
    n = fit.states.shape[1]
    n_val = max(1, int(n * validation))
    y, y_val = fit.states[-1, n_val:], fit.states[-1, :n_val]
    maps = []
    for layer in range(fit.states.shape[0]):
        x, x_val = fit.states[layer, n_val:], fit.states[layer, :n_val]
        fitted = fit_affine(RidgeBasis.of(x), y, x_val, y_val)
        maps.append({"weight": fitted.weight, "bias": fitted.bias})
    return maps


def reference_ids_in(target: LoadedModel, source: LoadedModel, reference: torch.Tensor) -> torch.Tensor:
    """Each reference token as the target's first token of the same string (cross-model surprisal)."""
    if target.fingerprint == source.fingerprint:
        return reference
    ids = []
    for t in reference.tolist():
        text = source.tokenizer.decode([t])
        encoded = target.tokenizer(text, add_special_tokens=False).input_ids or [0]
        ids.append(encoded[0])
    return torch.tensor(ids)


def patchscope_reader(
    source: LoadedModel,
    target: LoadedModel,
    states: torch.Tensor,
    target_layer: int,
    reference: torch.Tensor,
    *,
    mapping=None,
    progress: Progress = no_progress,
    phase: str = "patchscope",
) -> Reader:
    """Token identity: the first token the target generates with each state patched at `target_layer`."""
    preset = get_preset("identity")
    vectors = states if mapping is None else mapping(states)
    target_ref = reference_ids_in(target, source, reference)
    logprobs = torch.empty(len(vectors), target.facts.vocab_size)
    patches = [(target_layer, v) for v in vectors]
    for row, lp in first_token_logits(
        target, preset.template, preset.filler, patches, progress=progress, phase=phase
    ):
        logprobs[row] = lp[: target.facts.vocab_size].cpu()
    return _read_logprobs(target, logprobs, target_ref)


def template_pattern(target: LoadedModel) -> set[str]:
    """The identity prompt's own token strings: an answer among them repeats the prompt, not the state."""
    preset = get_preset("identity")
    ids = target.tokenizer(preset.template.replace("{}", preset.filler), add_special_tokens=False).input_ids
    return {target.tokenizer.decode([i]).strip() for i in ids} | {""}


def same_token(answer: str, reference: str) -> bool:
    """Token strings compared without surrounding spaces; a whitespace-only reference must match exactly."""
    return answer.strip() == reference.strip() if reference.strip() else answer == reference


def score(
    reader: Reader,
    reference_strings: list[str],
    pattern: set[str] | None = None,
    reference_ids: list[int] | None = None,
) -> dict[str, float]:
    """Precision@1 (ids when the vocabulary is the reference's, else token strings), mean surprisal."""
    if reference_ids is not None:
        hits = [a == b for a, b in zip(reader.top1_ids, reference_ids, strict=True)]
    else:
        hits = [same_token(a, b) for a, b in zip(reader.top1, reference_strings, strict=True)]
    out = {
        "precision_at_1": sum(hits) / len(hits),
        "surprisal_bits": sum(reader.surprisal) / len(reader.surprisal),
    }
    if pattern is not None:  # misses that repeat the identity prompt instead of reading the state
        repeats = [a.strip() in pattern and not hit for a, hit in zip(reader.top1, hits, strict=True)]
        out["pattern_rate"] = sum(repeats) / len(repeats)
    return out


def run(
    source: LoadedModel,
    target: LoadedModel,
    corpus: Path,
    *,
    positions: int = 1000,
    fit_positions: int = 4000,
    per_text: int = 8,
    fit_per_text: int = 16,
    pairs: Sequence[tuple[int, int]] | None = None,
    registry: MappingRegistry | None = None,
    seed: int = 0,
    keep_examples: int = 20,
    progress: Progress = no_progress,
) -> dict:
    """The next-token experiment; same-model when `target` is `source`, else through registered mappings.

    Evaluation takes at most `per_text` positions of a text; the tuned lens's fit set takes more
    (`fit_per_text`): it needs many states, and a forward pass costs the same for one position or all.

    `pairs` are (ℓ, ℓ*): by default every layer to itself (same model) or every registered pair (cross).
    """
    started = time.perf_counter()
    same = source.fingerprint == target.fingerprint
    mapping = None
    if same and pairs is None:
        pairs = [(layer, layer) for layer in range(source.facts.num_layers)]
    if not same:
        if registry is None:
            raise ValueError("a cross-model run needs a mapping registry")
        if pairs is None:
            pairs = sorted(registry.best(source.id, target.id))
            if not pairs:
                raise FileNotFoundError(
                    f"no mappings {source.id} -> {target.id} in {registry.root}: run patchscope fit-mapping"
                )
        mapping = resolve_mappings(registry, source, target, pairs)  # the service's choice: best R² per pair

    fit = source_states(
        source,
        sentences_of(corpus, "fit", seed),
        fit_positions,
        per_text=fit_per_text,
        seed=seed,
        progress=progress,
        phase="tuned-lens states",
    )
    test = source_states(
        source,
        sentences_of(corpus, "eval", seed),
        positions,
        per_text=per_text,
        seed=seed + 1,
        progress=progress,
        phase="evaluation states",
    )
    fit_started = time.perf_counter()
    tuned = fit_tuned_lens(fit)
    fit_s = time.perf_counter() - fit_started
    reference_strings = [source.tokenizer.decode([t]) for t in test.reference.tolist()]
    reference_ids = test.reference.tolist()
    pattern = template_pattern(target)

    layers_out = []
    for layer in sorted({a for a, _ in pairs}):
        states = test.states[layer]
        lens = head_reader(source, states, test.reference)
        tuned_states = states @ tuned[layer]["weight"] + tuned[layer]["bias"]
        tuned_lens = head_reader(source, tuned_states, test.reference)
        layers_out.append(
            {
                "layer": layer,
                "logit_lens": score(lens, reference_strings, reference_ids=reference_ids),
                "tuned_lens": score(tuned_lens, reference_strings, reference_ids=reference_ids),
            }
        )
    pairs_out = []
    for source_layer, target_layer in pairs:
        reader = patchscope_reader(
            source,
            target,
            test.states[source_layer],
            target_layer,
            test.reference,
            mapping=None if mapping is None else mapping.by_pair[(source_layer, target_layer)].map,
            progress=progress,
            phase=f"patchscope {source_layer}->{target_layer}",
        )
        entry = {
            "source_layer": source_layer,
            "target_layer": target_layer,
            "patchscope": score(reader, reference_strings, pattern, reference_ids if same else None),
            "examples": [
                {"context": c[-80:], "reference": ref, "patchscope": top}
                for c, ref, top in list(zip(test.contexts, reference_strings, reader.top1, strict=False))[
                    :keep_examples
                ]
            ],
        }
        if mapping is not None:
            entry["mapping_id"], entry["mapping_r2"] = mapping.describe(source_layer, target_layer)
        pairs_out.append(entry)
    return {
        "experiment": "next-token",
        "source": source.id,
        "target": target.id,
        "same_model": same,
        "corpus": corpus.name,
        "positions": int(test.states.shape[1]),
        "fit_positions": int(fit.states.shape[1]),
        "seed": seed,
        "tuned_lens_fit_s": round(fit_s, 2),
        "seconds": round(time.perf_counter() - started, 1),
        "layers": layers_out,
        "pairs": pairs_out,
    }


def plot(result: dict, path: Path) -> Path:
    """Precision@1 and surprisal per source layer: the three readers side by side."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    layers = [e["layer"] for e in result["layers"]]
    by_layer = {p["source_layer"]: p for p in result["pairs"]}
    for metric, ax, label in (
        ("precision_at_1", axes[0], "Precision@1"),
        ("surprisal_bits", axes[1], "surprisal (bits)"),
    ):
        ax.plot(layers, [e["logit_lens"][metric] for e in result["layers"]], "o-", label="logit lens", ms=3)
        ax.plot(layers, [e["tuned_lens"][metric] for e in result["layers"]], "s-", label="tuned lens", ms=3)
        ps_layers = sorted(by_layer)
        ax.plot(
            ps_layers,
            [by_layer[k]["patchscope"][metric] for k in ps_layers],
            "^-",
            label="token identity Patchscope",
            ms=3,
        )
        ax.set_xlabel(f"source layer ({result['source']})")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    title = f"next token: {result['source']} -> {result['target']}, {result['positions']} positions"
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_pairs(result: dict, path: Path) -> Path:
    """Cross-model: Precision@1 through each registered mapping, beside the source's own lenses."""
    plt = pyplot()
    pairs = result["pairs"]
    lens = {e["layer"]: e for e in result["layers"]}
    labels = [
        f"{p['source_layer']}→{p['target_layer']}\nR² {p.get('mapping_r2', float('nan')):.2f}" for p in pairs
    ]
    x = range(len(pairs))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(pairs) + 2), 3.6))
    ax.bar(
        [i - width for i in x],
        [p["patchscope"]["precision_at_1"] for p in pairs],
        width,
        label=f"Patchscope into {result['target']}",
    )
    ax.bar(
        list(x),
        [lens[p["source_layer"]]["logit_lens"]["precision_at_1"] for p in pairs],
        width,
        label=f"logit lens ({result['source']})",
    )
    ax.bar(
        [i + width for i in x],
        [lens[p["source_layer"]]["tuned_lens"]["precision_at_1"] for p in pairs],
        width,
        label=f"tuned lens ({result['source']})",
    )
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("Precision@1")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"next token across models, {result['positions']} positions", fontsize=10)
    save_figure(fig, path)
    plt.close(fig)
    return path
