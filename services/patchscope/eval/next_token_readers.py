"""The readers of the next-token experiments (eval/next_token.py) and how each reader's answers are scored.

Why apart: sampling the source's states, the logit and tuned lens, the token identity Patchscope, the
T = S reading and Precision@1 with both surprisals are functions of states and models alone;
`next_token.run` composes them into one experiment and its JSON, and nothing here knows the mapping
registry, the held-out check or the combined seeds.
"""

from __future__ import annotations

import math
import random
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
from patchscope.eval.common import Progress, chunks, first_token_logits, hits_string, no_progress, proportion
from patchscope.mapping.corpus import read_documents, split_documents, take_words
from patchscope.mapping.fit import RidgeBasis, fit_affine

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


def _candidates(ids: list[int], specials: set[int]) -> list[int]:
    """The positions of one text a position may be sampled from: never 0, never a special token."""
    return [p for p in range(1, len(ids)) if ids[p] not in specials]


def usable_positions(model: LoadedModel, texts: Sequence[str], *, per_text: int, max_tokens: int = 64) -> int:
    """How many positions `source_states` can sample from `texts`: tokenizers only, no forward pass.

    Why: a caller asking for more positions than the texts hold is told so before any model runs.
    """
    specials = set(model.tokenizer.all_special_ids)
    ids = (tokenize_prompt(model.tokenizer, text)[:max_tokens] for text in texts)
    return sum(min(per_text, len(_candidates(i, specials))) for i in ids)


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
        candidates = _candidates(ids, specials)
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
