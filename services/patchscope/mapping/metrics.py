"""Held-out quality of a map: how much of the target states' variance it explains, and how well it aims."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class MapMetrics:
    """Variance-weighted R² (pooled over dimensions), mean per-dimension R², mean cosine and MSE."""

    r2: float
    r2_mean_dim: float
    cosine: float
    mse: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def evaluate(predicted: torch.Tensor, actual: torch.Tensor) -> MapMetrics:
    """Metrics of `predicted` against `actual` (both [N, d]); means are the held-out set's own."""
    predicted, actual = predicted.double(), actual.double()
    residual = ((actual - predicted) ** 2).sum(dim=0)  # [d]
    total = ((actual - actual.mean(dim=0)) ** 2).sum(dim=0)  # [d]
    cosine = torch.nn.functional.cosine_similarity(predicted, actual, dim=-1).mean()
    return MapMetrics(
        r2=float(1 - residual.sum() / total.sum()),
        r2_mean_dim=float((1 - residual / total.clamp_min(1e-12)).mean()),
        cosine=float(cosine),
        mse=float(residual.sum() / actual.numel()),
    )
