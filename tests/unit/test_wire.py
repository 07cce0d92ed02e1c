"""safetensors ⇄ protobuf: one-copy encoding readable by safetensors, and decoding that trusts nothing."""

from __future__ import annotations

import json
import math
import struct

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchscope.engine.errors import InvalidArgument
from patchscope.engine.generation import GenerationConfig
from patchscope.wire import (
    LayerStates,
    chunks,
    decode_tensor,
    encode_tensor,
    generation_from_proto,
    generation_to_proto,
    layer_messages,
    pb,
)

DTYPES = {pb.D_TYPE_F32: torch.float32, pb.D_TYPE_BF16: torch.bfloat16, pb.D_TYPE_F16: torch.float16}


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 33),
    dtype=st.sampled_from(list(DTYPES)),
    seed=st.integers(0, 2**16),
)
def test_encoded_states_read_back_exactly_with_safetensors_and_our_decoder(rows, cols, dtype, seed):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    data = encode_tensor(x, dtype)
    reference = safetensors.torch.load(data)["states"]
    assert reference.dtype == DTYPES[dtype] and torch.equal(reference, x.to(DTYPES[dtype]))
    assert torch.equal(decode_tensor("s", data, max_bytes=1 << 20), x.to(DTYPES[dtype]).float())


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=256))
def test_arbitrary_bytes_are_refused_with_a_field_named_error_or_decoded(data):
    try:
        decode_tensor("safetensors", data, max_bytes=1 << 20)
    except InvalidArgument as e:
        assert str(e).startswith("safetensors")


def header(entry: dict, body: bytes = b"") -> bytes:
    raw = json.dumps({"states": entry}).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01\x02", "shorter than"),
        (struct.pack("<Q", 10**9) + b"{}", "past the end"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (struct.pack("<Q", 3) + b"{x}", "not JSON"),
        (header({"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}, b"\0" * 8), "unsupported dtype"),
        (header({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, b"\0" * 4), "do not match"),
        (header({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, b""), "run past"),
        (header({"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]}), "holds no values"),
        (header({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, b"\0" * 4), "non-negative"),
        (
            header({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, struct.pack("<f", math.nan)),
            "NaN",
        ),
        (header({"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}, b"\x00\x7c"), "Inf"),
        (safetensors.torch.save({"other": torch.zeros(2)}), "exactly one tensor named 'states'"),
        (safetensors.torch.save({"states": torch.zeros(2), "more": torch.zeros(2)}), "exactly one tensor"),
    ],
)
def test_malformed_payloads_name_the_problem(data, message):
    with pytest.raises(InvalidArgument, match=message):
        decode_tensor("safetensors", data, max_bytes=1 << 20)


def test_payload_over_the_limit_is_refused_before_parsing():
    data = encode_tensor(torch.zeros(100, 100))
    with pytest.raises(InvalidArgument, match=r"payload too large; allowed: <= 1000 bytes"):
        decode_tensor("safetensors", data, max_bytes=1000)


def test_decoded_tensor_never_aliases_the_request_bytes():
    data = bytearray(encode_tensor(torch.ones(2, 2)))
    x = decode_tensor("s", bytes(data), max_bytes=1 << 20)
    x += 1
    assert torch.equal(decode_tensor("s", bytes(data), max_bytes=1 << 20), torch.ones(2, 2))


def test_a_large_layer_is_chunked_at_one_mebibyte_and_joins_back():
    x = torch.randn(700, 576)  # 1.6 MB as F32
    messages = list(
        layer_messages("m", "fp", LayerStates(5, x), list(range(700)), [1, 2], ["a", "b"], pb.D_TYPE_F32)
    )
    assert [m.chunk_index for m in messages] == [0, 1] and {m.chunk_count for m in messages} == {2}
    assert all(len(m.safetensors) <= 1 << 20 for m in messages)
    assert list(messages[0].token_ids) == [1, 2] and not messages[1].token_ids  # metadata once
    joined = b"".join(m.safetensors for m in messages)
    assert torch.equal(safetensors.torch.load(joined)["states"], x)
    assert list(chunks(b"")) == [b""]


def test_generation_options_round_trip_and_zero_means_default():
    assert generation_from_proto(pb.GenerationOptions()) == GenerationConfig()
    config = GenerationConfig(max_new_tokens=7, temperature=0.5, top_p=0.9, seed=3)
    assert generation_from_proto(generation_to_proto(config)) == config


def test_finite_values_whose_sum_overflows_are_accepted():
    x = torch.full((4, 8), 3.0e38)
    assert torch.equal(decode_tensor("s", encode_tensor(x), max_bytes=1 << 20), x)


def raw_header(text: str, body: bytes = b"") -> bytes:
    return struct.pack("<Q", len(text)) + text.encode() + body


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # Each of these was INTERNAL (RecursionError, ValueError, TypeError) before the decoder bounded them.
        (raw_header("[" * 100_000 + "]" * 100_000), "nested too deeply|too large"),
        (raw_header('{"states":' * 5000 + "{}" + "}" * 5000), "nested too deeply"),
        (
            raw_header('{"states": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 4]}}'),
            "integer of 5000 digits",
        ),
        (
            raw_header('{"states": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + "4" * 30 + "]}}"),
            "integer of 30 digits",
        ),
        (header({"dtype": "F32", "shape": [True, True], "data_offsets": [0, 4]}, b"\0" * 4), "non-negative"),
        (header({"dtype": "F32", "shape": [1], "data_offsets": [False, 4]}, b"\0" * 4), "two integers"),
        (header({"dtype": "F32", "shape": [1] * 70, "data_offsets": [0, 4]}, b"\0" * 4), "dimensions"),
        (raw_header('{"states": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}'), "NaN is not"),
        (raw_header(" " * (70 << 10)), "header: too large"),
    ],
)
def test_hostile_headers_are_invalid_arguments_not_internal_errors(data, message):
    with pytest.raises(InvalidArgument, match=message):
        decode_tensor("safetensors", data, max_bytes=1 << 20)
