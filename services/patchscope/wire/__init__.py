"""Proto ⇄ domain, in one place: every conversion between the API's messages and the server's objects.

One module per message family, so a reader looking for how one RPC's messages are built finds one file:
`tensors` (safetensors ⇄ bytes), `extract` (ExtractHiddenStates responses), `requests` (Explain requests
and decoding options), `events` (ExplainEvent), `listings` (ListModels, ListMappings); `proto` imports the
generated code. Callers import from this package, which names what the wire offers.
"""

from __future__ import annotations

from patchscope.wire.events import Stamp, control_to_proto, event_to_proto
from patchscope.wire.extract import LayerStates, chunks, layer_messages
from patchscope.wire.listings import Card, mapping_info_to_proto, model_info_to_proto
from patchscope.wire.proto import pb, pb_grpc
from patchscope.wire.requests import (
    activations_from_proto,
    explain_from_proto,
    generation_from_proto,
    generation_to_proto,
    target_from_proto,
)
from patchscope.wire.tensors import (
    ACCEPTED,
    CHUNK_BYTES,
    MAX_HEADER_BYTES,
    MAX_INT_DIGITS,
    MAX_RANK,
    TENSOR_NAME,
    WIRE_DTYPES,
    decode_tensor,
    encode_tensor,
    wire_dtype,
)

__all__ = [
    "ACCEPTED",
    "CHUNK_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_INT_DIGITS",
    "MAX_RANK",
    "TENSOR_NAME",
    "WIRE_DTYPES",
    "Card",
    "LayerStates",
    "Stamp",
    "activations_from_proto",
    "chunks",
    "control_to_proto",
    "decode_tensor",
    "encode_tensor",
    "event_to_proto",
    "explain_from_proto",
    "generation_from_proto",
    "generation_to_proto",
    "layer_messages",
    "mapping_info_to_proto",
    "model_info_to_proto",
    "pb",
    "pb_grpc",
    "target_from_proto",
    "wire_dtype",
]
