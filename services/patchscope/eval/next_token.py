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
baseline), and the share of Patchscope answers equal to it. Every per-position outcome is stored, so each
figure can be recomputed from the JSON.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from patchscope.engine.generation import GenerationConfig, PatchedRow, RowPatch, iter_patched_generate
from patchscope.engine.hooks import capture
from patchscope.engine.models import LoadedModel
from patchscope.engine.presets import get_preset
from patchscope.engine.runtime import TargetRuntime
from patchscope.engine.template import tokenize_prompt
from patchscope.eval.common import (
    Progress,
    chunks,
    first_token_logits,
    hits_string,
    no_progress,
    proportion,
    pyplot,
    save_figure,
)
from patchscope.mapping.corpus import file_fingerprint, read_documents, split_documents, take_words
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
    final_logprobs: torch.Tensor | None = None  # [N, V] float16: p^L, for the paper's surprisal


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
    logprobs = torch.log_softmax(final, dim=-1)
    return SourceStates(stacked, final.argmax(dim=-1).cpu(), contexts, logprobs.to(torch.float16).cpu())


@dataclass
class Reader:
    """Top-1 token strings and reference surprisals (bits) of one reader at one layer."""

    top1: list[str]
    top1_ids: list[int]
    surprisal: list[float]  # −log₂ p_reader(reference): the second column, not the paper's


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


def source_ids_of(source: LoadedModel, reader_model: LoadedModel, reader: Reader) -> list[int]:
    """The reader's top-1 tokens in the source's vocabulary (the first source token of the same string)."""
    if reader_model.fingerprint == source.fingerprint:
        return reader.top1_ids
    out = []
    for text in reader.top1:
        ids = source.tokenizer(text, add_special_tokens=False).input_ids
        out.append(ids[0] if ids else -1)
    return out


def paper_surprisal(final_logprobs: torch.Tensor, ids: list[int]) -> list[float]:
    """−ln p^L(t̂) per position (nats); a token the source cannot spell counts as its least likely one."""
    lp = final_logprobs.float()
    floor = lp.min(dim=-1).values
    picked = [float(lp[i, t]) if t >= 0 else float(floor[i]) for i, t in enumerate(ids)]
    return [-v for v in picked]


def score(
    reader: Reader,
    reference_strings: list[str],
    pattern: set[str] | None = None,
    reference_ids: list[int] | None = None,
    *,
    surprisal: list[float] | None = None,
    control: str | list[str] | None = None,
) -> dict:
    """Precision@1 with n and interval, both surprisals, and the per-position outcomes behind them.

    Ids are compared when the vocabulary is the reference's, else token strings.
    """
    if reference_ids is not None:
        hits = [a == b for a, b in zip(reader.top1_ids, reference_ids, strict=True)]
    else:
        hits = [same_token(a, b) for a, b in zip(reader.top1, reference_strings, strict=True)]
    n = len(hits)
    out: dict = {
        "precision_at_1": sum(hits) / n,
        "p_at_1": proportion(sum(hits), n),
        "reference_surprisal_bits": sum(reader.surprisal) / n,
        "surprisal_bits": sum(reader.surprisal) / n,  # kept for older readers of the JSON
        "hits": hits_string(hits),
    }
    if surprisal is not None:
        out["surprisal_nats"] = sum(surprisal) / n
        out["surprisal_per_item"] = [round(v, 3) for v in surprisal]
    if pattern is not None:  # misses that repeat the identity prompt instead of reading the state
        repeats = [a.strip() in pattern and not hit for a, hit in zip(reader.top1, hits, strict=True)]
        out["pattern_rate"] = sum(repeats) / n
    if control is not None:
        controls = [control] * n if isinstance(control, str) else control
        same = sum(a.strip() == c.strip() for a, c in zip(reader.top1, controls, strict=True))
        out["same_as_unpatched"] = proportion(same, n)
        out["top1"] = reader.top1
    return out


@torch.inference_mode()
def unpatched_next_tokens(target: LoadedModel, prompts: Sequence[tuple[str, str]]) -> list[str]:
    """The target's own next token for (template, filler) rows with nothing patched."""
    runtime = TargetRuntime.build(target)
    rows = [PatchedRow(t, f, ()) for t, f in prompts]
    out = [""] * len(rows)
    for step in iter_patched_generate(runtime, rows, GenerationConfig(max_new_tokens=1)):
        for row, token in zip(step.rows, step.token_ids, strict=True):
            out[row] = target.tokenizer.decode([token])
    return out


@torch.inference_mode()
def same_prompt_reader(
    target: LoadedModel,
    contexts: Sequence[str],
    vectors_by_layer: dict[int, torch.Tensor],
    reference: torch.Tensor,
    source: LoadedModel,
    *,
    progress: Progress = no_progress,
) -> dict[int, Reader]:
    """T = S: the target reads the source text itself, the mapped state patched at its last token.

    One batch per context (its rows are the target layers), so the context's tokens are shared.
    """
    runtime = TargetRuntime.build(target)
    layers = sorted(vectors_by_layer)
    target_ref = reference_ids_in(target, source, reference)
    logprobs = {b: torch.empty(len(contexts), target.facts.vocab_size) for b in layers}
    rows = [
        PatchedRow("{}", contexts[i], (RowPatch(layer=b, vector=vectors_by_layer[b][i]),))
        for i in range(len(contexts))
        for b in layers
    ]
    for block in chunks(len(rows), 256):
        for step in iter_patched_generate(
            runtime, [rows[r] for r in block], GenerationConfig(max_new_tokens=1), keep_logits=True
        ):
            assert step.logits is not None
            lp = torch.log_softmax(step.logits.float(), dim=-1)
            for k, row in enumerate(step.rows):
                i, b = divmod(block[row], len(layers))
                logprobs[layers[b]][i] = lp[k, : target.facts.vocab_size].cpu()
        progress("T = S patchscope", block.stop, len(rows))
    return {b: _read_logprobs(target, logprobs[b], target_ref) for b in layers}


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
        "references": reference_strings,
        "contexts": [c[-80:] for c in test.contexts],
        "tuned_lens_fit_s": round(fit_s, 2),
        "seconds": round(time.perf_counter() - started, 1),
        "layers": layers_out,
        "pairs": pairs_out,
        **extra,
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


def _as_combined(result: dict) -> dict:
    return result if "runs" in result else combine([result])


def plot(result: dict, path: Path) -> Path:
    """Precision@1 (mean ± spread over seeds) and the paper's surprisal per source layer, three readers."""
    result = _as_combined(result)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    summary = result["summary"]
    layers = [e["layer"] for e in summary["layers"]]
    ps = {p["source_layer"]: p["patchscope"] for p in summary["pairs"]}
    ps_layers = sorted(ps)
    for reader, marker, label in (
        ("logit_lens", "o-", "logit lens"),
        ("tuned_lens", "s-", "tuned lens (ridge)"),
    ):
        axes[0].errorbar(
            layers,
            [e[reader]["mean"] for e in summary["layers"]],
            yerr=[e[reader]["spread"] for e in summary["layers"]],
            fmt=marker,
            ms=3,
            label=label,
        )
    axes[0].errorbar(
        ps_layers,
        [ps[k]["mean"] for k in ps_layers],
        yerr=[ps[k]["spread"] for k in ps_layers],
        fmt="^-",
        ms=3,
        label="token identity Patchscope",
    )
    axes[0].set_ylabel("Precision@1")
    runs = result["runs"]
    for reader, marker, label in (
        ("logit_lens", "o-", "logit lens"),
        ("tuned_lens", "s-", "tuned lens (ridge)"),
    ):
        axes[1].plot(
            layers,
            [
                sum(r["layers"][k][reader]["surprisal_nats"] for r in runs) / len(runs)
                for k in range(len(layers))
            ],
            marker,
            ms=3,
            label=label,
        )
    axes[1].plot(
        [p["source_layer"] for p in runs[0]["pairs"]],
        [
            sum(r["pairs"][k]["patchscope"]["surprisal_nats"] for r in runs) / len(runs)
            for k in range(len(runs[0]["pairs"]))
        ],
        "^-",
        ms=3,
        label="token identity Patchscope",
    )
    axes[1].set_ylabel("surprisal −ln p^L(top-1) (nats)")
    for ax in axes:
        ax.set_xlabel(f"source layer ({result['source']})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    title = (
        f"next token: {result['source']} -> {result['target']}, {result['positions']} positions "
        f"over seeds {result['seeds']}"
    )
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_pairs(result: dict, path: Path) -> Path:
    """Cross-model: Precision@1 per (ℓ, ℓ*) as heat maps (the paper's Fig. 10/11), one per target prompt."""
    result = _as_combined(result)
    plt = pyplot()
    pairs = result["summary"]["pairs"]
    rows = sorted({p["source_layer"] for p in pairs})
    cols = sorted({p["target_layer"] for p in pairs})
    readers = [r for r in ("patchscope", "same_prompt") if r in pairs[0]]
    titles = {"patchscope": "identity prompt", "same_prompt": "T = S (source text)"}
    fig, axes = plt.subplots(1, len(readers), figsize=(4.8 * len(readers) + 0.6, 4.2), squeeze=False)
    for ax, reader in zip(axes[0], readers, strict=True):
        grid = [[float("nan")] * len(cols) for _ in rows]
        for p in pairs:
            grid[rows.index(p["source_layer"])][cols.index(p["target_layer"])] = p[reader]["mean"]
        image = ax.imshow(grid, origin="lower", cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(cols)), cols, fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_xlabel(f"target layer ℓ* ({result['target']})")
        ax.set_ylabel(f"source layer ℓ ({result['source']})")
        ax.set_title(titles[reader], fontsize=9)
        fig.colorbar(image, ax=ax, label="Precision@1")
    fig.suptitle(
        f"next token across models, {result['positions']} positions over seeds {result['seeds']}", fontsize=10
    )
    save_figure(fig, path)
    plt.close(fig)
    return path
