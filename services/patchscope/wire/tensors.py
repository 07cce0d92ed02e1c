"""Tensors on the public API: safetensors files inside protobuf bytes, never pickle.

Encoding builds the file with one copy of the tensor's buffer (header + data joined once) instead of
`safetensors.torch.save`'s several; decoding validates the header before anything is trusted and rejects
what the engine could not patch (wrong rank, width or dtype, NaN or Inf) with an error that names the field.
"""

from __future__ import annotations

import json
import math
import struct
import warnings

import torch

from patchscope.engine.errors import InvalidArgument
from patchscope.wire.proto import pb

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
