"""Paired ratios of two ways of doing the same work: one summary line every benchmark prints alike."""

from __future__ import annotations

import math
import statistics


def interval(ratios: list[float], digits: int = 3) -> str:
    """Geometric mean of paired ratios with a 95 % t interval on their logs, and n.

    Why logs: a ratio and its inverse are equally far from 1, and timing noise is multiplicative.
    """
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    half = 2.0 * statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else float("nan")
    low, high = math.exp(mean - half), math.exp(mean + half)
    return f"{math.exp(mean):.{digits}f} [{low:.{digits}f}, {high:.{digits}f}] (n={len(logs)})"
