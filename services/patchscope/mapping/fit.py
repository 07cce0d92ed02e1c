"""Fitting maps from source states to target states.

`affine`: ridge least squares with bias in closed form. Each source layer's Gram matrix is
eigendecomposed once; every target layer paired with it and every candidate regularisation then costs one
small matrix product, and the regularisation with the best validation R² wins.
`learned`: the ridge solution plus a one-hidden-layer MLP on the residual, trained with Adam on MSE and
stopped early on validation (so it starts where `affine` ends and keeps only what held-out data confirms).
With a `KLTerm` (as tuned-lens trains its lenses) the loss adds the KL divergence between what the target
reads off the true state and off the mapped one through its own final norm and head: MSE weighs
directions by their variance, while the identity of a word lives in low-variance directions the head
separates.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from patchscope.mapping.metrics import MapMetrics, evaluate

RIDGE_SCALES = tuple(10.0 ** (k / 2) for k in range(-12, 3))  # × mean eigenvalue of the Gram matrix


@dataclass
class FittedMap:
    """Weights of one map, `y = x @ weight + bias (+ mlp(x))`, with how it was chosen."""

    method: str
    weight: torch.Tensor  # [d_s, d_t]
    bias: torch.Tensor  # [d_t]
    hyperparameters: dict[str, float | int | str]
    validation: MapMetrics
    mlp: dict[str, torch.Tensor] = field(default_factory=dict)  # w1 [d_s, h], b1 [h], w2 [h, d_t], b2 [d_t]
    seconds: float = 0.0

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias, **{f"mlp.{k}": v for k, v in self.mlp.items()}}


def apply(tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The map stored in `tensors` applied to `x` ([..., d_s]) in float32."""
    x = x.float()
    y = x @ tensors["weight"] + tensors["bias"]
    if "mlp.w1" in tensors:
        y = (
            y
            + torch.nn.functional.gelu(x @ tensors["mlp.w1"] + tensors["mlp.b1"]) @ tensors["mlp.w2"]
            + tensors["mlp.b2"]
        )
    return y


@dataclass
class RidgeBasis:
    """The eigendecomposition of one source layer's centred Gram matrix, shared by all its target layers.

    The Gram matrix and its eigenvectors are float64 (they are small and conditioning matters); the
    N-row products run in float32, which halves the all-pairs solve time on a CPU.
    """

    x_mean: torch.Tensor  # [d_s] float64
    eigenvalues: torch.Tensor  # [d_s] float64
    eigenvectors: torch.Tensor  # [d_s, d_s] float64
    centred: torch.Tensor  # [N, d_s] float32

    @classmethod
    def of(cls, x: torch.Tensor) -> RidgeBasis:
        x64 = x.double()
        x_mean = x64.mean(dim=0)
        centred = x64 - x_mean
        eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred)
        return cls(x_mean, eigenvalues.clamp_min(0), eigenvectors, centred.float())


def fit_affine(
    basis: RidgeBasis, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, scales=RIDGE_SCALES
) -> FittedMap:
    """Ridge with bias; the regularisation is chosen on validation R²."""
    started = time.perf_counter()
    y_mean = y.double().mean(dim=0)
    cross = basis.centred.T @ (y.float() - y_mean.float())  # [d_s, d_t]
    projected = basis.eigenvectors.T @ cross.double()  # [d_s, d_t] in the eigenbasis
    val_projected = ((x_val.double() - basis.x_mean) @ basis.eigenvectors).float()  # [N_val, d_s]
    scale = float(basis.eigenvalues.mean())
    best_scale, metrics = scales[0], None
    for s in scales:
        coef = (projected / (basis.eigenvalues + s * scale)[:, None]).float()  # [d_s, d_t]
        candidate = evaluate(val_projected @ coef + y_mean.float(), y_val)
        if metrics is None or candidate.r2 > metrics.r2:
            best_scale, metrics = s, candidate
    assert metrics is not None
    alpha = best_scale * scale
    weight = basis.eigenvectors @ (projected / (basis.eigenvalues + alpha)[:, None])  # [d_s, d_t]
    bias = y_mean - basis.x_mean @ weight
    hyper = {"alpha": alpha, "alpha_scale": best_scale}
    return FittedMap(
        "affine", weight.float(), bias.float(), hyper, metrics, seconds=time.perf_counter() - started
    )


@dataclass(frozen=True)
class KLTerm:
    """KL(lens(true target state) ‖ lens(mapped state)), weighted, added to the learned map's loss.

    `lens` maps target states ([n, d_t]) to logits over the vocabulary it was built for; gradients flow
    through it to the map only (its own weights are frozen).
    """

    lens: Callable[[torch.Tensor], torch.Tensor]
    weight: float = 1.0
    vocabulary: int = 0  # size of the lens's vocabulary, recorded in the artefact

    def __call__(self, mapped: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            reference = torch.log_softmax(self.lens(true).float(), dim=-1)
        predicted = torch.log_softmax(self.lens(mapped).float(), dim=-1)
        return torch.nn.functional.kl_div(predicted, reference, log_target=True, reduction="batchmean")


def fit_learned(
    start: FittedMap,
    x: torch.Tensor,
    y: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    *,
    hidden: int = 1024,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 512,
    max_epochs: int = 200,
    patience: int = 8,
    seed: int = 0,
    kl: KLTerm | None = None,
    on_epoch: Callable[[int, float], None] = lambda _e, _r2: None,
) -> FittedMap:
    """Ridge start plus an MLP residual, Adam on MSE (+ `kl`), early stopping on the validation objective.

    The objective is R² alone without `kl`; with it, (1 − R²) + weight · KL on validation, lower is better.
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    d_s, d_t = start.weight.shape
    weight = torch.nn.Parameter(start.weight.clone())
    bias = torch.nn.Parameter(start.bias.clone())
    w1 = torch.nn.Parameter(torch.randn(d_s, hidden) / (d_s**0.5 * x.std()))
    b1 = torch.nn.Parameter(torch.zeros(hidden))
    w2 = torch.nn.Parameter(torch.zeros(hidden, d_t))  # zero: training starts exactly at the ridge map
    b2 = torch.nn.Parameter(torch.zeros(d_t))
    params = [weight, bias, w1, b1, w2, b2]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    target_var = float(y.var(dim=0).sum())

    def current() -> dict[str, torch.Tensor]:
        return {"weight": weight, "bias": bias, "mlp.w1": w1, "mlp.b1": b1, "mlp.w2": w2, "mlp.b2": b2}

    def objective(metrics: MapMetrics, mapped: torch.Tensor) -> float:
        """Validation objective, lower is better."""
        if kl is None:
            return -metrics.r2
        chunks = range(0, y_val.shape[0], batch_size)
        divergence = (
            sum(
                float(kl(mapped[i : i + batch_size], y_val[i : i + batch_size]))
                * len(y_val[i : i + batch_size])
                for i in chunks
            )
            / y_val.shape[0]
        )
        return (1 - metrics.r2) + kl.weight * divergence

    best_state = {k: v.detach().clone() for k, v in current().items()}
    with torch.no_grad():
        start_mapped = apply(current(), x_val)
    best_metrics, stale, epochs = start.validation, 0, 0
    best_objective = objective(best_metrics, start_mapped)
    for epoch in range(max_epochs):
        epochs = epoch + 1
        order = torch.randperm(x.shape[0])
        for begin in range(0, x.shape[0], batch_size):
            idx = order[begin : begin + batch_size]
            mapped = apply(current(), x[idx])
            loss = ((mapped - y[idx]) ** 2).sum(dim=-1).mean() / target_var
            if kl is not None:
                loss = loss + kl.weight * kl(mapped, y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            mapped_val = apply(current(), x_val)
            metrics = evaluate(mapped_val, y_val)
            value = objective(metrics, mapped_val)
        on_epoch(epochs, metrics.r2)
        if value < best_objective - 1e-5:
            best_metrics, best_objective, stale = metrics, value, 0
            best_state = {k: v.detach().clone() for k, v in current().items()}
        else:
            stale += 1
            if stale >= patience:
                break
    mlp = {k.removeprefix("mlp."): v for k, v in best_state.items() if k.startswith("mlp.")}
    hyper = {
        "hidden": hidden,
        "lr": lr,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "epochs": epochs,
        "patience": patience,
        "init": "affine",
        **({"kl_weight": kl.weight, "kl_vocabulary": kl.vocabulary} if kl is not None else {}),
        **{f"affine_{k}": v for k, v in start.hyperparameters.items()},
    }
    return FittedMap(
        "learned",
        best_state["weight"],
        best_state["bias"],
        hyper,
        best_metrics,
        mlp,
        time.perf_counter() - started,
    )


def identity_map(d: int) -> FittedMap:
    """The same-model map: the state itself."""
    nan = float("nan")
    return FittedMap("identity", torch.eye(d), torch.zeros(d), {}, MapMetrics(nan, nan, nan, nan))
