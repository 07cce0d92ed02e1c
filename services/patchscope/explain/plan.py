"""Planning: a request and both models' facts become a validated plan, before any model runs.

Pure: no model, no file, no network. Everything a request can get wrong is found here and raised as one
`InvalidArgument` naming the field, the limit and the value, so the service rejects bad input before a
model spends a step on it. The mapping choice is injected (`MappingResolver`), so planning is the same for
the service (registry on a volume) and the CLI (registry on disk) and tests use a fake.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from patchscope.engine.errors import IncompatibleModels, InvalidArgument
from patchscope.engine.generation import MAX_STOP, MAX_STOP_CHARS, GenerationConfig
from patchscope.engine.presets import Preset, get_preset, resolve_template
from patchscope.engine.validation import (
    ModelFacts,
    check_layers,
    check_positions,
    check_positive,
    check_prompt,
)
from patchscope.explain.limits import MAX_TEMPERATURE, MIN_TEMPERATURE, Limits
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
    controls: bool = True  # run the unpatched control row and report the signals
    calibrator: Calibrator | None = None  # set by the pipeline when one is registered

    @property
    def same_model(self) -> bool:
        return self.source.fingerprint == self.target.fingerprint


def check_prompt_size(field: str, prompt: str, limits: Limits) -> None:
    """The prompt's characters, checked before it is tokenised."""
    check_prompt(field, prompt)
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidArgument(
            field, "too long", limit=f"<= {limits.max_prompt_chars} characters", value=len(prompt)
        )


def check_token_count(field: str, num_tokens: int, limits: Limits) -> None:
    if num_tokens > limits.max_prompt_tokens:
        raise InvalidArgument(
            field, "too many tokens", limit=f"<= {limits.max_prompt_tokens} tokens", value=num_tokens
        )


@dataclass(frozen=True)
class _Verbalise:
    preset: Preset
    template: str
    generation: GenerationConfig
    top_k: int


def check_count(field: str, values: Sequence, maximum: int, what: str) -> None:
    """A list's length, checked before its entries are looked at (a long list costs the ingress time)."""
    if len(values) > maximum:
        raise InvalidArgument(field, f"too many {what}", limit=f"<= {maximum}", value=len(values))


def _check_decoding(generation: GenerationConfig) -> None:
    """Finite and in range, or sampling would make NaN probabilities on the target."""
    temperature = generation.temperature
    if not (
        isinstance(temperature, float | int)
        and math.isfinite(temperature)
        and (temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE)
    ):
        raise InvalidArgument(
            "target.generation.temperature",
            "out of range",
            limit=f"0 (greedy) or {MIN_TEMPERATURE}..{MAX_TEMPERATURE:g}",
            value=temperature,
        )


def _check_mapping_id(mapping: str, limits: Limits) -> None:
    """A mapping id names a registry file: bounded, printable, no path separators."""
    size = len(mapping.encode("utf-8", "surrogatepass"))
    if size > limits.max_mapping_id_bytes:
        raise InvalidArgument(
            "target.mapping", "too long", limit=f"<= {limits.max_mapping_id_bytes} bytes", value=size
        )
    if not mapping.isprintable() or any(c in mapping for c in "/\\"):
        raise InvalidArgument(
            "target.mapping",
            "must be printable, without path separators",
            limit="'auto' or a mapping id",
            value=mapping[:64],
        )


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
    _check_mapping_id(spec.mapping, limits)
    check_count("target.layers", spec.layers, limits.max_layers, "layers")
    _check_decoding(spec.generation)
    _check_stop(spec.generation)
    spec.generation.validate()
    if spec.generation.max_new_tokens > limits.max_new_tokens:
        raise InvalidArgument(
            "target.generation.max_new_tokens",
            "too many new tokens",
            limit=f"<= {limits.max_new_tokens}",
            value=spec.generation.max_new_tokens,
        )
    check_positive("target.top_k", spec.top_k, limits.max_top_k)
    return _Verbalise(preset, template, spec.generation, spec.top_k)


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


def check_token_steps(rows: int, template: str, filler: str, new_tokens: int, limits: Limits) -> None:
    """The work of one request within the budget; a template's tokens bounded by its UTF-8 bytes + BOS."""
    tokens = len(template.encode("utf-8", "surrogatepass")) + len(filler.encode("utf-8")) + 1
    steps = rows * (tokens + new_tokens)
    if steps > limits.max_token_steps:
        raise InvalidArgument(
            "target",
            "too much work for one request: rows (sites + control) × (template tokens + max_new_tokens)",
            limit=f"<= {limits.max_token_steps} token-steps",
            value=steps,
        )


def _check_stop(generation: GenerationConfig) -> None:
    for k, text in enumerate(generation.stop):
        if not isinstance(text, str) or not text or len(text) > MAX_STOP_CHARS:
            raise InvalidArgument(
                f"target.generation.stop[{k}]",
                "must be a non-empty string",
                limit=f"1..{MAX_STOP_CHARS} characters",
                value=len(text) if isinstance(text, str) else type(text).__name__,
            )
    if len(generation.stop) > MAX_STOP:
        raise InvalidArgument(
            "target.generation.stop",
            "too many stop sequences",
            limit=f"<= {MAX_STOP}",
            value=len(generation.stop),
        )


def _check_work(sites: int, controls: bool, how: _Verbalise, limits: Limits) -> None:
    """The token-step budget of a generating preset (the logit lens decodes nothing)."""
    if how.preset.generates:
        rows = sites + controls
        check_token_steps(rows, how.template, how.preset.filler, how.generation.max_new_tokens, limits)


def _check_sites(count: int, limits: Limits, field: str) -> None:
    if count > limits.max_sites:
        raise InvalidArgument(field, "too many sites", limit=f"<= {limits.max_sites}", value=count)


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
    _check_sites(len(layers) * len(positions), limits, "layers × positions")
    target_layers = _target_layers(request.target, source, target, layers)
    sites = tuple(Site(p, s, t) for s, t in zip(layers, target_layers, strict=True) for p in positions)
    controls = request.target.controls and how.preset.generates
    _check_work(len(sites), controls, how, limits)
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
        controls=request.target.controls and how.preset.generates,
    )


def _per_row(field: str, values: Sequence, n: int, *, default=None, required: bool = False) -> list:
    """One value per row: n values, one value for all, or (when not required) none for the default."""
    if len(values) == n:
        return list(values)
    if len(values) == 1:
        return list(values) * n
    if not values and not required:
        return [default] * n
    raise InvalidArgument(
        field, "must have one entry, or one per row of the states", limit=f"1 or {n}", value=len(values)
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
    _check_sites(n, limits, "safetensors.shape[0]")
    how = _verbalise(request.target, limits)
    for field, values in (
        ("provenance.layers", request.layers),
        ("provenance.positions", request.positions),
        ("provenance.tokens", request.tokens),
    ):
        check_count(field, values, limits.max_sites, "entries")
    layers = _per_row("provenance.layers", request.layers, n, required=True)
    layers = check_layers("provenance.layers", layers, source.facts)
    positions = _per_row("provenance.positions", request.positions, n, default=-1)
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
    tokens = _per_row("provenance.tokens", request.tokens, n, default="")
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
        target_layers = _per_row("target.layers", target_layers, n, required=True)
    else:
        target_layers = _target_layers(request.target, source, target, layers)
    sites = tuple(Site(p, s, t) for p, s, t in zip(positions, layers, target_layers, strict=True))
    _check_work(len(sites), request.target.controls and how.preset.generates, how, limits)
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
        controls=request.target.controls and how.preset.generates,
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
