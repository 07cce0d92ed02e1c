"""What a caller asks for, as domain objects (proto messages are converted in the `wire` package)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from patchscope.engine.generation import GenerationConfig
from patchscope.engine.presets import DEFAULT_PRESET, DEFAULT_TOP_K

AUTO = "auto"  # the mapping choice: the registered map of each layer pair with the best held-out R²


@dataclass(frozen=True)
class Site:
    """Where a state comes from and where it goes: source position and layer, target layer."""

    position: int
    source_layer: int
    target_layer: int


@dataclass(frozen=True)
class TargetSpec:
    """How the target verbalises the states: model, prompt, layers, mapping and decoding."""

    model: str
    preset: str = DEFAULT_PRESET
    template: str | None = None  # None: the preset's
    # Empty: the source layer itself (same model) or the layer at the same relative depth (cross-model);
    # one layer for all sites, or one per source layer.
    layers: tuple[int, ...] = ()
    mapping: str = AUTO
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    top_k: int = DEFAULT_TOP_K
    # The unpatched control row and the signals derived from it (events.Control); on by default.
    controls: bool = True
    # Also one row per target layer with that layer's mean state patched in (events.Control.mean_state_*).
    mean_state_control: bool = False


@dataclass(frozen=True)
class ExplainRequest:
    """One source prompt: its states at `layers` × `positions` are explained through `target`."""

    source: str
    prompt: str
    layers: tuple[int, ...]
    target: TargetSpec
    positions: tuple[int, ...] = (-1,)


@dataclass(frozen=True)
class ActivationsRequest:
    """States captured elsewhere (`states` [n, d], float32), with their provenance, one row per site.

    `layers`, `positions` and `tokens` hold one entry per row or one for all; positions and tokens may be
    empty (unknown).
    """

    source: str
    states: torch.Tensor
    target: TargetSpec
    layers: tuple[int, ...]
    positions: tuple[int, ...] = ()
    tokens: tuple[str, ...] = ()
    fingerprint: str = ""  # of the model the states came from; a mismatch is reported, not refused
