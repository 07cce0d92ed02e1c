"""Experiments 1 and 3 (paper §4.1, §4.4): the next token, decoded from an intermediate layer.

For positions of held-out WikiText sentences, the reference is the source model's own final-layer
prediction. Three readers of the state at layer ℓ try to recover it:

- **logit lens**: the final norm and the unembedding applied to the state itself;
- **tuned lens**: an affine map ℓ → last layer (ridge, fitted on other documents), then the same head;
- **token identity Patchscope**: the (mapped) state patched into the target's few-shot identity prompt at
  ℓ*, and the target's first generated token.

Metrics per layer: Precision@1 (top-1 equals the reference) and the paper's surprisal, −ln p^L(t̂): how
unlikely the source's own final-layer distribution finds the reader's top-1 token t̂ (nats). The other
surprisal, −log₂ of the reference under the reader's distribution, is kept as `reference_surprisal_bits`.
Cross-model (smollm2 → gemma3) compares token strings, since the vocabularies differ, and goes through the
registry's mappings, whose held-out R² is reported beside each pair; there the Patchscope is read with two
target prompts, the identity prompt and T = S (the source text itself, patched at its last token).

Controls beside every reader: the target's answer with nothing patched (the identity prompt's own next
token, and for T = S the target's own next token on the source text, which is also the text-only
baseline), and the share of Patchscope answers equal to it. Beside the identity prompt also the
mean-state control: the same prompt with the target layer ℓ*'s mean state patched at the placeholder, one
constant answer per ℓ* that holds nothing about any position; its P@1 is the share of references it
equals, so a Patchscope figure at or below it reads no more from the state than the prompt does. Every
per-position outcome is stored, so each figure can be recomputed from the JSON.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from patchscope.engine.models import LoadedModel
from patchscope.engine.presets import get_preset
from patchscope.eval.common import Progress, hits_string, mean_state_texts, no_progress, proportion
from patchscope.eval.next_token_readers import (
    Reader,
    fit_tuned_lens,
    head_reader,
    paper_surprisal,
    patchscope_reader,
    same_prompt_reader,
    same_token,
    score,
    sentences_of,
    source_ids_of,
    source_states,
    template_pattern,
    unpatched_next_tokens,
)
from patchscope.mapping.corpus import file_fingerprint
from patchscope.mapping.registry import MappingRegistry
from patchscope.mapping.resolve import resolve_mappings


class FittedOnEvaluation(ValueError):
    """A mapping was fitted on documents the evaluation would test on."""


def check_held_out(mapping_set, corpus: Path, seed: int) -> None:
    """Refuse maps whose fit documents may be among this run's test documents (same corpus file).

    A map fitted on the same corpus is safe only when it recorded its split seed and that seed is this
    run's: both then split the documents the same way and the test part was never fitted on.
    """
    fingerprint = file_fingerprint(corpus)
    for loaded in {id(m): m for m in mapping_set.by_pair.values()}.values():
        info = loaded.info
        if info.corpus_fingerprint != fingerprint:
            continue
        recorded = json.loads(info.hyperparameters or "{}").get("split_seed")
        if recorded is None:
            raise FittedOnEvaluation(
                f"mapping {info.id} was fitted on {corpus.name} without a recorded split seed, so its fit "
                "documents are unknown: refit it (patchscope fit-mapping records --seed) or evaluate on "
                "another corpus"
            )
        if int(recorded) != seed:
            raise FittedOnEvaluation(
                f"mapping {info.id} was fitted on {corpus.name} with split seed {recorded}; evaluating with "
                f"seed {seed} would test on its fit documents: pass --seed {recorded} or use maps fitted "
                f"with --seed {seed}"
            )


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
    same_prompt: bool = True,
    progress: Progress = no_progress,
) -> dict:
    """The next-token experiment; same-model when `target` is `source`, else through registered mappings.

    Evaluation takes at most `per_text` positions of a text; the tuned lens's fit set takes more
    (`fit_per_text`): it needs many states, and a forward pass costs the same for one position or all.
    `seed` is the document split's seed (the tuned lens fits on its train part, evaluation reads its test
    part), and a cross-model run refuses maps fitted on its test documents (`check_held_out`).

    `pairs` are (ℓ, ℓ*): by default every layer to itself (same model) or every registered pair (cross).
    `same_prompt` adds the T = S reading for cross-model pairs.
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
        check_held_out(mapping, corpus, seed)

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
    assert test.final_logprobs is not None
    fit_started = time.perf_counter()
    tuned = fit_tuned_lens(fit)
    fit_s = time.perf_counter() - fit_started
    reference_strings = [source.tokenizer.decode([t]) for t in test.reference.tolist()]
    reference_ids = test.reference.tolist()
    pattern = template_pattern(target)
    preset = get_preset("identity")
    (identity_control,) = unpatched_next_tokens(target, [(preset.template, preset.filler)])
    mean_state = mean_state_texts(target, preset.template, preset.filler, sorted({b for _, b in pairs}), 1)

    def scored(reader: Reader, model: LoadedModel, ids: list[int] | None, **kw) -> dict:
        surprisal = paper_surprisal(test.final_logprobs, source_ids_of(source, model, reader))
        return score(reader, reference_strings, reference_ids=ids, surprisal=surprisal, **kw)

    layers_out = []
    for layer in sorted({a for a, _ in pairs}):
        states = test.states[layer]
        lens = head_reader(source, states, test.reference)
        tuned_states = states @ tuned[layer]["weight"] + tuned[layer]["bias"]
        tuned_lens = head_reader(source, tuned_states, test.reference)
        layers_out.append(
            {
                "layer": layer,
                "logit_lens": scored(lens, source, reference_ids),
                "tuned_lens": scored(tuned_lens, source, reference_ids),
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
            "patchscope": scored(
                reader, target, reference_ids if same else None, pattern=pattern, control=identity_control
            ),
        }
        entry["mean_state_control"] = mean_state_score(mean_state[target_layer], reference_strings)
        entry["patchscope"]["same_as_mean_state"] = proportion(
            sum(same_token(a, mean_state[target_layer]) for a in reader.top1), len(reader.top1)
        )
        if mapping is not None:
            entry["mapping_id"], entry["mapping_r2"] = mapping.describe(source_layer, target_layer)
        pairs_out.append(entry)

    extra: dict = {}
    if not same and same_prompt:
        # T = S: the target's own next token on the source text is the no-patch control of these rows and,
        # compared with the source's prediction, the text-only baseline (do the models simply agree?).
        own = unpatched_next_tokens(target, [("{}", c) for c in test.contexts])
        text_hits = [same_token(a, b) for a, b in zip(own, reference_strings, strict=True)]
        extra["text_only"] = {
            "p_at_1": proportion(sum(text_hits), len(text_hits)),
            "hits": hits_string(text_hits),
        }
        for source_layer in sorted({a for a, _ in pairs}):
            targets = [b for a, b in pairs if a == source_layer]
            assert mapping is not None
            vectors = {b: mapping.by_pair[(source_layer, b)].map(test.states[source_layer]) for b in targets}
            readers = same_prompt_reader(
                target, test.contexts, vectors, test.reference, source, progress=progress
            )
            for entry in pairs_out:
                if entry["source_layer"] == source_layer:
                    entry["same_prompt"] = scored(readers[entry["target_layer"]], target, None, control=own)
    return {
        "experiment": "next-token",
        "source": source.id,
        "target": target.id,
        "same_model": same,
        "corpus": corpus.name,
        "corpus_fingerprint": file_fingerprint(corpus),
        "positions": int(test.states.shape[1]),
        "fit_positions": int(fit.states.shape[1]),
        "per_text": per_text,
        "seed": seed,
        "identity_control": identity_control,
        "mean_state": {str(b): t for b, t in mean_state.items()},
        "references": reference_strings,
        "contexts": [c[-80:] for c in test.contexts],
        "tuned_lens_fit_s": round(fit_s, 2),
        "seconds": round(time.perf_counter() - started, 1),
        "layers": layers_out,
        "pairs": pairs_out,
        **extra,
    }


def mean_state_score(answer: str, reference_strings: list[str]) -> dict:
    """The mean-state control's P@1: its one answer against every reference, compared as token strings."""
    hits = [same_token(answer, r) for r in reference_strings]
    return {
        "answer": answer,
        "precision_at_1": sum(hits) / len(hits),
        "p_at_1": proportion(sum(hits), len(hits)),
        "hits": hits_string(hits),
    }


def combine(runs: list[dict]) -> dict:
    """Several split seeds of one experiment: the runs as they are, and mean ± spread of each P@1.

    The spread is half the range over seeds (with three seeds, the honest summary of their variation).
    """
    first = runs[0]

    def stats(values: list[float]) -> dict:
        return {
            "mean": sum(values) / len(values),
            "spread": (max(values) - min(values)) / 2,
            "values": values,
        }

    layers = []
    for k, entry in enumerate(first["layers"]):
        layers.append(
            {
                "layer": entry["layer"],
                **{
                    reader: stats([r["layers"][k][reader]["precision_at_1"] for r in runs])
                    for reader in ("logit_lens", "tuned_lens")
                },
            }
        )
    pairs = []
    for k, entry in enumerate(first["pairs"]):
        item = {"source_layer": entry["source_layer"], "target_layer": entry["target_layer"]}
        for reader in ("patchscope", "same_prompt"):
            if reader in entry:
                item[reader] = stats([r["pairs"][k][reader]["precision_at_1"] for r in runs])
        if all("mean_state_control" in r["pairs"][k] for r in runs):  # results saved before it lack it
            controls = [r["pairs"][k]["mean_state_control"] for r in runs]
            item["mean_state_control"] = {
                **stats([c["precision_at_1"] for c in controls]),
                "pooled": proportion(
                    sum(c["p_at_1"]["k"] for c in controls), sum(c["p_at_1"]["n"] for c in controls)
                ),
                "answers": [c["answer"] for c in controls],
            }
            same = [r["pairs"][k]["patchscope"]["same_as_mean_state"] for r in runs]
            item["same_as_mean_state"] = proportion(sum(c["k"] for c in same), sum(c["n"] for c in same))
        pairs.append(item)
    return {
        "experiment": first["experiment"],
        "source": first["source"],
        "target": first["target"],
        "same_model": first["same_model"],
        "seeds": [r["seed"] for r in runs],
        "positions_per_seed": [r["positions"] for r in runs],
        "positions": sum(r["positions"] for r in runs),
        "seconds": round(sum(r["seconds"] for r in runs), 1),
        "summary": {"layers": layers, "pairs": pairs},
        "runs": runs,
    }
