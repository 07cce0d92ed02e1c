"""Soak: the service under mixed requests from concurrent clients for a fixed time, on a real local Ray.

`python bench/soak.py --minutes 10` (the default config, deploy/config/local.yaml: smollm2-135m as
source and target; gemma3-270m is hosted too). Each client loops over a mix of request shapes (same-model
Explain of one or several sites and lengths, the logit lens, ExplainActivations of extracted states,
ExtractHiddenStates of a short prompt and of a long one whose source pass runs in chunks, ListModels)
and records latency and outcome. Prints p50/p99 per shape and overall, the errors (any non-OK status;
there should be none), and the resident memory of every Ray process (GCS, raylet, controller, proxy,
replicas, quota keeper) at start and end. Prints figures; asserts nothing.

Memory growth: every `--sample-s` seconds a sampler records the calls done so far and every Ray process's
resident memory; at the end each process's growth is the least-squares slope of its memory against calls,
in MiB per 1,000 calls with a 95 % interval, over the whole run and per quarter (a slope that falls
towards 0 quarter by quarter is memory levelling off; a steady one is a leak). The interval treats the
samples as independent, which successive memory readings are not: the per-quarter slopes are the check on
it. `--samples-json PATH` keeps the samples.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import grpc

from patchscope.serve.local import free_port, read_config, start
from patchscope.wire import pb, pb_grpc

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "The river runs past the old mill",
    "milk and bread",
    "Paris is the capital of France",
    "a small red car parked by the station",
]


def shapes(model: str):
    """(name, callable(stub, k)) of every request shape the soak mixes."""

    def explain(layers, positions, new_tokens, preset=""):
        def call(stub, k):
            request = pb.ExplainRequest(
                source=model,
                prompt=PROMPTS[k % len(PROMPTS)],
                layers=layers,
                positions=positions,
                target=pb.TargetSpec(
                    model=model, preset=preset, generation=pb.GenerationOptions(max_new_tokens=new_tokens)
                ),
            )
            return list(stub.Explain(request, timeout=120))

        return call

    def extract(stub, k):
        request = pb.ExtractHiddenStatesRequest(
            model=model, prompt=PROMPTS[k % 4], layers=[2, 6], positions=[-1]
        )
        return list(stub.ExtractHiddenStates(request, timeout=60))

    def extract_long(stub, k):  # 240 tokens: the source pass runs in 2 chunks (prefill_chunk_tokens 128)
        prompt = " ".join(PROMPTS[(k + j) % 4] for j in range(40))
        request = pb.ExtractHiddenStatesRequest(model=model, prompt=prompt, layers=[6], positions=[-1])
        return list(stub.ExtractHiddenStates(request, timeout=60))

    def activations(stub, k):
        messages = extract(stub, k)
        request = pb.ExplainActivationsRequest(
            source=model,
            safetensors=messages[0].safetensors,
            provenance=pb.Provenance(layers=[messages[0].layer]),
            target=pb.TargetSpec(model=model, generation=pb.GenerationOptions(max_new_tokens=4)),
        )
        return list(stub.ExplainActivations(request, timeout=120))

    return [
        ("explain 1 site x 4 tokens", explain([6], [-1], 4)),
        ("explain 4 sites x 8 tokens", explain([2, 6], [1, -1], 8)),
        ("explain 1 site x 24 tokens", explain([10], [-1], 24)),
        ("logit lens 3 sites", explain([2, 6, 10], [-1], 1, preset="logit-lens")),
        ("extract 2 layers", extract),
        ("extract 1 layer, long prompt", extract_long),
        ("activations 1 site", activations),
        ("list models", lambda stub, k: stub.ListModels(pb.ListModelsRequest(), timeout=30)),
    ]


def mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def t95(df: int) -> float:
    """Two-sided 95 % Student t quantile (Cornish-Fisher expansion; within 0.01 of the table for df >= 10)."""
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def slope(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least-squares slope of ys on xs and the half-width of its 95 % interval; None under 4 points."""
    n = len(xs)
    if n < 4:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    residual = sum((y - my - b * (x - mx)) ** 2 for x, y in zip(xs, ys, strict=True))
    return b, t95(n - 2) * math.sqrt(residual / (n - 2) / sxx)


def growth(samples: list[tuple[float, int, dict[str, int]]]) -> None:
    """Each process's memory slope per 1,000 calls: over the run, then per quarter of the samples."""
    names = sorted({name for _, _, memory in samples for name in memory})
    print(f"memory growth per 1,000 calls (n = {len(samples)} samples; 95 % intervals; then per quarter):")
    for name in names:
        points = [(calls, memory[name]) for _, calls, memory in samples if name in memory]
        whole = slope([c / 1000 for c, _ in points], [m / (1 << 20) for _, m in points])
        if whole is None:
            continue
        quarters = []
        for q in range(4):
            part = points[q * len(points) // 4 : (q + 1) * len(points) // 4]
            fit = slope([c / 1000 for c, _ in part], [m / (1 << 20) for _, m in part])
            quarters.append("-" if fit is None else f"{fit[0]:+.1f}")
        print(
            f"  {name[:52]:52s} {whole[0]:+7.2f} ± {whole[1]:5.2f} MiB  "
            f"({mib(points[0][1])} -> {mib(points[-1][1])}; quarters {' '.join(quarters)})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "deploy" / "config" / "local.yaml"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--num-cpus", type=float, default=None)
    parser.add_argument("--sample-s", type=float, default=30.0, help="seconds between memory samples")
    parser.add_argument("--samples-json", default=None, help="write the memory samples here")
    args = parser.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    print(
        f"soak at {commit.stdout.strip()} on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs: {args.minutes:g} min, {args.concurrency} clients, model {args.model}"
    )
    service = start(
        read_config(args.config), grpc_port=free_port(), http_port=free_port(), num_cpus=args.num_cpus
    )
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    try:
        with grpc.insecure_channel(service.address, options=options) as channel:
            stub = pb_grpc.PatchscopeStub(channel)
            mix = shapes(args.model)
            for _name, call in mix:  # warm-up: every shape once
                call(stub, 0)
            memory_start = service.process_memory()
            latencies: dict[str, list[float]] = defaultdict(list)
            errors: Counter[str] = Counter()
            lock = threading.Lock()
            stop_at = time.monotonic() + args.minutes * 60

            def client(k: int) -> None:
                r = 0
                while time.monotonic() < stop_at:
                    name, call = mix[(k + r) % len(mix)]
                    started = time.perf_counter()
                    try:
                        call(stub, k + r)
                        outcome = None
                    except grpc.RpcError as error:
                        outcome = f"{name}: {error.code().name} {error.details()[:80]}"
                    with lock:
                        latencies[name].append(time.perf_counter() - started)
                        if outcome:
                            errors[outcome] += 1
                    r += 1

            samples: list[tuple[float, int, dict[str, int]]] = [(0.0, 0, memory_start)]
            done = threading.Event()

            def sampler() -> None:
                while not done.wait(args.sample_s):
                    with lock:
                        calls = sum(len(v) for v in latencies.values())
                    samples.append((time.perf_counter() - began, calls, service.process_memory()))

            threads = [threading.Thread(target=client, args=(k,)) for k in range(args.concurrency)]
            began = time.perf_counter()
            watcher = threading.Thread(target=sampler)
            watcher.start()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            done.set()
            watcher.join()
            elapsed = time.perf_counter() - began
            memory_end = service.process_memory()
            samples.append((elapsed, sum(len(v) for v in latencies.values()), memory_end))
    finally:
        service.stop()

    everything = sorted(x for values in latencies.values() for x in values)

    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * (len(values) - 1)))] * 1000

    print(
        f"{len(everything)} calls in {elapsed:.0f} s ({len(everything) / elapsed:.1f}/s), "
        f"{sum(errors.values())} errors; p50 {statistics.median(everything) * 1000:.0f} ms, "
        f"p99 {pct(everything, 0.99):.0f} ms"
    )
    for name, values in latencies.items():
        print(
            f"  {name:28s} n={len(values):5d} p50 {pct(values, 0.5):7.0f} ms p99 {pct(values, 0.99):7.0f} ms"
        )
    for error, count in errors.most_common(10):
        print(f"  error x{count}: {error}")
    print("memory of every Ray process (start -> end):")
    for name in sorted(set(memory_start) | set(memory_end)):
        a, b = memory_start.get(name), memory_end.get(name)
        change = f" ({(b / a - 1) * 100:+.1f}%)" if a and b else ""
        print(f"  {name[:60]:60s} {mib(a) if a else '-':>9s} -> {mib(b) if b else '-':>9s}{change}")
    growth(samples)
    if args.samples_json:
        rows = [{"seconds": t, "calls": c, "rss_bytes": m} for t, c, m in samples]
        Path(args.samples_json).write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
