"""The client's numpy codec reads what the server writes (BF16 widened exactly) and writes what it reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchscope.wire import decode_tensor, encode_tensor, pb
from patchscope_client import tensors
from patchscope_client.errors import MissingExtra, require


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 40), seed=st.integers(0, 1000))
def test_server_bytes_decode_to_the_same_float32_values(rows, cols, seed):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    for wire, dtype in (
        (pb.D_TYPE_F32, torch.float32),
        (pb.D_TYPE_BF16, torch.bfloat16),
        (pb.D_TYPE_F16, torch.float16),
    ):
        got = tensors.decode(encode_tensor(x, wire))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, x.to(dtype).float().numpy())


def test_client_bytes_decode_on_the_server_with_metadata_kept():
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    data = tensors.encode(x, metadata={"layers": "[1, 2, 3]"})
    np.testing.assert_array_equal(decode_tensor("s", data, max_bytes=1 << 20).numpy(), x)
    assert tensors.metadata(data) == {"layers": "[1, 2, 3]"}
    np.testing.assert_array_equal(tensors.decode(tensors.encode(x.astype(np.float64))), x)


def test_a_missing_extra_names_the_pip_command():
    with pytest.raises(MissingExtra, match=r"pip install 'patchscope-client\[png\]'"):
        require("no_such_module_for_patchscope", "png")
