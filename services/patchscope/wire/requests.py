"""Requests: `ExplainRequest`, `ExplainActivationsRequest` and their options, proto to domain.

Proto3 zero values mean "default" here, so an empty field is the engine's default, one place decides it,
and planning (explain/plan.py) sees only domain objects.
"""

from __future__ import annotations

from patchscope.engine.generation import GenerationConfig
from patchscope.engine.presets import DEFAULT_PRESET, DEFAULT_TOP_K
from patchscope.explain.request import AUTO, ActivationsRequest, ExplainRequest, TargetSpec
from patchscope.wire.proto import pb
from patchscope.wire.tensors import decode_tensor


def generation_from_proto(options: pb.GenerationOptions) -> GenerationConfig:
    """Proto3 zero values mean "default", so an empty message is the engine's default decoding."""
    default = GenerationConfig()
    return GenerationConfig(
        max_new_tokens=options.max_new_tokens or default.max_new_tokens,
        temperature=options.temperature,
        top_p=options.top_p or default.top_p,
        seed=options.seed if options.HasField("seed") else None,
        stop=tuple(options.stop),
    )


def generation_to_proto(config: GenerationConfig) -> pb.GenerationOptions:
    options = pb.GenerationOptions(
        max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p
    )
    if config.seed is not None:
        options.seed = config.seed
    options.stop.extend(config.stop)
    return options


def target_from_proto(spec: pb.TargetSpec) -> TargetSpec:
    """Proto3 zero values mean "default": empty preset, template and mapping, top_k 0."""
    return TargetSpec(
        model=spec.model,
        preset=spec.preset or DEFAULT_PRESET,
        template=spec.template or None,
        layers=tuple(spec.layers),
        mapping=spec.mapping or AUTO,
        generation=generation_from_proto(spec.generation),
        top_k=spec.top_k or DEFAULT_TOP_K,
        controls=spec.controls if spec.HasField("controls") else True,
        mean_state_control=spec.mean_state_control,
    )


def explain_from_proto(request: pb.ExplainRequest) -> ExplainRequest:
    return ExplainRequest(
        source=request.source,
        prompt=request.prompt,
        layers=tuple(request.layers),
        positions=tuple(request.positions) or (-1,),
        target=target_from_proto(request.target),
    )


def activations_from_proto(request: pb.ExplainActivationsRequest, *, max_bytes: int) -> ActivationsRequest:
    """Decodes (and bounds) the states; their shape is checked by planning against the source's facts."""
    provenance = request.provenance
    return ActivationsRequest(
        source=request.source,
        states=decode_tensor("safetensors", request.safetensors, max_bytes=max_bytes),
        target=target_from_proto(request.target),
        layers=tuple(provenance.layers),
        positions=tuple(provenance.positions),
        tokens=tuple(provenance.tokens),
        fingerprint=provenance.fingerprint,
    )
