"""Pure checks of request fields against a model's facts, run once before any model runs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from patchscope.engine.errors import InvalidArgument

PLACEHOLDER = "{}"


@dataclass(frozen=True)
class ModelFacts:
    """What validation needs to know about a model, without touching its weights."""

    model_id: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_positions: int | None = None


def check_prompt(field: str, prompt: str) -> None:
    """A prompt must contain at least one non-space character."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidArgument(field, "must be a non-empty string", value=prompt)


def check_layers(field: str, layers: Sequence[int], facts: ModelFacts) -> list[int]:
    """Layers are 0-based block indices; negative ones count from the end, like Python indices."""
    if len(layers) == 0:
        raise InvalidArgument(field, "must name at least one layer", limit=f"0..{facts.num_layers - 1}")
    resolved = []
    for layer in layers:
        if not -facts.num_layers <= layer < facts.num_layers:
            raise InvalidArgument(
                field,
                f"layer out of range for {facts.model_id} ({facts.num_layers} layers)",
                limit=f"-{facts.num_layers}..{facts.num_layers - 1}",
                value=layer,
            )
        resolved.append(layer % facts.num_layers)
    return resolved


def check_positions(field: str, positions: Sequence[int], num_tokens: int) -> list[int]:
    """Positions are absolute token indices (BOS counted); negative ones count from the end."""
    if len(positions) == 0:
        raise InvalidArgument(
            field, "must name at least one position", limit=f"-{num_tokens}..{num_tokens - 1}"
        )
    resolved = []
    for position in positions:
        if not -num_tokens <= position < num_tokens:
            raise InvalidArgument(
                field,
                f"position out of range for a prompt of {num_tokens} tokens",
                limit=f"-{num_tokens}..{num_tokens - 1}",
                value=position,
            )
        resolved.append(position % num_tokens)
    return resolved


def check_template(field: str, template: str) -> tuple[str, str]:
    """A template holds the placeholder `{}` exactly once; returns the text before and after it."""
    if not isinstance(template, str) or template.count(PLACEHOLDER) != 1:
        count = template.count(PLACEHOLDER) if isinstance(template, str) else 0
        raise InvalidArgument(
            field, f"must contain the placeholder {PLACEHOLDER} exactly once (found {count})", value=template
        )
    prefix, suffix = template.split(PLACEHOLDER)
    return prefix, suffix


def check_vector(field: str, vector: torch.Tensor, facts: ModelFacts) -> None:
    """A patch vector must be one finite hidden state of the target's width."""
    if vector.ndim != 1 or vector.shape[0] != facts.hidden_size:
        raise InvalidArgument(
            field,
            f"vector has the wrong shape for {facts.model_id}",
            limit=f"[{facts.hidden_size}]",
            value=list(vector.shape),
        )
    if not vector.is_floating_point():
        raise InvalidArgument(field, "vector must be floating point", value=str(vector.dtype))
    if not bool(torch.isfinite(vector).all()):
        raise InvalidArgument(field, "vector contains NaN or Inf", limit="finite values")


def check_positive(field: str, value: int, maximum: int) -> None:
    """Counts such as max_new_tokens are 1..maximum."""
    if not isinstance(value, int) or not 1 <= value <= maximum:
        raise InvalidArgument(field, "out of range", limit=f"1..{maximum}", value=value)


def check_probability(field: str, value: float) -> None:
    """top_p lies in (0, 1]."""
    if not (isinstance(value, float | int) and math.isfinite(value) and 0.0 < value <= 1.0):
        raise InvalidArgument(field, "out of range", limit="(0, 1]", value=value)
