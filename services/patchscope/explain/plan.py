"""Planning: a request and both models' facts become a validated plan, before any model runs.

Pure: no model, no file, no network. Everything a request can get wrong is found here and raised as one
`InvalidArgument` naming the field, the limit and the value, so the service rejects bad input before a
model spends a step on it. The mapping choice is injected (`MappingResolver`), so planning is the same for
the service (registry on a volume) and the CLI (registry on disk) and tests use a fake.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from patchscope.engine.errors import IncompatibleModels, InvalidArgument
from patchscope.engine.generation import GenerationConfig
from patchscope.engine.presets import Preset, get_preset, resolve_template, with_default_stop
from patchscope.engine.validation import (
    ModelFacts,
    check_layers,
    check_positions,
    check_positive,
)
from patchscope.explain.checks import (
    check_count,
    check_decoding,
    check_mapping_id,
    check_prompt_size,
    check_sites,
    check_token_count,
    check_token_steps,
    per_row,
)
from patchscope.explain.limits import Limits
from patchscope.explain.request import AUTO, ActivationsRequest, ExplainRequest, Site, TargetSpec
from patchscope.explain.signals import Calibrator
from patchscope.mapping.pipeline import depth_proportional


@dataclass(frozen=True)
class ModelInfo:
    """What planning and the events need to know of a hosted model, without its weights."""

    id: str
    fingerprint: str
    facts: ModelFacts
    dtype: str = "float32"
    # Typical L2 norm of each layer's states (warm-up text), reported beside each mapped state; may be empty.
    layer_norms: tuple[float, ...] = ()
    # The most the tokenizer's normaliser multiplies a text's UTF-8 bytes by (engine/template.py).
    normaliser_growth: int = 1
    # Each layer's mean state over the warm-up text ([d] float32; engine/layer_stats.py); may be empty.
    layer_means: tuple[torch.Tensor, ...] = ()


class Mapping(Protocol):
    """f from source states at ℓ to target states at ℓ*; `mapping.resolve.MappingSet` is the real one."""

    def __call__(self, state: torch.Tensor, source_layer: int, target_layer: int) -> torch.Tensor: ...

    def describe(self, source_layer: int, target_layer: int) -> tuple[str, float | None]: ...


# (source, target, layer pairs, choice) -> the mapping of every pair; raises when one is missing.
MappingResolver = Callable[[ModelInfo, ModelInfo, Sequence[tuple[int, int]], str], Mapping]


def no_mappings(
    source: ModelInfo, target: ModelInfo, pairs: Sequence[tuple[int, int]], choice: str
) -> Mapping:
    """The resolver where no registry is at hand: only same-model requests can be planned."""
    raise IncompatibleModels(
        f"source {source.id} and target {target.id} are different models: a cross-model explanation "
        "needs a mapping from source states to target states (a registry), or use one model as both"
    )


@dataclass(frozen=True)
class Plan:
    """A validated request: the sites in order, how to verbalise them and the map to use."""

    source: ModelInfo
    target: ModelInfo
    sites: tuple[Site, ...]
    source_tokens: tuple[str, ...]  # one per site
    preset: Preset
    template: str
    generation: GenerationConfig
    top_k: int
    mapping: Mapping | None  # None: same model, the state goes in as it is
    prompt: str | None = None  # None: the states came with the request
    provenance_mismatch: bool = False
    controls: bool = True  # the unpatched control (a row, or the lens's unpatched reading) and the signals
    calibrator: Calibrator | None = None  # set by the pipeline when one is registered
    mean_state_control: bool = False  # one more row per target layer: its mean state patched in

    @property
    def same_model(self) -> bool:
        return self.source.fingerprint == self.target.fingerprint

    @property
    def mean_state_layers(self) -> list[int]:
        """The target layers of the mean-state rows, in row order (none without the control)."""
        return sorted({s.target_layer for s in self.sites}) if self.mean_state_control else []

    def rows(self, vectors: Sequence[torch.Tensor]) -> tuple[list[int], list[torch.Tensor]]:
        """Target layer and vector of every patched row: the sites', then each mean-state layer's mean."""
        means = self.mean_state_layers
        layers = [s.target_layer for s in self.sites] + means
        return layers, [*vectors, *(self.target.layer_means[layer] for layer in means)]

    def mean_state_row(self, site: Site) -> int:
        """The row (or lens reading) of `site`'s mean-state control, after the sites' own."""
        return len(self.sites) + self.mean_state_layers.index(site.target_layer)


@dataclass(frozen=True)
class _Verbalise:
    preset: Preset
    template: str
    generation: GenerationConfig
    top_k: int


def _verbalise(spec: TargetSpec, limits: Limits) -> _Verbalise:
    preset = get_preset(spec.preset)
    template = resolve_template(preset, spec.template)
    if len(template) > limits.max_template_chars:
        raise InvalidArgument(
            "target.template",
            "too long",
            limit=f"<= {limits.max_template_chars} characters",
            value=len(template),
        )
    # The target's tokens, bounded without its tokenizer: each token covers at least one UTF-8 byte.
    size = len(template.encode("utf-8", "surrogatepass"))
    if size > limits.max_template_bytes:
        raise InvalidArgument(
            "target.template",
            "too many tokens",
            limit=f"<= {limits.max_template_bytes} UTF-8 bytes (each token is at least one)",
            value=size,
        )
    check_mapping_id(spec.mapping, limits)
    check_count("target.layers", spec.layers, limits.max_layers, "layers")
    check_decoding(spec.generation)
    spec.generation.validate(prefix="target.generation.")
    if spec.generation.max_new_tokens > limits.max_new_tokens:
        raise InvalidArgument(
            "target.generation.max_new_tokens",
            "too many new tokens",
            limit=f"<= {limits.max_new_tokens}",
            value=spec.generation.max_new_tokens,
        )
    check_positive("target.top_k", spec.top_k, limits.max_top_k)
    # The preset's default stop (presets.py: only where it leaves every answer unchanged), after the
    # request's own options were checked as the caller sent them.
    return _Verbalise(preset, template, with_default_stop(preset, spec.generation), spec.top_k)


def _target_layers(spec: TargetSpec, source: ModelInfo, target: ModelInfo, layers: list[int]) -> list[int]:
    """One target layer per source layer (already resolved to 0-based)."""
    if not spec.layers:
        if source.fingerprint == target.fingerprint:
            return list(layers)
        L, L_star = source.facts.num_layers, target.facts.num_layers
        return [depth_proportional(layer, L, L_star) for layer in layers]
    resolved = check_layers("target.layers", list(spec.layers), target.facts)
    if len(resolved) == 1:
        return resolved * len(layers)
    if len(resolved) != len(layers):
        raise InvalidArgument(
            "target.layers",
            "must name one layer, or one per source layer",
            limit=f"1 or {len(layers)} entries",
            value=len(resolved),
        )
    return resolved


def _mapping(
    resolve: MappingResolver, source: ModelInfo, target: ModelInfo, spec: TargetSpec, sites: Sequence[Site]
) -> Mapping | None:
    if source.fingerprint == target.fingerprint and spec.mapping == AUTO:
        return None  # the paper's same-model Patchscope: the state goes in as it is
    if not spec.mapping:
        raise InvalidArgument("target.mapping", "must be 'auto' or a mapping id", value=spec.mapping)
    pairs = sorted({(s.source_layer, s.target_layer) for s in sites})
    return resolve(source, target, pairs, spec.mapping)


def _check_controls(spec: TargetSpec, target: ModelInfo, sites: Sequence[Site]) -> int:
    """The rows the controls add: the unpatched one, and one per target layer for the mean-state control."""
    if not spec.mean_state_control:
        return int(spec.controls)
    if not spec.controls:
        raise InvalidArgument(
            "target.mean_state_control", "needs the controls on (target.controls)", value="controls off"
        )
    layers = {s.target_layer for s in sites}
    if len(target.layer_means) != target.facts.num_layers:
        raise InvalidArgument(
            "target.mean_state_control",
            f"target {target.id} has no mean states (its warm-up did not record them)",
            value=True,
        )
    return 1 + len(layers)


def _check_work(sites: int, controls: int, how: _Verbalise, target: ModelInfo, limits: Limits) -> None:
    """The token-step budget of a generating preset (the logit lens decodes nothing)."""
    if how.preset.generates:
        rows = sites + controls
        new_tokens = how.generation.max_new_tokens
        growth = target.normaliser_growth
        check_token_steps(rows, how.template, how.preset.filler, new_tokens, limits, growth)


def plan_explain(
    request: ExplainRequest,
    source: ModelInfo,
    target: ModelInfo,
    tokens: Sequence[str],
    limits: Limits,
    resolve: MappingResolver,
) -> Plan:
    """Validate `request` against both models and the limits; `tokens` is the source prompt, tokenised.

    Sites are layer-major: every position of the first layer, then the next layer.
    """
    check_prompt_size("prompt", request.prompt, limits)
    check_token_count("prompt", len(tokens), limits)
    how = _verbalise(request.target, limits)
    check_count("layers", request.layers, limits.max_layers, "layers")
    check_count("positions", request.positions, limits.max_sites, "positions")
    layers = check_layers("layers", list(request.layers), source.facts)
    positions = check_positions("positions", list(request.positions) or [-1], len(tokens))
    check_sites(len(layers) * len(positions), limits, "layers × positions")
    target_layers = _target_layers(request.target, source, target, layers)
    sites = tuple(Site(p, s, t) for s, t in zip(layers, target_layers, strict=True) for p in positions)
    _check_work(len(sites), _check_controls(request.target, target, sites), how, target, limits)
    return Plan(
        source=source,
        target=target,
        sites=sites,
        source_tokens=tuple(tokens[s.position] for s in sites),
        preset=how.preset,
        template=how.template,
        generation=how.generation,
        top_k=how.top_k,
        mapping=_mapping(resolve, source, target, request.target, sites),
        prompt=request.prompt,
        controls=request.target.controls,
        mean_state_control=request.target.mean_state_control,
    )


def plan_activations(
    request: ActivationsRequest,
    source: ModelInfo,
    target: ModelInfo,
    limits: Limits,
    resolve: MappingResolver,
) -> Plan:
    """Validate states captured elsewhere and their provenance; no source pass will run."""
    states = request.states
    if states.ndim != 2 or states.shape[1] != source.facts.hidden_size:
        raise InvalidArgument(
            "safetensors.shape",
            f"must be [sites, hidden] with hidden = {source.id}'s hidden size",
            limit=f"[n, {source.facts.hidden_size}]",
            value=list(states.shape),
        )
    n = states.shape[0]
    check_sites(n, limits, "safetensors.shape[0]")
    how = _verbalise(request.target, limits)
    for field, values in (
        ("provenance.layers", request.layers),
        ("provenance.positions", request.positions),
        ("provenance.tokens", request.tokens),
    ):
        check_count(field, values, limits.max_sites, "entries")
    layers = per_row("provenance.layers", request.layers, n, required=True)
    layers = check_layers("provenance.layers", layers, source.facts)
    positions = per_row("provenance.positions", request.positions, n, default=-1)
    for k, position in enumerate(positions):
        if (
            not isinstance(position, int)
            or position < -limits.max_prompt_tokens
            or position >= limits.max_prompt_tokens
        ):
            raise InvalidArgument(
                f"provenance.positions[{k}]",
                "out of range",
                limit=f"-{limits.max_prompt_tokens}..{limits.max_prompt_tokens - 1}",
                value=position,
            )
    tokens = per_row("provenance.tokens", request.tokens, n, default="")
    for k, token in enumerate(tokens):
        if len(token) > limits.max_token_chars:
            raise InvalidArgument(
                f"provenance.tokens[{k}]",
                "too long",
                limit=f"<= {limits.max_token_chars} characters",
                value=len(token),
            )
    # Counted once per distinct string: one token for all rows is echoed n times but sent once.
    size = sum(len(t.encode("utf-8", "surrogatepass")) for t in request.tokens)
    if size > limits.max_provenance_bytes:
        raise InvalidArgument(
            "provenance.tokens",
            "too large",
            limit=f"<= {limits.max_provenance_bytes} UTF-8 bytes in all",
            value=size,
        )
    if request.target.layers:
        target_layers = check_layers("target.layers", list(request.target.layers), target.facts)
        target_layers = per_row("target.layers", target_layers, n, required=True)
    else:
        target_layers = _target_layers(request.target, source, target, layers)
    sites = tuple(Site(p, s, t) for p, s, t in zip(positions, layers, target_layers, strict=True))
    _check_work(len(sites), _check_controls(request.target, target, sites), how, target, limits)
    return Plan(
        source=source,
        target=target,
        sites=sites,
        source_tokens=tuple(tokens),
        preset=how.preset,
        template=how.template,
        generation=how.generation,
        top_k=how.top_k,
        mapping=_mapping(resolve, source, target, request.target, sites),
        controls=request.target.controls,
        mean_state_control=request.target.mean_state_control,
        provenance_mismatch=request.fingerprint != source.fingerprint,
    )


def plan_extract(
    source: ModelInfo,
    prompt: str,
    layers: Sequence[int],
    positions: Sequence[int],
    tokens: Sequence[str],
    limits: Limits,
) -> tuple[list[int], list[int]]:
    """The resolved layers and positions of an ExtractHiddenStates call, within the limits."""
    check_prompt_size("prompt", prompt, limits)
    check_token_count("prompt", len(tokens), limits)
    check_count("layers", layers, limits.max_layers, "layers")
    check_count("positions", positions, limits.max_prompt_tokens, "positions")
    resolved_layers = check_layers("layers", list(layers), source.facts)
    repeated = sorted({layer for layer in resolved_layers if resolved_layers.count(layer) > 1})
    if repeated:  # each layer is a whole tensor on the wire: a repeat is the same bytes again
        raise InvalidArgument(
            "layers", "names a layer more than once", limit="distinct layers", value=repeated[:8]
        )
    resolved_positions = check_positions("positions", list(positions) or [-1], len(tokens))
    size = len(resolved_layers) * len(resolved_positions) * source.facts.hidden_size * 4
    if size > limits.max_extract_bytes:
        raise InvalidArgument(
            "layers × positions",
            "the states asked for are too large",
            limit=f"<= {limits.max_extract_bytes} bytes of float32",
            value=size,
        )
    return resolved_layers, resolved_positions
