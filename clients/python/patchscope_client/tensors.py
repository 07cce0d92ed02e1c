"""safetensors bytes ⇄ numpy, without torch: what clients send and receive on the wire.

numpy has no bfloat16, so BF16 states are widened to float32 here (a bfloat16 is the upper half of a
float32, so the widening is exact). Encoding writes the header and the buffer once.
"""

from __future__ import annotations

import json
import struct

import numpy as np

NAME = "states"
_NUMPY = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_WIRE = {"float32": "F32", "float16": "F16"}


class TensorFormatError(ValueError):
    """The bytes are not a safetensors file this client can read."""


def decode(data: bytes, name: str = NAME) -> np.ndarray:
    """The tensor `name` as a float32 numpy array (BF16 and F16 widened)."""
    if len(data) < 8:
        raise TensorFormatError("not a safetensors file: shorter than its header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise TensorFormatError("not a safetensors file: header runs past the data")
    header = json.loads(bytes(data[8 : 8 + n]))
    entry = header.get(name)
    if not isinstance(entry, dict) or entry.get("dtype") not in _NUMPY:
        raise TensorFormatError(f"no F32/F16/BF16 tensor named {name!r} in the file")
    begin, end = entry["data_offsets"]
    raw = np.frombuffer(
        data,
        dtype=_NUMPY[entry["dtype"]],
        count=(end - begin) // _NUMPY[entry["dtype"]].itemsize,
        offset=8 + n + begin,
    )
    if entry["dtype"] == "BF16":
        widened = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        widened = raw.astype(np.float32)  # a copy: never a view of the message bytes
    return widened.reshape(entry["shape"])


def encode(array: np.ndarray, name: str = NAME, metadata: dict[str, str] | None = None) -> bytes:
    """One safetensors file holding `array` (float32 or float16; other floats become float32)."""
    array = np.asarray(array)
    if array.dtype.name not in _WIRE:
        array = array.astype(np.float32)
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    body = memoryview(array).cast("B")
    entries: dict[str, object] = {
        name: {"dtype": _WIRE[array.dtype.name], "shape": list(array.shape), "data_offsets": [0, body.nbytes]}
    }
    if metadata:
        entries["__metadata__"] = metadata
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return b"".join((struct.pack("<Q", len(header)), header, body))


def metadata(data: bytes) -> dict[str, str]:
    """The string metadata of a safetensors file (empty when it has none)."""
    (n,) = struct.unpack("<Q", data[:8])
    return dict(json.loads(bytes(data[8 : 8 + n])).get("__metadata__") or {})
