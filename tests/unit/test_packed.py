"""oneDNN-packed linear layers: the same function as `nn.Linear`, chosen only where it applies."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from patchscope.engine import extract
from patchscope.engine.cpu import parse_kind
from patchscope.engine.lens import logit_lens
from patchscope.engine.models import load_directory
from patchscope.engine.models.packed import PackedLinear, onednn_available, pack_linears, resolve_gemm
from patchscope.engine.options import EngineOptions

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("rows", [1, 3, 30, 77])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_computes_what_linear_computes(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    linear = nn.Linear(96, 200, bias=bias)
    packed = PackedLinear(linear)
    for x in (torch.randn(rows, 96), torch.randn(rows, 1, 96), torch.randn(2, rows, 96)):
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)


def test_packing_keeps_the_parameters_and_their_ties() -> None:
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 50, bias=False))
    model[2].weight = model[0].weight  # a tied head
    assert pack_linears(model) == 2
    assert isinstance(model[2], PackedLinear) and model[2].weight is model[0].weight
    assert len(list(model.parameters())) == 3  # nothing new to train or to save


def test_a_deep_copy_is_a_plain_linear_on_the_memo_parameters() -> None:
    model = nn.Sequential(nn.Linear(8, 4))
    pack_linears(model)
    shared = {id(p): p for p in model.parameters()}
    clone = copy.deepcopy(model, shared)
    assert type(clone[0]) is nn.Linear and clone[0].weight is model[0].weight
    x = torch.randn(3, 8)
    torch.testing.assert_close(clone(x), model(x), rtol=1e-5, atol=1e-5)
    own = copy.deepcopy(model)  # without a seeded memo the copy owns its parameters
    assert own[0].weight is not model[0].weight and torch.equal(own[0].weight, model[0].weight)


EPYC = parse_kind({"vendor_id": "AuthenticAMD", "flags": "avx2 fma"}, "AVX2", True, 2)
XEON = parse_kind({"flags": "avx2 fma avx512f amx_tile amx_bf16"}, "AVX512", True, 2)


def test_auto_packs_fp32_on_the_cpu_kinds_where_packing_won_and_onednn_elsewhere_is_refused() -> None:
    cpu = torch.device("cpu")
    assert resolve_gemm("auto", cpu, torch.float32, EPYC) == "onednn"
    assert resolve_gemm("auto", cpu, torch.float32, XEON) == "aten"  # measured no faster there
    assert resolve_gemm("onednn", cpu, torch.float32, XEON) == "onednn"  # asked for, it is what runs
    assert resolve_gemm("auto", cpu, torch.bfloat16, EPYC) == "aten"
    assert resolve_gemm("auto", torch.device("cuda"), torch.float32, EPYC) == "aten"
    assert resolve_gemm("aten", cpu, torch.float32) == "aten"
    with pytest.raises(ValueError, match="gemm 'onednn' needs float32"):
        resolve_gemm("onednn", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="gemm must be one of"):
        resolve_gemm("mkl", cpu, torch.float32)  # type: ignore[arg-type]


def test_a_packed_load_explains_as_the_stock_load_does(tiny_dirs) -> None:
    """Same logits within fp32 rounding at every step; the logit lens over all layers agrees exactly."""
    packed = load_directory("tiny-llama", tiny_dirs["llama"], options=EngineOptions(gemm="onednn"))
    stock = load_directory("tiny-llama", tiny_dirs["llama"])  # the default: ATen
    assert isinstance(packed.layout.unembed, PackedLinear)
    assert not any(isinstance(m, PackedLinear) for m in stock.model.modules())
    layers = list(range(packed.layout.num_layers))

    def lens_tops(model) -> list[str]:
        states = extract(model, "The capital of France is", layers).states[:, 0]  # [L, d]
        return [logit_lens(model, state, 5)[0] for state in states]

    with torch.inference_mode():
        ids = torch.tensor([[1, 5, 9, 14]])
        torch.testing.assert_close(packed.model(ids).logits, stock.model(ids).logits, rtol=1e-4, atol=1e-4)
    assert lens_tops(packed) == lens_tops(stock)
