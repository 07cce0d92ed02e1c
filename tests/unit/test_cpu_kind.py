"""The CPU kind the benchmarks print and `gemm="auto"` reads, from /proc/cpuinfo's fields."""

from __future__ import annotations

from patchscope.engine.cpu import ISA_FLAGS, detect, parse_kind

XEON = {
    "vendor_id": "GenuineIntel",
    "model name": "Intel(R) Xeon(R) Processor",
    "flags": "fpu sse2 avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 rdrand",
}
EPYC = {
    "vendor_id": "AuthenticAMD",
    "model name": "AMD EPYC 7B13 64-Core Processor",
    "flags": "sse2 avx avx2 fma",
}


def test_a_xeon_with_amx_is_the_amx_kind_and_an_epyc_with_avx2_the_avx2_kind():
    xeon = parse_kind(XEON, "AVX512", True, 2)
    assert xeon.isa == "amx" and xeon.bf16_matrix and xeon.avx512
    assert {"amx_bf16", "avx512_bf16", "avx2"} <= xeon.flags and "rdrand" not in xeon.flags
    epyc = parse_kind(EPYC, "AVX2", True, 64)
    assert epyc.isa == "avx2" and not epyc.bf16_matrix and not epyc.avx512
    assert parse_kind({}, "DEFAULT", False, 1).isa == "baseline"


def test_the_summary_names_the_model_the_flags_and_torchs_dispatch():
    line = parse_kind(EPYC, "AVX2", False, 64).summary()
    assert "AMD EPYC 7B13" in line and "flags avx2 fma" in line and "ATen AVX2" in line
    assert "oneDNN off" in line and "kind avx2" in line


def test_this_machine_has_a_kind():
    kind = detect()
    assert kind.model and kind.logical_cpus >= 1 and kind.flags <= set(ISA_FLAGS)
