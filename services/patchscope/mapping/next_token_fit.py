"""Next-token maps: the target, reading the mapped state with the identity prompt, says the source's token.

An affine map trained so that the target predicts the token the *source* predicts at that position. Why
apart: the behavioural fit (mapping/behavioural.py) makes the target do with the mapped state what it does
with its own state of the same text. At late source layers a state carries the source's prediction, and
the target's own state of the same text carries the target's, which agrees with the source's on the next
token only about as often as the two models agree on plain text; matching the target's behaviour caps the
cross-model next-token reading there. This fit's rows are source states at positions of the corpus's
train documents (any position, not word ends, as the next-token experiment samples them), its label the
source's own next token there (the target's first token of the same string), its loss the target's
cross-entropy on that label at the identity prompt's answer, back-propagated through the target's blocks
above ℓ* (their parameters frozen). It is the cross-model counterpart of the source's tuned lens (a map to
the source's own last layer), fitted on the same documents, so comparing the two in `eval cross-model` is
even.

Such a map is for reading predictions: it is trained on no word's identity, so a word-end state read with
it may name the next word instead of the word. The registry records its method; `--mapping auto` prefers
maps with behaviour metrics, which a next-token map has only when `fit-mapping` measured them.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from patchscope.engine.models import LoadedModel
from patchscope.engine.presets import get_preset
from patchscope.eval.next_token_readers import reference_ids_in, source_states
from patchscope.mapping.behaviour_data import BehaviourTemplate
from patchscope.mapping.behaviour_forward import TemplateForward, frozen
from patchscope.mapping.fit import FittedMap, apply


@dataclass(frozen=True)
class NextTokenOptions:
    """Hyperparameters of `fit_next_token` (recorded in the artefact)."""

    train_positions: int = 8000
    validation_positions: int = 400
    per_text: int = 16  # positions of one text: a forward costs the same for one position or all
    lr: float = 1e-3  # an absolute Adam step
    batch_size: int = 64
    max_steps: int = 1000
    eval_every: int = 20
    patience: int = 4
    gains: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)  # ridge shrinks late states far below their norm
    top_k: int = 16  # soft labels: the source's K most likely tokens (1: its argmax alone)


@dataclass
class PredictionRows:
    """Source states at one layer and the source's next-token distribution there, in the target's tokens.

    `label` is the source's argmax (what P@1 scores); `soft_ids` and `soft_probs` are its `top_k` most
    likely tokens, each as the target's first token of the same string, and their probabilities
    renormalised over the K: a distribution carries more of what the state encodes than its argmax alone.
    """

    x: torch.Tensor  # [N, d_s] float32
    label: torch.Tensor  # [N] target token ids
    soft_ids: torch.Tensor  # [N, K] target token ids
    soft_probs: torch.Tensor  # [N, K], rows sum to 1


def prediction_rows(
    source: LoadedModel,
    target: LoadedModel,
    texts: Sequence[str],
    layers: Sequence[int],
    count: int,
    *,
    per_text: int,
    seed: int,
    top_k: int = 16,
) -> dict[int, PredictionRows]:
    """`count` positions of `texts` (seeded): per layer the source's state there, and its final distribution.

    One source pass serves every layer: the positions and labels are the same for all of them.
    """
    states = source_states(source, texts, count, per_text=per_text, seed=seed, phase="next-token rows")
    assert states.final_logprobs is not None
    top = states.final_logprobs.float().topk(top_k, dim=-1)
    unique = top.indices.unique()
    in_target = dict(zip(unique.tolist(), reference_ids_in(target, source, unique).tolist(), strict=True))
    soft_ids = torch.tensor([[in_target[t] for t in row] for row in top.indices.tolist()])
    soft_probs = torch.softmax(top.values, dim=-1)
    label = reference_ids_in(target, source, states.reference)
    # Each layer's states cloned out of the [L, N, d] stack, so the layers not asked for are freed.
    return {
        layer: PredictionRows(states.states[layer].clone(), label, soft_ids, soft_probs) for layer in layers
    }


def identity_forward(target: LoadedModel, layer: int) -> TemplateForward:
    """The identity prompt patched at ℓ* = `layer`: the reader the next-token experiment scores."""
    preset = get_preset("identity")
    return TemplateForward(target, BehaviourTemplate("identity", preset.template, preset.filler), layer)


def _loss_and_hits(
    forward: TemplateForward, mapped: torch.Tensor, rows: PredictionRows, idx: torch.Tensor | slice
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy against the soft labels of rows `idx`, and whether the target's argmax is the label."""
    logprobs = forward.logprobs(mapped)[:, 0]  # [B, V]
    ids, probs = rows.soft_ids[idx].to(logprobs.device), rows.soft_probs[idx].to(logprobs.device)
    loss = -(probs * logprobs.gather(1, ids)).sum(-1).mean()
    return loss, (logprobs.argmax(dim=-1).cpu() == rows.label[idx])


def split_loss(
    forward: TemplateForward,
    rows: PredictionRows,
    mapped: Callable[[torch.Tensor], torch.Tensor],
    batch: int = 128,
) -> tuple[float, float]:
    """Mean cross-entropy (nats, soft labels) and top-1 agreement with the labels over `rows` (no grad)."""
    total, hits = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows.label), batch):
            idx = slice(start, start + batch)
            loss, hit = _loss_and_hits(forward, mapped(rows.x[idx]), rows, idx)
            total += float(loss) * len(hit)
            hits += int(hit.sum())
    n = max(1, len(rows.label))
    return total / n, hits / n


def fit_next_token(
    start: FittedMap,
    target: LoadedModel,
    forward: TemplateForward,
    train: PredictionRows,
    val: PredictionRows,
    y_mean: torch.Tensor,
    options: NextTokenOptions = NextTokenOptions(),
    *,
    seed: int = 0,
    on_step: Callable[[int, int, float | None], None] = lambda _s, _t, _v: None,
) -> FittedMap:
    """Adam on the target's cross-entropy from `start` (first scaled about `y_mean` by the best gain).

    Early stopping on the validation cross-entropy; `y_mean` is the target layer's mean state, about which
    ridge shrinks its outputs (a short state reads as a weak one).
    """
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    start = copy.deepcopy(start)
    with frozen(target.model):

        def scaled(g: float) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda x: y_mean + g * (apply(start.tensors(), x) - y_mean)

        losses = {g: split_loss(forward, val, scaled(g))[0] for g in options.gains}
        gain = min(losses, key=lambda g: (losses[g], abs(g - 1)))
        weight = torch.nn.Parameter(start.weight * gain)
        bias = torch.nn.Parameter(y_mean + gain * (start.bias - y_mean))

        def mapped(x: torch.Tensor) -> torch.Tensor:
            return apply({"weight": weight, "bias": bias}, x)

        optimiser = torch.optim.Adam([weight, bias], lr=options.lr)
        start_loss, start_hits = split_loss(forward, val, mapped)
        on_step(0, options.max_steps, start_loss)
        best = (start_loss, weight.detach().clone(), bias.detach().clone(), 0)
        order: list[torch.Tensor] = []
        step, stale = 0, 0
        while step < options.max_steps and stale < options.patience:
            if not order:
                order = list(torch.randperm(len(train.label), generator=generator).split(options.batch_size))
                order.reverse()
            idx = order.pop()
            optimiser.zero_grad()
            loss, _ = _loss_and_hits(forward, mapped(train.x[idx]), train, idx)
            loss.backward()
            optimiser.step()
            step += 1
            value = None
            if step % options.eval_every == 0 or step == options.max_steps:
                value, _ = split_loss(forward, val, mapped)
                if value < best[0] - 1e-4:
                    best, stale = (value, weight.detach().clone(), bias.detach().clone(), step), 0
                else:
                    stale += 1
            on_step(step, options.max_steps, value)
        best_loss, best_weight, best_bias, best_step = best
        final = {"weight": best_weight, "bias": best_bias}
        _, best_hits = split_loss(forward, val, lambda x: apply(final, x))
    hyper: dict[str, float | int | str] = {
        "init": "affine",
        "objective": "next-token cross-entropy, identity prompt",
        "top_k": options.top_k,
        "lr": options.lr,
        "batch_size": options.batch_size,
        "steps": step,
        "best_step": best_step,
        "patience": options.patience,
        "norm_gain": gain,
        "val_ce_start": round(start_loss, 5),
        "val_ce": round(best_loss, 5),
        "val_top1_start": round(start_hits, 4),
        "val_top1": round(best_hits, 4),
        "train_rows": int(train.x.shape[0]),
        "val_rows": int(val.x.shape[0]),
        **{f"affine_{k}": v for k, v in start.hyperparameters.items()},
    }
    return FittedMap(
        "next-token", best_weight, best_bias, hyper, start.validation, {}, time.perf_counter() - started
    )
