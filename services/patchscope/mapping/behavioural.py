"""Behavioural fitting: a map trained so that the target does with the mapped state what it does with its own.

A ridge map reproduces the variance-weighted bulk of the target's states, which is enough to name a word
but not to carry what the source knows about it: the directions the target's upper layers read an
attribute from have little variance. This fit starts from the ridge solution and minimises, over rows of
(template, text), the KL divergence between the target's next-token distributions at the template's
continuation when patched at ℓ* with its own state of the text and when patched with the mapped source
state of the same text, back-propagating through the target's blocks above ℓ* (its parameters frozen),
plus the MSE to the target's state as a regulariser that keeps the map near the state manifold.

Costs stay small on a CPU: the template's prefix before the placeholder is run once (its keys and values
do not depend on the patch), so a step runs only the placeholder and the few tokens after it, in the
layers above ℓ*; the reference distributions are computed once and kept as their top-K tokens plus the
rest of the mass, a coarsening of the KL that keeps memory at K numbers per position instead of the
vocabulary.

`behaviour_metrics` measures what the registry records beside R²: the identity rate on held-out words, the
attribute accuracy on held-out LRE subjects (only samples the target knows when prompted in plain text,
next to the same-model reference at ℓ*), and the share of attribute explanations equal to the unpatched
control.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from patchscope.engine.models import LoadedModel
from patchscope.mapping.behaviour_forward import Prepared, TemplateForward, Vocabulary, coarse_kl, frozen
from patchscope.mapping.fit import FittedMap, apply
from patchscope.mapping.metrics import evaluate


@dataclass(frozen=True)
class BehaviouralOptions:
    """Hyperparameters of `fit_behavioural` (recorded in the artefact)."""

    hidden: int = 0  # 0: affine; > 0: affine + a GELU MLP residual of this width
    lr: float = 1e-4  # an absolute Adam step: ridge weights are small beside large target states
    batch_size: int = 64  # rows of every template mixed, one forward per template present
    max_steps: int = 300
    eval_every: int = 10
    patience: int = 5
    mse_weight: float = 0.2
    positions: int = 2  # scored tokens per row: an identity template answers " ->" first, then the word
    top_k: int = 64
    restrict_vocabulary: bool = True  # logits over the train and validation rows' top-K tokens only
    calibrate_norm: bool = True
    gains: tuple[float, ...] = (0.9, 1.0, 1.2, 1.5)  # each costs one pass over the validation rows


class Map(torch.nn.Module):
    """`x @ W + b (+ W2 gelu(x W1 + b1) + b2)`: the tensors `fit.apply` reads, as trainable parameters."""

    def __init__(self, start: FittedMap, hidden: int, x_std: float, generator: torch.Generator) -> None:
        super().__init__()
        d_s, d_t = start.weight.shape
        self.weight = torch.nn.Parameter(start.weight.clone())
        self.bias = torch.nn.Parameter(start.bias.clone())
        self.mlp = torch.nn.ParameterDict()
        if hidden > 0:
            w1 = torch.randn(d_s, hidden, generator=generator) / (d_s**0.5 * max(x_std, 1e-6))
            self.mlp.update(
                {
                    "w1": torch.nn.Parameter(w1),
                    "b1": torch.nn.Parameter(torch.zeros(hidden)),
                    "w2": torch.nn.Parameter(torch.zeros(hidden, d_t)),  # zero: starts at the ridge map
                    "b2": torch.nn.Parameter(torch.zeros(d_t)),
                }
            )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias, **{f"mlp.{k}": v for k, v in self.mlp.items()}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply(self.tensors(), x)


def split_kl(
    forwards: dict[str, TemplateForward],
    data: Prepared,
    mapped: Callable[[torch.Tensor], torch.Tensor],
    batch: int = 64,
    lookup: torch.Tensor | None = None,
) -> float:
    """Mean coarse KL over every row of `data` (no gradients): the validation behaviour."""
    total, count = 0.0, 0
    with torch.no_grad():
        for name, members in data.groups.items():
            for start in range(0, len(members), batch):
                idx = members[start : start + batch]
                cont = data.reference.continuation[idx]
                lp = forwards[name].logprobs(mapped(data.x[idx]), cont if cont.shape[1] else None)
                total += float(coarse_kl(lp, data.reference, idx, lookup)) * len(idx)
                count += len(idx)
    return total / max(1, count)


def template_of_rows(data: Prepared) -> tuple[torch.Tensor, list[str]]:
    """Each row's template as an index into the returned names ([N], names in `data.groups` order)."""
    names = list(data.groups)
    of_row = torch.full((data.x.shape[0],), -1, dtype=torch.long)
    for k, name in enumerate(names):
        of_row[data.groups[name]] = k
    if bool((of_row < 0).any()):
        raise ValueError("every row must belong to one template group")
    return of_row, names


def mixed_kl(
    forwards: dict[str, TemplateForward],
    data: Prepared,
    idx: torch.Tensor,
    mapped: torch.Tensor,
    templates: torch.Tensor,
    names: list[str],
    lookup: torch.Tensor | None,
) -> torch.Tensor:
    """Mean coarse KL over rows `idx` of several templates: one forward per template present, row-weighted.

    `mapped` ([B, d_t]) are the rows' mapped states and `templates` ([B]) their template indices into
    `names`; each template's mean is weighted by its share of the rows, so the sum is the batch's mean.
    """
    total = mapped.new_zeros(())
    for k in templates.unique().tolist():
        where = templates == k
        rows = idx[where]
        cont = data.reference.continuation[rows]
        lp = forwards[names[k]].logprobs(mapped[where], cont if cont.shape[1] else None)
        total = total + coarse_kl(lp, data.reference, rows, lookup) * (len(rows) / len(idx))
    return total


def grad_norm(model: torch.nn.Module) -> float:
    """The L2 norm of every parameter's gradient together (a log line shows that gradients flow)."""
    return float(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm())


@contextmanager
def _unrestricted_after(forwards: dict[str, TemplateForward]):
    try:
        yield
    finally:
        for forward in forwards.values():
            forward.restrict(None)


def fit_behavioural(
    start: FittedMap,
    target: LoadedModel,
    forwards: dict[str, TemplateForward],
    train: Prepared,
    val: Prepared,
    options: BehaviouralOptions = BehaviouralOptions(),
    *,
    seed: int = 0,
    on_step: Callable[[int, int, float | None], None] = lambda _s, _t, _kl: None,
    on_note: Callable[[str], None] = lambda _text: None,
) -> FittedMap:
    """Adam on KL + mse_weight · MSE/Var from `start`; the best validation KL wins (early stopping).

    With `calibrate_norm`, the start is first scaled about the target layer's mean state by the gain (of
    `gains`) with the lowest validation KL: ridge shrinks mapped states toward the mean, and a target
    reads a short state as a weak one.
    """
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    start = copy.deepcopy(start)
    y_mean = train.y.mean(dim=0)
    gain = 1.0
    lookup = None
    if options.restrict_vocabulary:
        vocabulary = Vocabulary.of([train.reference, val.reference], target.layout.unembed.weight.shape[0])
        vocabulary.restrict(target, forwards)
        lookup = vocabulary.lookup
    with frozen(target.model), _unrestricted_after(forwards):
        if options.calibrate_norm:

            def scaled(g: float) -> Callable[[torch.Tensor], torch.Tensor]:
                return lambda x: y_mean + g * (apply(start.tensors(), x) - y_mean)

            kls = {g: split_kl(forwards, val, scaled(g), lookup=lookup) for g in options.gains}
            gain = min(kls, key=lambda g: (kls[g], abs(g - 1)))
            start.weight = start.weight * gain
            start.bias = y_mean + gain * (start.bias - y_mean)
        model = Map(start, options.hidden, float(train.x.std()), generator)
        optimiser = torch.optim.Adam(model.parameters(), lr=options.lr)
        target_var = float(train.y.var(dim=0).sum())
        start_kl = split_kl(forwards, val, model, lookup=lookup)
        on_step(0, options.max_steps, start_kl)  # a log shows what the steps improve on
        best_kl, best_state, best_step, stale = start_kl, copy.deepcopy(model.state_dict()), 0, 0
        # Each minibatch mixes templates and texts (a seeded permutation of every training row): one
        # template's few rows make a step that fits them and moves the map off what validation confirms.
        row_template, names = template_of_rows(train)
        order: list[torch.Tensor] = []
        step, running, since = 0, 0.0, 0
        while step < options.max_steps:
            if not order:
                order = list(torch.randperm(len(row_template), generator=generator).split(options.batch_size))
                order.reverse()
            idx = order.pop()
            optimiser.zero_grad()
            mapped = model(train.x[idx])
            loss = mixed_kl(forwards, train, idx, mapped, row_template[idx], names, lookup)
            if options.mse_weight > 0:
                loss = loss + options.mse_weight * ((mapped - train.y[idx]) ** 2).sum(-1).mean() / target_var
            loss.backward()
            if step == 0:
                on_note(f"first step: loss {float(loss.detach()):.4f}, gradient norm {grad_norm(model):.3g}")
            optimiser.step()
            step += 1
            running, since = running + float(loss.detach()), since + 1
            value = None
            if step % options.eval_every == 0 or step == options.max_steps:
                value = split_kl(forwards, val, model, lookup=lookup)
                # Training loss falling while validation does not is the fit memorising its rows.
                on_note(f"step {step}: mean training batch loss {running / since:.4f}")
                running, since = 0.0, 0
                if value < best_kl - 1e-4:
                    best_kl, best_state, best_step, stale = value, copy.deepcopy(model.state_dict()), step, 0
                else:
                    stale += 1
            on_step(step, options.max_steps, value)
            if stale >= options.patience:
                break
        model.load_state_dict(best_state)
    tensors = {k: v.detach().clone() for k, v in model.tensors().items()}
    with torch.no_grad():
        validation = evaluate(apply(tensors, val.x), val.y)
    hyper: dict[str, float | int | str] = {
        "init": "affine",
        "hidden": options.hidden,
        "lr": options.lr,
        "batch_size": options.batch_size,
        "batching": "mixed",
        "steps": step,
        "best_step": best_step,
        "patience": options.patience,
        "mse_weight": options.mse_weight,
        "positions": options.positions,
        "top_k": options.top_k,
        "vocabulary": len(lookup[lookup >= 0]) if lookup is not None else 0,
        "norm_gain": gain,
        "val_kl_start": round(start_kl, 5),
        "val_kl": round(best_kl, 5),
        "train_rows": int(train.x.shape[0]),
        "val_rows": int(val.x.shape[0]),
        **{f"affine_{k}": v for k, v in start.hyperparameters.items()},
    }
    mlp = {k.removeprefix("mlp."): v for k, v in tensors.items() if k.startswith("mlp.")}
    method = "behavioural-mlp" if options.hidden > 0 else "behavioural"
    return FittedMap(
        method,
        tensors["weight"],
        tensors["bias"],
        hyper,
        validation,
        mlp,
        time.perf_counter() - started,
    )
