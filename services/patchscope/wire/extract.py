"""`ExtractHiddenStates` responses: one layer's states as safetensors chunks of about one mebibyte.

Serve's proxy and gRPC clients handle ~1 MiB messages best, so a layer larger than that is split and the
client joins the chunks back; positions and tokens travel once, on a layer's first chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from patchscope.wire.proto import pb
from patchscope.wire.tensors import CHUNK_BYTES, encode_tensor


def chunks(data: bytes, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """`data` in pieces of at most `size` bytes (at least one piece, possibly empty)."""
    view = memoryview(data)
    yield from (bytes(view[i : i + size]) for i in range(0, max(len(data), 1), size))


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
