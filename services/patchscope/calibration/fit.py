"""Logistic regression on standardised signals, and the figures that say whether it can be trusted."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Logistic:
    """p = σ(w · (x − mean) / std + b)."""

    weight: torch.Tensor  # [F]
    bias: torch.Tensor  # [1]
    mean: torch.Tensor  # [F]
    std: torch.Tensor  # [F]

    def probability(self, x: torch.Tensor) -> torch.Tensor:
        """[n, F] -> [n] in (0, 1)."""
        z = (x.double() - self.mean) / self.std
        return torch.sigmoid(z @ self.weight + self.bias)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2, seed: int = 0) -> Logistic:
    """Maximum likelihood with a small L2 penalty (separable data would otherwise diverge); deterministic."""
    torch.manual_seed(seed)
    x, y = x.double(), y.double()
    mean = x.mean(0)
    std = x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def loss_fn() -> torch.Tensor:
        optimiser.zero_grad()
        logits = z @ weight + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + l2 * (weight**2).sum()
        loss.backward()
        return loss

    optimiser.step(loss_fn)
    return Logistic(weight.detach(), bias.detach(), mean, std)


def auroc(p: torch.Tensor, y: torch.Tensor) -> float:
    """The probability that a random right answer scores above a random wrong one (ties count ½)."""
    pos, neg = p[y > 0.5], p[y <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + 0.5 * ties)


@dataclass(frozen=True)
class Bin:
    """One reliability-table row: predictions in [low, high)."""

    low: float
    high: float
    count: int
    mean_confidence: float
    accuracy: float


def reliability(p: torch.Tensor, y: torch.Tensor, bins: int = 10) -> tuple[list[Bin], float]:
    """Equal-width bins and the expected calibration error Σ (n_b / n)·|accuracy_b − confidence_b|."""
    rows, ece = [], 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = (p >= low) & ((p < high) if b < bins - 1 else (p <= high))
        count = int(inside.sum())
        if count == 0:
            rows.append(Bin(low, high, 0, float("nan"), float("nan")))
            continue
        confidence, accuracy = float(p[inside].mean()), float(y[inside].double().mean())
        rows.append(Bin(low, high, count, confidence, accuracy))
        ece += count / len(p) * abs(accuracy - confidence)
    return rows, ece
