"""The engine's performance knobs: one record, one set of defaults for the CLI, the service and the benches.

None of them changes what a Patchscope means; each picks how the same arithmetic runs. They are internal:
the service config and the benches may set them, the CLI always runs the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Gemm = Literal["auto", "onednn", "aten"]
Forward = Literal["auto", "lean", "transformers"]
Decode = Literal["eager", "static", "graph", "compiled-graph"]
GEMMS: tuple[str, ...] = get_args(Gemm)
FORWARDS: tuple[str, ...] = get_args(Forward)
DECODES: tuple[str, ...] = get_args(Decode)


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """How a loaded model computes: linear kernels, the forward of patched generation, the decode loop.

    `gemm`: the linear layers' kernel (models/packed.py). `aten` by default, the stock kernel everywhere,
    because the default must be one that every entry point can afford: the service's replicas measured no
    gain from oneDNN-packed weights while the packed copies double the memory of the linear weights, and
    the stock kernel keeps the engine's logits those of transformers' own forward, which the equivalence
    tests and the precision benchmark compare against. `auto` and `onednn` stay for in-process sweeps that
    want the faster products and can spend the memory. `auto` chooses by the CPU's kind at load
    (engine/cpu.py, `packed.PACKED_WINS`): oneDNN for float32 where the packed kernels were measured
    faster (the AVX2 EPYC), ATen where they were not (the AMX/AVX-512 Xeon); `bench/bench_cpu_kinds.py`
    compares the options on the CPU it runs on.

    `forward`: `auto` runs the lean forward (models/lean.py) for the families the layout table marks lean,
    on a CPU, where it removes per-step bookkeeping; transformers' forward elsewhere. Its explanations equal
    transformers' (test_lean.py), so the default can be the faster one.

    `decode`: `eager` decodes step by step and is the only loop that streams and cancels (the service
    needs both); the static-cache and CUDA-graph loops (static_decode.py) serve greedy, non-streaming
    sweeps on a GPU and compile for a minute first, so they are opt-in.
    """

    gemm: Gemm = "aten"
    forward: Forward = "auto"
    decode: Decode = "eager"

    def __post_init__(self) -> None:
        for name, allowed in (("gemm", GEMMS), ("forward", FORWARDS), ("decode", DECODES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


DEFAULTS = EngineOptions()  # what every entry point runs unless its config or bench says otherwise
