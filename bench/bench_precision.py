"""What the fast path and bf16 change in the explanations of a real model (on the CPU, fp32 reference).

Sweeps of every layer of a few prompts on smollm2-135m, identity preset, 10 new tokens, greedy:
  eager fp32      the reference: the engine on ATen's fp32 linears and transformers' forward,
  oneDNN fp32     the same weights pre-packed for oneDNN (another summation order),
  lean fp32       the engine's CPU default (engine/options.py): ATen and the lean forward (models/lean.py),
  static fp32     the static decoder (static cache, the decode loop `bench_gpu.py` compiles and captures,
                  run eagerly here: the GPU check measures the compiled forms' speed),
  eager bf16      the engine with the model in bf16 (what a GPU deployment runs),
and counts explanations (whole continuations) and first tokens that differ from the reference. Prints
counts, never asserts. `make bench` runs it.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench_engine import sweep  # bench/ is the script's own directory
from patchscope.engine import StaticDecoder, load_model
from patchscope.engine.cpu import detect
from patchscope.engine.options import EngineOptions
from patchscope.engine.runtime import TargetRuntime

PROMPTS = [
    "Barack Obama",
    "The Eiffel Tower is in Paris",
    "Water boils at one hundred degrees",
    "The capital of Japan is Tokyo",
    "Shakespeare wrote Hamlet",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    transformers_forward = EngineOptions(forward="transformers")
    fp32 = load_model(args.model)  # the default kernels, ATen
    packed = load_model(args.model, options=EngineOptions(gemm="onednn"))
    bf16 = load_model(args.model, dtype="bfloat16")
    eager = TargetRuntime.build(fp32, transformers_forward)
    static = TargetRuntime.build(fp32, transformers_forward)
    static.static_decoder = StaticDecoder(fp32, None)
    runtimes = {
        "eager fp32": eager,
        "oneDNN fp32": TargetRuntime.build(packed, transformers_forward),
        "lean fp32": TargetRuntime.build(fp32),  # the default options
        "static fp32": static,
        "eager bf16": TargetRuntime.build(bf16, transformers_forward),
    }
    tokenizer = fp32.tokenizer

    def first_token(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids[:1]

    results: dict[str, list[list[str]]] = {label: [] for label in runtimes}
    seconds = dict.fromkeys(results, 0.0)
    for prompt in PROMPTS:
        for label, runtime in runtimes.items():
            started = time.perf_counter()
            explanations = [r.explanation for r in sweep(runtime, args.new_tokens, prompt).results]
            results[label].append(explanations)
            seconds[label] += time.perf_counter() - started
    reference = [e for sweep_ in results["eager fp32"] for e in sweep_]
    print(
        f"{args.model}: {len(PROMPTS)} prompts × {fp32.layout.num_layers} layers = {len(reference)} "
        f"explanations, {args.new_tokens} new tokens, on the CPU (bf16 rounds as on a GPU)"
    )
    print(detect().summary())  # bf16 products run on AMX where the CPU has it, AVX-512 or AVX2 otherwise
    print(f"{'way':<14}{'explanations differing':>24}{'first tokens differing':>24}{'seconds':>9}")
    for label, sweeps in results.items():
        got = [e for sweep_ in sweeps for e in sweep_]
        differ = sum(a != b for a, b in zip(reference, got, strict=True))
        first = sum(first_token(a) != first_token(b) for a, b in zip(reference, got, strict=True))
        print(
            f"{label:<14}{f'{differ} of {len(got)}':>24}{f'{first} of {len(got)}':>24}{seconds[label]:>9.1f}"
        )


if __name__ == "__main__":
    main()
