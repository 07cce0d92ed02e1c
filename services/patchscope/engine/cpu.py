"""What kind of CPU this process runs on: model name, vector and matrix instruction sets, torch's kernels.

Why: the same engine is faster or slower against its baselines depending on the instruction set (a
30-row batch and a one-row loop gain differently from AVX-512 and AMX), so every CPU figure must say
which CPU made it, and a choice of kernels per instruction set needs one place that reads the CPU.
Reading is cheap and has no side effects; `onednn_isa` alone starts a child process (oneDNN reports
the ISA it dispatches to only on its verbose channel, written by the C library to stdout).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

# The flags (as /proc/cpuinfo spells them) that decide which kernels a linear layer can use.
ISA_FLAGS: tuple[str, ...] = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


@dataclass(frozen=True)
class CpuKind:
    """One CPU as the benchmarks print it and as `gemm="auto"` reads it."""

    model: str  # e.g. "Intel(R) Xeon(R) Processor", "AMD EPYC 7B13"
    vendor: str  # "GenuineIntel", "AuthenticAMD", or the platform's name elsewhere
    flags: frozenset[str]  # the ISA_FLAGS this CPU has
    logical_cpus: int
    torch_capability: str  # the ISA ATen's own kernels dispatch to ("AVX512", "AVX2", "DEFAULT")
    onednn: bool  # torch was built with oneDNN (mkldnn) and can use it

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def bf16_matrix(self) -> bool:
        """bf16 matrix units (AMX): the only CPUs where a bf16 path can pay for its rounding."""
        return {"amx_tile", "amx_bf16"} <= self.flags

    @property
    def isa(self) -> str:
        """The widest kind, as a short name: "amx", "avx512", "avx2" or "baseline"."""
        if self.bf16_matrix:
            return "amx"
        if self.avx512:
            return "avx512"
        return "avx2" if "avx2" in self.flags else "baseline"

    def summary(self) -> str:
        """One line for a benchmark's header: model, cores, flags and torch's dispatch."""
        flags = " ".join(f for f in ISA_FLAGS if f in self.flags) or "none of " + ", ".join(ISA_FLAGS)
        onednn = "oneDNN on" if self.onednn else "oneDNN off"
        return (
            f"CPU {self.model} ({self.vendor}, {self.logical_cpus} logical CPUs, kind {self.isa}); "
            f"flags {flags}; torch ATen {self.torch_capability}, {onednn}"
        )


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (Linux); empty where there is none."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block ends at the first blank line
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def parse_kind(cpuinfo: dict[str, str], capability: str, onednn: bool, logical_cpus: int) -> CpuKind:
    """A `CpuKind` from /proc/cpuinfo's fields (split out so tests can feed other CPUs' fields)."""
    flags = frozenset(cpuinfo.get("flags", "").split()) & frozenset(ISA_FLAGS)
    return CpuKind(
        model=cpuinfo.get("model name") or platform.processor() or platform.machine() or "unknown",
        vendor=cpuinfo.get("vendor_id") or platform.system() or "unknown",
        flags=flags,
        logical_cpus=logical_cpus,
        torch_capability=capability,
        onednn=onednn,
    )


@cache
def detect() -> CpuKind:
    """The CPU of the machine this process runs on (read once per process)."""
    return parse_kind(
        _cpuinfo(),
        torch.backends.cpu.get_cpu_capability(),
        torch.backends.mkldnn.is_available(),
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
    )


_PROBE = """
import torch
x, w = torch.randn(4, 8), torch.randn(16, 8)
torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 4), None, "none", [], "")
"""


@cache
def onednn_isa(timeout_s: float = 60.0) -> str:
    """The ISA oneDNN dispatches to here, as its verbose channel names it ("" without oneDNN)."""
    if not torch.backends.mkldnn.is_available():
        return ""
    env = dict(os.environ, ONEDNN_VERBOSE="1", DNNL_VERBOSE="1")
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=timeout_s, check=True
    ).stdout
    for line in out.splitlines():
        if ",cpu,isa:" in line:
            return line.split(",cpu,isa:", 1)[1].strip()
    return "unknown"
