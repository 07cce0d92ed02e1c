"""Proto ⇄ domain, in one place: requests, events, tensors (safetensors ⇄ protobuf) and the generated code.

Every tensor on the public API is a safetensors file (never pickle). Encoding builds the file with one
copy of the tensor's buffer (header + data joined once) instead of `safetensors.torch.save`'s several;
decoding validates the header before anything is trusted and rejects what the engine could not patch
(wrong rank, width or dtype, NaN or Inf) with an error that names the field.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from patchscope.engine.errors import InvalidArgument
from patchscope.engine.generation import GenerationConfig
from patchscope.engine.presets import DEFAULT_PRESET, DEFAULT_TOP_K
from patchscope.explain.events import Control, Event, SiteFinished, SiteStarted, SiteToken
from patchscope.explain.plan import Plan
from patchscope.explain.request import AUTO, ActivationsRequest, ExplainRequest, TargetSpec
from patchscope.mapping.artefact import MappingInfo
from patchscope_client._proto import patchscope_pb2 as pb
from patchscope_client._proto import patchscope_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]

CHUNK_BYTES = 1 << 20
TENSOR_NAME = "states"

# Wire dtype → (safetensors dtype string, torch dtype).
WIRE_DTYPES: dict[int, tuple[str, torch.dtype]] = {
    pb.D_TYPE_UNSPECIFIED: ("F32", torch.float32),
    pb.D_TYPE_F32: ("F32", torch.float32),
    pb.D_TYPE_BF16: ("BF16", torch.bfloat16),
    pb.D_TYPE_F16: ("F16", torch.float16),
}
ACCEPTED = {name: dtype for name, dtype in WIRE_DTYPES.values()}


def wire_dtype(field: str, value: int) -> tuple[str, torch.dtype]:
    if value not in WIRE_DTYPES:
        raise InvalidArgument(field, "unknown dtype", limit="F32, BF16 or F16", value=value)
    return WIRE_DTYPES[value]


def encode_tensor(tensor: torch.Tensor, dtype: int = pb.D_TYPE_F32, name: str = TENSOR_NAME) -> bytes:
    """One safetensors file holding `tensor` as `dtype`, built with a single copy of its buffer."""
    st_name, torch_dtype = wire_dtype("dtype", dtype)
    data = tensor.detach().to("cpu", torch_dtype).contiguous()
    raw = data.view(torch.int16) if torch_dtype == torch.bfloat16 else data  # numpy has no bfloat16
    buffer = memoryview(raw.numpy()).cast("B")
    header = json.dumps(
        {name: {"dtype": st_name, "shape": list(data.shape), "data_offsets": [0, buffer.nbytes]}},
        separators=(",", ":"),
    ).encode()
    header += b" " * (-len(header) % 8)  # the format aligns the data to 8 bytes
    return b"".join((struct.pack("<Q", len(header)), header, buffer))


# One tensor's header is ~100 bytes; metadata may add some. Bounding it bounds the parser's work.
MAX_HEADER_BYTES = 64 << 10
MAX_RANK = 8
MAX_INT_DIGITS = 20  # any int64; longer integers are refused before Python converts them


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _json_constant(text: str) -> float:
    raise ValueError(f"{text} is not JSON")


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is an int subclass: `true` in a shape is not a size


def decode_tensor(field: str, data: bytes, *, max_bytes: int, name: str = TENSOR_NAME) -> torch.Tensor:
    """The one tensor `name` of a safetensors file, as float32, validated; nothing in `data` is trusted.

    The header is parsed by hand (bounded in bytes, depth and integer digits; JSON only) so that malformed
    input gets a precise message.
    """
    if len(data) > max_bytes:
        raise InvalidArgument(field, "payload too large", limit=f"<= {max_bytes} bytes", value=len(data))
    if len(data) < 8:
        raise InvalidArgument(field, "not a safetensors file: shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise InvalidArgument(field, "not a safetensors file: header length past the end of the data")
    if header_len > MAX_HEADER_BYTES:
        raise InvalidArgument(
            f"{field}.header", "too large", limit=f"<= {MAX_HEADER_BYTES} bytes", value=header_len
        )
    try:
        header = json.loads(
            bytes(data[8 : 8 + header_len]), parse_int=_json_int, parse_constant=_json_constant
        )
    except RecursionError:  # nesting deeper than the interpreter's stack: never a safetensors header
        raise InvalidArgument(field, "not a safetensors file: header nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError and the hooks' refusals
        raise InvalidArgument(field, f"not a safetensors file: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise InvalidArgument(field, "not a safetensors file: header is not a JSON object")
    header.pop("__metadata__", None)
    if set(header) != {name}:
        raise InvalidArgument(field, f"must hold exactly one tensor named {name!r}", value=sorted(header)[:5])
    entry = header[name]
    if not isinstance(entry, dict):
        raise InvalidArgument(field, f"tensor {name!r} has a malformed header entry")
    st_dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if st_dtype not in ACCEPTED:
        raise InvalidArgument(f"{field}.dtype", "unsupported dtype", limit="F32, BF16 or F16", value=st_dtype)
    if not (isinstance(shape, list) and all(_is_int(n) and n >= 0 for n in shape)):
        raise InvalidArgument(f"{field}.shape", "must be a list of non-negative integers", value=shape)
    if len(shape) > MAX_RANK:
        raise InvalidArgument(
            f"{field}.shape", "too many dimensions", limit=f"<= {MAX_RANK}", value=len(shape)
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(n) for n in offsets)):
        raise InvalidArgument(f"{field}.data_offsets", "must be two integers", value=offsets)
    torch_dtype = ACCEPTED[st_dtype]
    begin, end = offsets
    expected = math.prod(shape) * torch.finfo(torch_dtype).bits // 8
    body = memoryview(data)[8 + header_len :]
    if not (0 <= begin <= end <= len(body)) or end - begin != expected:
        raise InvalidArgument(
            f"{field}.data_offsets",
            "do not match the shape and dtype or run past the data",
            limit=f"{expected} bytes for shape {shape} {st_dtype}",
            value=offsets,
        )
    if expected == 0:
        raise InvalidArgument(f"{field}.shape", "holds no values", limit=">= 1 value", value=shape)
    with warnings.catch_warnings():  # read-only bytes: the view is copied below before anyone writes
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(
            body[begin:end], dtype=torch.int16 if torch_dtype == torch.bfloat16 else torch_dtype
        )
    tensor = (raw.view(torch.bfloat16) if torch_dtype == torch.bfloat16 else raw).reshape(shape)
    tensor = tensor.to(torch.float32, copy=True)  # never aliases the request's bytes
    # One reduction finds NaN/Inf (they poison the sum); only a non-finite sum pays for the full check,
    # which also tells finite values that merely overflowed the sum apart from real NaN/Inf.
    if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
        raise InvalidArgument(field, "contains NaN or Inf", limit="finite values only")
    return tensor


def chunks(data: bytes, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """`data` in pieces of at most `size` bytes (at least one piece, possibly empty)."""
    view = memoryview(data)
    yield from (bytes(view[i : i + size]) for i in range(0, max(len(data), 1), size))


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


@dataclass(frozen=True)
class LayerStates:
    """One layer's states of one prompt as they leave `ExtractHiddenStates`."""

    layer: int
    states: torch.Tensor  # [positions, hidden]


def layer_messages(
    model: str,
    fingerprint: str,
    layer: LayerStates,
    positions: list[int],
    token_ids: list[int],
    tokens: list[str],
    dtype: int,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[pb.ExtractHiddenStatesResponse]:
    """The messages of one layer: its safetensors file split into chunks of about `chunk_bytes`."""
    data = encode_tensor(layer.states, dtype)
    pieces = list(chunks(data, chunk_bytes))
    for index, piece in enumerate(pieces):
        first = index == 0
        yield pb.ExtractHiddenStatesResponse(
            layer=layer.layer,
            positions=positions if first else [],
            token_ids=token_ids if first else [],
            tokens=tokens if first else [],
            dtype=dtype or pb.D_TYPE_F32,
            shape=list(layer.states.shape),
            chunk_index=index,
            chunk_count=len(pieces),
            safetensors=piece,
            model=model,
            fingerprint=fingerprint,
        )


# ---- requests ---------------------------------------------------------------------------------------


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


# ---- events -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stamp:
    """What every event of one call carries besides its payload."""

    request_id: str
    started: float  # time.time() when the call arrived
    server_version: str
    api_version: str


def event_to_proto(plan: Plan, event: Event, stamp: Stamp, now: float) -> pb.ExplainEvent:
    site = plan.sites[event.index]
    message = pb.ExplainEvent(
        request_id=stamp.request_id,
        site=pb.Site(
            index=event.index,
            position=site.position,
            source_layer=site.source_layer,
            target_layer=site.target_layer,
            source_token=plan.source_tokens[event.index],
        ),
        emitted_at=now,
    )
    if isinstance(event, SiteStarted):
        message.started.CopyFrom(
            pb.SiteStarted(
                mapping_id=event.mapping_id,
                mapped_norm=event.mapped_norm,
                target_layer_norm=event.target_layer_norm or 0.0,
                provenance_mismatch=plan.provenance_mismatch,
            )
        )
        if event.mapping_r2 is not None:
            message.started.mapping_r2 = event.mapping_r2
    elif isinstance(event, SiteToken):
        message.token.CopyFrom(pb.SiteToken(step=event.step, token_id=event.token_id, text=event.text))
    else:
        message.finished.CopyFrom(_finished(plan, event, stamp, now))
    return message


def _finished(plan: Plan, event: SiteFinished, stamp: Stamp, now: float) -> pb.SiteFinished:
    site = plan.sites[event.index]
    mapping_id = plan.mapping.describe(site.source_layer, site.target_layer)[0] if plan.mapping else ""
    t = event.timings
    finished = pb.SiteFinished(
        explanation=event.explanation,
        answer=event.answer,
        top_k=[pb.TokenProb(token=token, prob=p) for token, p in event.top_k or []],
        timings=pb.Timings(
            source_s=t.source_s,
            queue_s=t.queue_s,
            prefill_s=t.prefill_s,
            decode_s=t.decode_s,
            total_s=now - stamp.started,
        ),
        reproduction=pb.Reproduction(
            request_id=stamp.request_id,
            source_model=plan.source.id,
            source_fingerprint=plan.source.fingerprint,
            target_model=plan.target.id,
            target_fingerprint=plan.target.fingerprint,
            mapping_id=mapping_id,
            dtype=plan.target.dtype,
            generation=generation_to_proto(plan.generation),
            preset=plan.preset.name,
            template=plan.template,
            server_version=stamp.server_version,
            api_version=stamp.api_version,
            provenance_mismatch=plan.provenance_mismatch,
        ),
    )
    if event.control is not None:
        finished.control.CopyFrom(control_to_proto(event.control))
    return finished


def control_to_proto(control: Control) -> pb.Control:
    """Unknown signals stay unset (`optional`), so a client can tell 0 from "not measured"."""
    message = pb.Control(
        unpatched_explanation=control.unpatched_explanation,
        unpatched_answer=control.unpatched_answer,
        same_as_unpatched=control.same_as_unpatched,
        calibrator_id=control.calibrator_id,
    )
    for name in ("patch_effect", "explanation_logprob", "unpatched_logprob", "dependence", "confidence"):
        value = getattr(control, name)
        if value is not None:
            setattr(message, name, value)
    return message


# ---- listings ---------------------------------------------------------------------------------------


class Card(Protocol):
    """A hosted model as `ListModels` describes it (serve/hosting.py's `ModelCard`)."""

    id: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_parameters: int
    fingerprint: str
    tokenizer_fingerprint: str
    dtype: str


def model_info_to_proto(card: Card, source: bool, target: bool) -> pb.ModelInfo:
    return pb.ModelInfo(
        id=card.id,
        source=source,
        target=target,
        architecture=card.architecture,
        num_layers=card.num_layers,
        hidden_size=card.hidden_size,
        vocab_size=card.vocab_size,
        num_parameters=card.num_parameters,
        fingerprint=card.fingerprint,
        tokenizer_fingerprint=card.tokenizer_fingerprint,
        dtype=card.dtype,
        ready=True,
    )


def mapping_info_to_proto(info: MappingInfo) -> pb.MappingInfo:
    return pb.MappingInfo(
        id=info.id,
        source=info.source_model,
        target=info.target_model,
        source_layer=info.source_layer,
        target_layer=info.target_layer,
        method=info.method,
        r2=info.r2,
        r2_mean_dim=info.r2_mean_dim,
        cosine=info.cosine,
        mse=info.mse,
        num_pairs=info.pairs_train,
        source_fingerprint=info.source_fingerprint,
        target_fingerprint=info.target_fingerprint,
        corpus_fingerprint=info.corpus_fingerprint,
    )
