"""Service benchmark on the default pair (smollm2-135m -> gemma3-270m), on a real local Ray instance.

(a) One `Explain` through the service (gRPC proxy, ingress, SourceModel, TargetModel) against the same
    pipeline in this process for the same request; target: service / engine <= 1.15. Paired per round,
    with where each side's time went (the events' timings, and when the client saw each kind of event).
    `--one-explain` runs only this section, on one service start.
(b) `ExtractHiddenStates` of every layer over loopback against extracting and encoding the same tensors in
    this process.
(c) 1, 4, 8 and 16 concurrent clients with cross-request batching on and off (two deployments, same config
    otherwise): throughput in sites per second, and the ratio.
(d) `--target-only`: the TargetModel deployment's batching code without Ray, on both hosted targets
    (smollm2-135m and gemma3-270m, each patched with its own states): Poisson arrivals from 1, 4, 8 and 16
    clients sending mixed templates and targets, today's per-template batches (`Batcher`) against
    continuous batching (`ContinuousBatcher`) in the same process, rounds interleaved; sites/s, p50/p99
    latency, time to first token, and whether every explanation equals the same request run alone.
    With one client, also each request alone through both, paired: the ratio continuous / off with a 95 %
    interval (the bar: <= 1.05).
Both sides use 2 torch threads. Median of --repeats runs, interleaved. Prints ratios, never asserts them.
Ray runs its worker processes (every replica, the proxy) at its `worker_niceness` (+15 over the driver,
which is this process and the in-process side): on a shared machine that is a lower CPU priority for the
service's model work than for the in-process engine's. The header prints both; `--worker-niceness 0`
runs the replicas at this process's priority, for a comparison at equal priority.
Cross-model mappings come from the default registry (`make run` fits them).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import torch

from paired import interval
from patchscope.engine import GenerationConfig, load_model
from patchscope.engine.hooks import extract
from patchscope.engine.options import DEFAULTS, GEMMS, EngineOptions
from patchscope.engine.runtime import TargetRuntime
from patchscope.engine.template import tokenize_prompt
from patchscope.explain import ExplainRequest, LocalBackend, TargetSpec
from patchscope.explain.events import SiteFinished, SiteStarted, SiteToken
from patchscope.explain.local import LOCAL_LIMITS
from patchscope.explain.run import Pipeline
from patchscope.mapping.registry import MappingRegistry
from patchscope.mapping.resolve import registry_resolver
from patchscope.serve.local import free_port, read_config, start
from patchscope.wire import encode_tensor, pb, pb_grpc

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Barack Obama",
    "a glass of milk",
    "the city of Paris",
    "an old wooden boat",
    "the Amazon river",
    "a red apple",
    "Albert Einstein",
    "the piano concerto",
]
LAYERS, TARGET_LAYERS = [2, 6, 10], [1, 4, 6]
NEW_TOKENS = 10
CONCURRENCY = [(1, 4), (4, 3), (8, 3), (16, 2)]  # (clients, Explain calls each)


def config(batching: bool, gemm: str) -> dict:
    cfg = copy.deepcopy(read_config(ROOT / "deploy" / "config" / "local.yaml"))
    args = cfg["applications"][0]["args"]
    args["torch_threads"] = 2
    args["gemm"] = gemm
    args["batching"] = {"enabled": batching, "wait_ms": 5, "max_rows": 256}
    return cfg


def explain_request(prompt: str) -> pb.ExplainRequest:
    return pb.ExplainRequest(
        source="smollm2-135m",
        prompt=prompt,
        layers=LAYERS,
        target=pb.TargetSpec(model="gemma3-270m", generation=pb.GenerationOptions(max_new_tokens=NEW_TOKENS)),
    )


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run_concurrent(stub, clients: int, rounds: int) -> float:
    """Sites per second with `clients` threads each sending `rounds` Explain calls back to back."""
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            for r in range(rounds):
                list(stub.Explain(explain_request(PROMPTS[(k + r) % len(PROMPTS)]), timeout=600))
        except BaseException as e:  # reported below, never hidden
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return clients * rounds * len(LAYERS) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gemm", default=DEFAULTS.gemm, choices=GEMMS, help="linear kernels, both sides")
    parser.add_argument("--target-only", action="store_true", help="(d) only: the target's batching, no Ray")
    parser.add_argument("--one-explain", action="store_true", help="(a) only, on one service start")
    parser.add_argument(
        "--worker-niceness",
        type=int,
        default=None,
        help="Ray's worker_niceness for the replicas (default: Ray's own, +15 over this process)",
    )
    parser.add_argument("--clients", default="1,4,8,16", help="(d): client counts")
    parser.add_argument("--requests", type=int, default=3, help="(d): requests per client per round")
    parser.add_argument("--rate", type=float, default=2.0, help="(d): each client's arrivals per second")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.worker_niceness is not None:  # read by the raylet, which starts with the service below
        os.environ["RAY_worker_niceness"] = str(args.worker_niceness)
    if args.target_only:
        target_load(args)
        return
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(
        f"# service benchmark · commit {commit} · {platform.processor() or platform.machine()} · "
        f"{os.cpu_count()} CPUs · 2 torch threads each side · gemm {args.gemm}"
    )

    options = EngineOptions(gemm=args.gemm)
    source = load_model("smollm2-135m", options=options)
    target = load_model("gemma3-270m", options=options)
    backend = LocalBackend([source], [TargetRuntime.build(target, options)])
    resolve = registry_resolver(MappingRegistry())
    engine_request = ExplainRequest(
        source=source.id,
        prompt=PROMPTS[0],
        layers=tuple(LAYERS),
        target=TargetSpec(
            target.id, layers=tuple(TARGET_LAYERS), generation=GenerationConfig(max_new_tokens=NEW_TOKENS)
        ),
    )

    def in_process() -> dict[str, float]:
        return asyncio.run(pipeline_marks(Pipeline(backend, LOCAL_LIMITS, resolve), engine_request))

    results: dict[str, float] = {}
    for batching in (True,) if args.one_explain else (True, False):
        service = start(
            config(batching, args.gemm), grpc_port=free_port(), http_port=free_port(), timeout_s=600
        )
        options = [("grpc.max_receive_message_length", 256 << 20)]
        try:
            with grpc.insecure_channel(service.address, options=options) as channel:
                stub = pb_grpc.PatchscopeStub(channel)
                list(stub.Explain(explain_request(PROMPTS[0]), timeout=600))  # warm
                print(f"# niceness: this process (in-process side) {os.nice(0)}, {replica_niceness()}")
                if batching:
                    results |= one_request(stub, in_process, args.repeats)
                    if args.one_explain:
                        break
                    results |= extraction(stub, source, args.repeats)
                key = "batched" if batching else "unbatched"
                for clients, rounds in CONCURRENCY:
                    before = len(service_stats()["batch_sizes"])
                    results[f"{key}_{clients}_sites_per_s"] = run_concurrent(stub, clients, rounds)
                    sizes = service_stats()["batch_sizes"][before:]
                    results[f"{key}_{clients}_mean_batch_rows"] = statistics.mean(sizes)
        finally:
            service.stop()
    if args.one_explain:
        report_one(results, args.repeats)
        return
    report(results, args, source.facts.num_layers)


# When the caller saw each kind of event (seconds from the call), and the last site's own timings.
MARKS = ("started", "first_token", "last_token", "finished", "source_s", "queue_s", "prefill_s", "decode_s")


async def pipeline_marks(pipeline: Pipeline, request: ExplainRequest) -> dict[str, float]:
    """One Explain in this process (what `explain` runs), with the marks `service_marks` reads."""
    started = time.perf_counter()
    marks: dict[str, float] = {}
    plan = await pipeline.plan(request)
    kinds = {SiteStarted: "started", SiteToken: "token", SiteFinished: "finished"}
    async for event in pipeline.run(plan):
        kind, now = kinds[type(event)], time.perf_counter() - started
        marks.setdefault("first_token" if kind == "token" else kind, now)
        if kind == "token":
            marks["last_token"] = now
        elif kind == "finished":
            marks["finished"] = now
            t = event.timings
            marks |= {"source_s": t.source_s, "queue_s": t.queue_s}
            marks |= {"prefill_s": t.prefill_s, "decode_s": t.decode_s}
    marks["total"] = time.perf_counter() - started
    return marks


def service_marks(stub) -> dict[str, float]:
    started = time.perf_counter()
    marks: dict[str, float] = {}
    for event in stub.Explain(explain_request(PROMPTS[0]), timeout=600):
        kind, now = event.WhichOneof("event"), time.perf_counter() - started
        marks.setdefault("first_token" if kind == "token" else kind, now)
        if kind == "token":
            marks["last_token"] = now
        elif kind == "finished":
            marks["finished"] = now
            t = event.finished.timings
            marks |= {"source_s": t.source_s, "queue_s": t.queue_s}
            marks |= {"prefill_s": t.prefill_s, "decode_s": t.decode_s, "server_total_s": t.total_s}
    marks["total"] = time.perf_counter() - started
    return marks


def cpu_seconds() -> dict[str, float]:
    """User + system CPU seconds of this process and of every Ray process it started, by role."""
    import psutil

    me = psutil.Process()
    seconds: dict[str, float] = {}
    for process in [me, *me.children(recursive=True)]:
        try:
            title = " ".join(process.cmdline()[:1]) or process.name()
            times = process.cpu_times()
        except psutil.Error:  # gone between the listing and the look
            continue
        if process.pid == me.pid:
            role = "this process"
        elif title.startswith("ray::ServeReplica:"):
            role = title.split(":")[-1].split(".")[0]  # Explainer, SourceModel, TargetModel
        elif title.startswith("ray::ProxyActor"):
            role = "gRPC proxy"
        else:
            role = "rest of Ray"
        seconds[role] = seconds.get(role, 0.0) + times.user + times.system
    return seconds


def replica_niceness() -> str:
    """The niceness of each Ray process by role, as `cpu_seconds` names the roles."""
    import psutil

    seen: dict[str, set[int]] = {}
    for process in psutil.Process().children(recursive=True):
        try:
            title = " ".join(process.cmdline()[:1]) or process.name()
            nice = process.nice()
        except psutil.Error:
            continue
        if title.startswith("ray::ServeReplica:"):
            role = title.split(":")[-1].split(".")[0]
        elif title.startswith("ray::ProxyActor"):
            role = "gRPC proxy"
        else:
            role = "rest of Ray"
        seen.setdefault(role, set()).add(nice)
    return ", ".join(f"{role} {'/'.join(map(str, sorted(n)))}" for role, n in sorted(seen.items()))


def with_cpu(run: Callable[[], dict[str, float]]) -> dict[str, float]:
    """`run`'s marks, and the CPU seconds each role spent meanwhile (keys `cpu <role>`)."""
    before = cpu_seconds()
    marks = run()
    after = cpu_seconds()
    return marks | {f"cpu {role}": after[role] - before.get(role, 0.0) for role in after}


def one_request(stub, in_process: Callable[[], dict[str, float]], repeats: int) -> dict[str, float]:
    """(a) the same request through the service and in process, interleaved, alternating which goes first."""
    in_process()
    svc: list[dict[str, float]] = []
    eng: list[dict[str, float]] = []
    for k in range(repeats):
        if k % 2:
            eng.append(with_cpu(in_process))
            svc.append(with_cpu(lambda: service_marks(stub)))
        else:
            svc.append(with_cpu(lambda: service_marks(stub)))
            eng.append(with_cpu(in_process))
    ratios = [s["total"] / e["total"] for s, e in zip(svc, eng, strict=True)]
    results = {
        "service_s": statistics.median(s["total"] for s in svc),
        "engine_s": statistics.median(e["total"] for e in eng),
        "first_token_s": statistics.median(s["first_token"] for s in svc),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }
    names = [*MARKS, "server_total_s", *sorted({k for s in svc for k in s if k.startswith("cpu ")})]
    for name in names:
        results[f"service_{name}"] = statistics.median(s.get(name, 0.0) for s in svc)
        results[f"engine_{name}"] = statistics.median(e.get(name, 0.0) for e in eng)
    return results


def report_one(r: dict[str, float], repeats: int) -> None:
    print(
        f"(a) one Explain, {len(LAYERS)} sites + the control row, {NEW_TOKENS} new tokens, n={repeats} pairs"
    )
    print(f"    service {r['service_s']:.3f} s   in-process pipeline {r['engine_s']:.3f} s (medians)")
    print(
        f"    service / in-process, paired: median {r['ratio']:.3f} "
        f"[{r['ratio_min']:.3f}..{r['ratio_max']:.3f}]   (target <= 1.15)"
    )
    print(
        "    medians: s from the call (marks), the last site's timings, CPU s by role   service   in-process"
    )
    names = [*MARKS, "server_total_s", *sorted(k[8:] for k in r if k.startswith("service_cpu "))]
    for name in names:
        print(f"      {name:<28} {r[f'service_{name}']:9.3f} {r[f'engine_{name}']:12.3f}")


def extraction(stub, source, repeats: int) -> dict[str, float]:
    """(b) every layer of a 64-token prompt over loopback vs extracted and encoded in process."""
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 7)
    num_tokens = len(tokenize_prompt(source.tokenizer, prompt))
    layers, positions = list(range(source.facts.num_layers)), list(range(1, num_tokens))
    request = pb.ExtractHiddenStatesRequest(
        model="smollm2-135m", prompt=prompt, layers=layers, positions=positions
    )

    def local() -> list[bytes]:
        hidden = extract(source, prompt, layers, positions)
        return [encode_tensor(hidden.states[i]) for i in range(len(layers))]

    size = sum(len(b) for b in local())
    rpc, here = [], []
    for _ in range(repeats):
        rpc.append(timed(lambda: list(stub.ExtractHiddenStates(request, timeout=600))))
        here.append(timed(local))
    return {
        "extract_rpc_s": statistics.median(rpc),
        "extract_local_s": statistics.median(here),
        "mb": size / 1e6,
        "positions": len(positions),
    }


def report(r: dict[str, float], args: argparse.Namespace, num_layers: int) -> None:
    report_one(r, args.repeats)
    print(
        f"(b) ExtractHiddenStates, {num_layers} layers x {r['positions']:.0f} positions = "
        f"{r['mb']:.1f} MB F32"
    )
    print(
        f"    over loopback {r['extract_rpc_s']:.3f} s ({r['mb'] / r['extract_rpc_s']:.0f} MB/s)   "
        f"in process {r['extract_local_s']:.3f} s ({r['mb'] / r['extract_local_s']:.0f} MB/s)   "
        f"ratio {r['extract_rpc_s'] / r['extract_local_s']:.2f}"
    )
    print(f"    time to first token event through the service: {r['first_token_s']:.3f} s")
    print(f"(c) concurrent clients, each sending Explain calls of {len(LAYERS)} sites back to back")
    for clients, rounds in CONCURRENCY:
        on, off = r[f"batched_{clients}_sites_per_s"], r[f"unbatched_{clients}_sites_per_s"]
        print(
            f"    {clients:>2} clients x {rounds}: batching on {on:.2f} sites/s "
            f"(mean batch {r[f'batched_{clients}_mean_batch_rows']:.1f} rows), off {off:.2f} sites/s, "
            f"ratio {on / off:.2f}"
        )


def service_stats() -> dict:
    from ray import serve

    return (
        serve.get_deployment_handle("TargetModel", app_name="patchscope").stats.remote().result(timeout_s=30)
    )


TARGETS = ("smollm2-135m", "gemma3-270m")  # the hosted targets of (d)
TEMPLATES = {  # mixed templates: two presets' and a custom one
    "identity": "cat -> cat\n1135 -> 1135\nhello -> hello\n{}",
    "description": "Syria: Country in the Middle East\nLeonardo DiCaprio: American actor\nSamsung: {}",
    "custom": "In one word, {} means",
}


def target_pool(options: EngineOptions) -> tuple[dict[str, TargetRuntime], list]:
    """Both hosted targets' runtimes, and requests patching each with its own states of the prompts.

    A same-model Patchscope per site: 3 sites + the control row, templates mixed, `NEW_TOKENS` new tokens.
    """
    from patchscope.engine.streaming import GenerateRequest

    runtimes, pool = {}, []
    for model_id in TARGETS:
        model = load_model(model_id, options=options)
        runtimes[model_id] = TargetRuntime.build(model, options)
        n = model.facts.num_layers
        layers = [n // 6, n // 3, n // 2]
        for k, prompt in enumerate(PROMPTS):
            states = extract(model, prompt, layers, [-1]).states[:, 0]  # [3, d]
            name = list(TEMPLATES)[k % len(TEMPLATES)]
            filler = "?" if name == "identity" else " x"
            config = GenerationConfig(max_new_tokens=NEW_TOKENS)
            pool.append(
                GenerateRequest(model_id, TEMPLATES[name], filler, layers, list(states), config, True)
            )
    return runtimes, pool


def target_load(args: argparse.Namespace) -> None:
    """(d) the target deployment's batching without Ray: per-template batches vs continuous batching."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    from patchscope.serve.config import ServiceConfig
    from patchscope.serve.target import make_batcher

    runtimes, pool = target_pool(EngineOptions(gemm=args.gemm))
    base = {
        "sources": ["smollm2-135m"],
        "targets": list(runtimes),
        "auth": {"required": False},
    }
    modes = {
        "batches": ServiceConfig(**base, batching={"continuous": False, "wait_ms": 5, "max_rows": 256}),
        "continuous": ServiceConfig(**base, batching={"continuous": True, "max_rows": 256}),
        "off": ServiceConfig(**base, batching={"enabled": False}),
    }

    async def one(batcher, request) -> tuple[float, float, dict[int, str]]:
        started = time.perf_counter()
        first, texts = None, {}
        async for events in batcher.submit(request):
            for e in events:
                if first is None and e.text:
                    first = time.perf_counter() - started
                if e.finished:
                    texts[e.row] = e.explanation
        return time.perf_counter() - started, first or 0.0, texts

    async def offered_load(batcher, clients: int, seed: int) -> dict:
        rng = random.Random(seed)
        plan = [
            [(rng.expovariate(args.rate), rng.randrange(len(pool))) for _ in range(args.requests)]
            for _ in range(clients)
        ]
        done: list[tuple[int, float, float, dict[int, str]]] = []

        async def client(arrivals) -> None:
            for gap, index in arrivals:
                await asyncio.sleep(gap)
                latency, first, texts = await one(batcher, pool[index])
                done.append((index, latency, first, texts))

        started = time.perf_counter()
        await asyncio.gather(*(client(a) for a in plan))
        elapsed = time.perf_counter() - started
        return {"elapsed": elapsed, "done": done}

    clients_list = [int(c) for c in args.clients.split(",")]
    with ThreadPoolExecutor(1, thread_name_prefix="target") as executor:
        batchers = {name: make_batcher(cfg, runtimes, executor) for name, cfg in modes.items()}

        async def alone() -> dict[int, dict[int, str]]:
            return {i: (await one(batchers["off"], r))[2] for i, r in enumerate(pool)}

        reference = asyncio.run(alone())  # every request alone: the equivalence reference (and a warm-up)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        print(
            f"(d) target batching without Ray · commit {commit.stdout.strip()} · "
            f"{platform.processor() or platform.machine()} · {os.cpu_count()} CPUs · 2 torch threads · "
            f"{args.repeats} rounds x {args.requests} requests per client, Poisson arrivals {args.rate}/s "
            f"per client · 3 sites + control, {NEW_TOKENS} new tokens, targets {', '.join(runtimes)}, "
            f"{len(TEMPLATES)} templates",
            flush=True,
        )
        for clients in clients_list:
            rows: dict[str, list[dict]] = {}
            for repeat in range(args.repeats):
                names = ["batches", "continuous"] + (["off"] if clients == 1 else [])
                if repeat % 2:
                    names.reverse()  # interleaved, alternating order
                for name in names:
                    result = asyncio.run(offered_load(batchers[name], clients, seed=1000 * repeat + clients))
                    rows.setdefault(name, []).append(result)
            summarize(clients, rows, reference)
        if 1 in clients_list:
            asyncio.run(paired_alone(batchers, pool, args.repeats, one))


async def paired_alone(batchers: dict, pool: list, repeats: int, one: Callable) -> None:
    """One request at a time, each pool request through continuous batching and batching off in turn.

    Why paired: the one-client bar compares the same request both ways; the Poisson rounds' p50 mixes two
    targets whose latencies differ about twofold, so a few samples moving across the middle swing it.
    """
    ratios, seconds = [], {"continuous": [], "off": []}
    for repeat in range(repeats):
        for request in pool:
            order = ["continuous", "off"] if repeat % 2 == 0 else ["off", "continuous"]
            got = {name: (await one(batchers[name], request))[0] for name in order}
            for name, value in got.items():
                seconds[name].append(value)
            ratios.append(got["continuous"] / got["off"])
    medians = ", ".join(f"{name} median {statistics.median(v):.2f} s" for name, v in seconds.items())
    print(f"     1 client, each request alone ({medians}): continuous / off {interval(ratios)}", flush=True)


def summarize(clients: int, rows: dict[str, list[dict]], reference: dict) -> None:
    """One client count's figures per mode, and the paired ratios."""

    def percentile(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    summary = {}
    for name, runs in rows.items():
        latencies = [d[1] for r in runs for d in r["done"]]
        firsts = [d[2] for r in runs for d in r["done"]]
        rates = [3 * len(r["done"]) / r["elapsed"] for r in runs]
        differ = sum(d[3] != reference[d[0]] for r in runs for d in r["done"])
        summary[name] = (statistics.median(rates), percentile(latencies, 0.5), percentile(latencies, 0.99))
        print(
            f"    {clients:>2} clients  {name:<10} sites/s {summary[name][0]:6.2f}"
            f" [{min(rates):.2f}..{max(rates):.2f}]  p50 {summary[name][1]:.2f} s  p99"
            f" {summary[name][2]:.2f} s  first token p50 {percentile(firsts, 0.5):.2f} s"
            f"  n={len(latencies)}  differ from alone: {differ}",
            flush=True,
        )
    b, c = summary["batches"], summary["continuous"]
    line = f"    {clients:>2} clients  continuous / batches: sites/s {c[0] / b[0]:.2f}x"
    line += f", p99 {c[2] / b[2]:.2f}x"
    if "off" in summary:
        line += f"; continuous / off: p50 latency {c[1] / summary['off'][1]:.2f}x"
    print(line, flush=True)


if __name__ == "__main__":
    main()
