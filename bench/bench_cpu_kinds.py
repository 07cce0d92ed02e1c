"""Kernels per CPU kind: the engine's sweep under each `gemm` option (and bf16) against the per-site loop.

The question it answers: on this CPU's instruction set, does packing the linears for oneDNN (or running
bf16 on AMX) raise the 30-row batch's speed more than the one-row loop's, so that `gemm="auto"` should
pick it here? Every round runs every case once, in rotated order; a case's ratio is taken within its
round (the loop's time over the case's), so this CPU's drift cancels. Prints medians and per-round
ranges with n, the CPU kind and the commit; asserts nothing. Explanations are compared with the fp32
ATen engine's (a bf16 path is only worth having if that count is 0; its logit error is
bench/bench_precision.py's).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

from bench_engine import build, sweep  # bench/ is the script's own directory
from patchscope.engine import load_model
from patchscope.engine.cpu import detect, onednn_isa
from patchscope.engine.options import EngineOptions
from patchscope.engine.runtime import TargetRuntime

LOOP = "(a) per-site loop"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 engine case")
    parser.add_argument(
        "--skip-loop", action="store_true", help="engine cases only (the loop's kernels never change)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)

    load_weights = functools.partial(load_model, args.model, device="cpu")
    stock = load_weights(options=EngineOptions(gemm="aten"))
    engines: dict[str, TargetRuntime] = {
        "engine gemm=aten fp32": TargetRuntime.build(stock, EngineOptions(gemm="aten")),
    }
    onednn = EngineOptions(gemm="onednn")
    engines["engine gemm=onednn fp32"] = TargetRuntime.build(load_weights(options=onednn), onednn)
    if not args.no_bf16:
        engines["engine gemm=aten bf16"] = TargetRuntime.build(
            load_weights(dtype="bfloat16", options=EngineOptions(gemm="aten")), EngineOptions(gemm="aten")
        )
    peers = build(
        stock,
        engines["engine gemm=aten fp32"],
        engines["engine gemm=aten fp32"],
        engines["engine gemm=aten fp32"],
        args.new_tokens,
    )
    cases: dict[str, Callable[[], object]] = {} if args.skip_loop else {LOOP: peers[LOOP]}
    cases |= {name: functools.partial(sweep, rt, args.new_tokens) for name, rt in engines.items()}

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    print(detect().summary())
    print(f"oneDNN ISA: {onednn_isa()}")
    print(
        f"model {stock.id} ({stock.layout.num_layers} sites), {args.new_tokens} new tokens; commit "
        f"{commit.strip()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    with torch.inference_mode():
        reference = [e.explanation for e in sweep(engines["engine gemm=aten fp32"], args.new_tokens).results]
        for name, rt in engines.items():
            got = [e.explanation for e in sweep(rt, args.new_tokens).results]
            differ = sum(a != b for a, b in zip(reference, got, strict=True))
            print(f"explanations of {name} differing from gemm=aten fp32: {differ} of {len(reference)}")
        for fn in cases.values():  # warm-up
            fn()
        names = list(cases)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = time.perf_counter()
                cases[name]()
                times[name].append(time.perf_counter() - start)
            print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)
    print(
        f"{'case':<28}{'median s':>10}" + ("" if args.skip_loop else f"{'loop ÷ case (median, range)':>36}")
    )
    for name in names:
        line = f"{name:<28}{statistics.median(times[name]):>10.3f}"
        if not args.skip_loop:
            ratios = [loop / t for loop, t in zip(times[LOOP], times[name], strict=True)]
            spread = f"({min(ratios):.1f}–{max(ratios):.1f}×, n = {args.repeats})"
            line += f"{statistics.median(ratios):>14.1f}× {spread}"
        print(line)
    base = times["engine gemm=aten fp32"]
    for name in [n for n in names if n not in (LOOP, "engine gemm=aten fp32")]:
        paired = [t / b for t, b in zip(times[name], base, strict=True)]
        print(
            f"RESULT {name} ÷ gemm=aten fp32: {statistics.median(paired):.2f} "
            f"(range {min(paired):.2f}–{max(paired):.2f}, n = {args.repeats}, same rounds)"
        )


if __name__ == "__main__":
    main()
