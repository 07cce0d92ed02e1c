"""Linear layers whose weights oneDNN has pre-packed once, for fp32 decoding on a CPU.

A sweep decodes a few dozen rows at a time, so every projection is a product with a few dozen rows. At
that shape ATen's kernel re-reads (re-packs) the weight on every call; oneDNN with the weight reordered
once into its blocked layout runs the products faster, the large vocabulary heads most of all
(`bench/bench_engine.py`; figures in `bench/results.md`). The results are fp32 with a different summation
order, so the logits differ in the last digits: `gemm="aten"` (the default, `engine/options.py`) keeps
the stock kernel and the benchmarks count the explanations that differ. The packed copy doubles the
memory the linear weights take (the originals stay: embeddings, lenses and fingerprints read them).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from patchscope.engine.cpu import CpuKind, detect
from patchscope.engine.options import GEMMS, Gemm

BATCH_HINT = 32  # the row count oneDNN tunes its packing for: a sweep's width


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available()


# The CPU kinds (engine/cpu.py) where the packed products were measured faster than ATen's on a sweep:
# on an AVX2 EPYC the engine ran 1.19x faster packed; on an AMX/AVX-512 Xeon packing did not win
# (bench/results.md, "Kernels per CPU kind"), and ATen there dispatches to AVX-512 kernels of its own.
PACKED_WINS: frozenset[str] = frozenset({"avx2"})


def resolve_gemm(
    gemm: Gemm, device: torch.device, dtype: torch.dtype, kind: CpuKind | None = None
) -> Literal["onednn", "aten"]:
    """The kernel a load uses: `auto` is oneDNN for fp32 on a CPU kind in `PACKED_WINS`, else ATen.

    ATen on GPUs, in half precision, and on the CPU kinds where packing was not faster.

    `kind`: the CPU to decide for (default: this one, `cpu.detect()`).
    """
    if gemm not in GEMMS:
        raise ValueError(f"gemm must be one of {', '.join(GEMMS)}, got {gemm!r}")
    fits = device.type == "cpu" and dtype == torch.float32 and onednn_available()
    if gemm == "onednn" and not fits:
        raise ValueError(f"gemm 'onednn' needs float32 on a CPU with oneDNN; got {dtype} on {device.type}")
    if gemm == "auto":
        return "onednn" if fits and (kind or detect()).isa in PACKED_WINS else "aten"
    return gemm


class PackedLinear(nn.Module):
    """`nn.Linear`'s forward through a oneDNN-packed copy of the weight (inference only).

    `weight` and `bias` stay the original parameters (tied embeddings stay tied; fingerprints, lenses
    and the logit lens read them); only the forward uses the packed copy, which autograd cannot see.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), BATCH_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # inductor packs constants itself; it cannot lower a packed input
            return nn.functional.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def __deepcopy__(self, memo: dict) -> nn.Linear:
        """A copy is a plain `nn.Linear` (packed tensors have no storage to copy).

        Its parameters are deep-copied through `memo` like any module's, so a memo pre-seeded with the
        originals (as bench_engine's nnsight copy does) shares them.
        """
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight = copy.deepcopy(self.weight, memo)
        plain.bias = copy.deepcopy(self.bias, memo)
        memo[id(self)] = plain
        return plain

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def pack_linears(model: nn.Module) -> int:
    """Swap every `nn.Linear` of `model` for a `PackedLinear` in place; returns how many were swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child))
                swapped += 1
    return swapped
