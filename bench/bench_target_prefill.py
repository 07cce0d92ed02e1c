"""How long an abandoned Explain with a template at the cap delays the next request on the target.

`python bench/bench_target_prefill.py` (real models from the conversion cache, in this process, no Ray):
the TargetModel replica's own batcher (`serve/target.make_batcher` over `serve/config.ServiceConfig`, the
continuous batching of engine/scheduler.py on one worker thread, the replica's one torch thread), and on
it, paired and alternated per trial:
- an ordinary Explain's rows alone (one site and its control, `--new-tokens` tokens): the baseline;
- a caller that submits rows whose template is at `limits.max_template_chars` / `max_template_bytes`
  and leaves `--leave-after-ms` later (its stream is cancelled, as Serve cancels the replica's task),
  then the same ordinary rows at once: how long they take from their submission, and their excess over
  the baseline of the same trial;
- both with the prefill in chunks of `batching.prefill_chunk_tokens` and with one chunk of the whole
  prompt (`--one-chunk-tokens`, the unchunked prefill a cancel cannot stop).
It also times each chunk of the huge prefill run to its end (the "one chunk" the excess is compared to).

`--service`: the same through the whole path on a real local Ray (`--config`, deploy/config/local.yaml,
its batching's `prefill_chunk_tokens` replaced by `--prefill-chunk-tokens` where given): an ordinary
Explain alone, then an Explain of the huge template whose gRPC call is cancelled `--leave-after-ms` after
it was sent, then the ordinary Explain at once; TargetModel's `stats()` says whether the huge rows were
dropped. Prints n, medians, ranges and paired ratios with 95 % intervals; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from paired import interval
from patchscope.engine.generation import GenerationConfig
from patchscope.engine.hooks import extract
from patchscope.engine.models import load_model
from patchscope.engine.runtime import TargetRuntime
from patchscope.engine.scheduler import Scheduler
from patchscope.engine.streaming import GenerateRequest
from patchscope.serve.config import ServiceConfig
from patchscope.serve.target import make_batcher

ROOT = Path(__file__).resolve().parents[1]
ORDINARY = "cat -> cat\n1135 -> 1135\nhello -> hello\n{}"  # the identity preset's template
SENTENCE = "The river runs past the old mill, and the miller counts his sacks of grain by lamplight. "


def spread(seconds: list[float]) -> str:
    """Median and range in milliseconds, with n."""
    ms = sorted(s * 1000 for s in seconds)
    return f"median {statistics.median(ms):.0f} ms, range {ms[0]:.0f}-{ms[-1]:.0f} ms (n={len(ms)})"


def huge_template(trial: int, cap: int) -> str:
    """ASCII prose of `cap` characters (and so bytes), its placeholder last.

    Distinct per trial, so that no trial finds another's prefix in the prefix cache.
    """
    head = f"{trial}: "
    body = (SENTENCE * (cap // len(SENTENCE) + 1))[: cap - len(head) - 2]
    return head + body + "{}"


def request(
    model_id: str, template: str, layer: int, vector: torch.Tensor, new_tokens: int
) -> GenerateRequest:
    """One site and its control, as an Explain of one site sends them."""
    config = GenerationConfig(max_new_tokens=new_tokens)
    return GenerateRequest(model_id, template, "?", [layer], [vector], config, control=True)


async def finish(batcher, req: GenerateRequest) -> float:
    """Seconds from submission to the last row's end."""
    started = time.perf_counter()
    async for _events in batcher.submit(req):
        pass
    return time.perf_counter() - started


async def abandoned_then_next(batcher, huge: GenerateRequest, ordinary: GenerateRequest, leave_s: float):
    """(seconds the ordinary rows took, chunks the scheduler ran meanwhile) after a huge caller left."""
    scheduler = next(iter(batcher.schedulers.values()))
    before = scheduler.chunks_run
    caller = asyncio.ensure_future(finish(batcher, huge))
    await asyncio.sleep(leave_s)
    caller.cancel()  # the caller leaves: its stream closes and the scheduler drops its rows
    try:
        await caller
    except asyncio.CancelledError:
        pass
    took = await finish(batcher, ordinary)
    return took, scheduler.chunks_run - before


def chunk_times(runtime: TargetRuntime, huge: GenerateRequest, chunk_tokens: int) -> list[float]:
    """Seconds of each `run_once` of the huge rows run alone to the end of their prefill."""
    scheduler = Scheduler(runtime, chunk_tokens=chunk_tokens)
    job = scheduler.admit(huge.rows(), huge.config, lambda _step: None)
    times = []
    while True:
        started = time.perf_counter()
        scheduler.run_once()
        times.append(time.perf_counter() - started)
        if job not in scheduler.prefilling:  # its last chunk ran (and sampled its one token)
            return times


def bench_model(model_id: str, args: argparse.Namespace) -> None:
    base = {"sources": [model_id], "targets": [model_id], "auth": {"required": False}}
    configs = {
        "chunked": ServiceConfig(**base),
        "one chunk": ServiceConfig(**base, batching={"prefill_chunk_tokens": args.one_chunk_tokens}),
    }
    chunk_tokens = configs["chunked"].batching.prefill_chunk_tokens
    cap = min(configs["chunked"].limits.max_template_chars, configs["chunked"].limits.max_template_bytes)
    options = configs["chunked"].engine_options()
    model = load_model(model_id, options=options)
    runtime = TargetRuntime.build(model, options)
    layer = model.facts.num_layers // 2
    vector = extract(model, "The river runs past the old mill", [layer], [-1]).states[0, 0]
    ordinary = request(model_id, ORDINARY, layer, vector, args.new_tokens)
    tokens = len(model.tokenizer(huge_template(0, cap)).input_ids)
    print(f"{model_id}: template of {cap} characters = {tokens} tokens; chunks of {chunk_tokens} tokens")

    for k, (name, cfg) in enumerate(configs.items()):
        runs = [
            chunk_times(
                runtime,
                request(model_id, huge_template(-1 - r - k * args.chunk_repeats, cap), layer, vector, 1),
                cfg.batching.prefill_chunk_tokens,
            )
            for r in range(args.chunk_repeats)
        ]
        print(
            f"  [{name}] the huge prefill alone, {len(runs)} runs of {len(runs[0])} chunks: each chunk "
            f"{spread([t for run in runs for t in run])}; the longest of a run "
            f"{spread([max(run) for run in runs])}"
        )
    waits: dict[str, list[float]] = {name: [] for name in configs}
    alone: dict[str, list[float]] = {name: [] for name in configs}
    chunks: dict[str, list[int]] = {name: [] for name in configs}
    with ThreadPoolExecutor(1, thread_name_prefix="target") as executor:
        batchers = {name: make_batcher(cfg, {model_id: runtime}, executor) for name, cfg in configs.items()}

        async def trials() -> None:
            for name in configs:  # warm-up: the ordinary template's prefix enters the prefix cache
                await finish(batchers[name], ordinary)
            for trial in range(args.repeats):
                order = list(configs) if trial % 2 else list(reversed(configs))
                for name in order:
                    alone[name].append(await finish(batchers[name], ordinary))
                    huge = request(model_id, huge_template(trial, cap), layer, vector, args.new_tokens)
                    took, ran = await abandoned_then_next(
                        batchers[name], huge, ordinary, args.leave_after_ms / 1000
                    )
                    waits[name].append(took)
                    chunks[name].append(ran)
            await asyncio.sleep(0.5)  # the last round's acknowledgement lands before the loop closes

        asyncio.run(trials())
    for name in configs:
        excess = [w - a for w, a in zip(waits[name], alone[name], strict=True)]
        ratios = [w / a for w, a in zip(waits[name], alone[name], strict=True)]
        print(
            f"  [{name}] the ordinary rows alone: {spread(alone[name])}\n"
            f"  [{name}] after a huge caller left: {spread(waits[name])}; excess over alone "
            f"{spread(excess)}; chunks run meanwhile {min(chunks[name])}-{max(chunks[name])} "
            f"(the ordinary rows' own included); after / alone {interval(ratios, 2)}"
        )
    ratio = [c / o for c, o in zip(waits["chunked"], waits["one chunk"], strict=True)]
    print(f"  after a huge caller left, chunked / one chunk (paired): {interval(ratio, 2)}")


def service_bench(args: argparse.Namespace) -> None:
    """The abandoned huge Explain and the next one through gRPC, Serve, the Explainer and TargetModel."""
    import grpc
    from ray import serve

    from patchscope.serve.local import APP_NAME, free_port, read_config, start
    from patchscope.wire import pb, pb_grpc

    config = read_config(args.config)
    app_args = config["applications"][0]["args"]
    if args.prefill_chunk_tokens is not None:
        app_args.setdefault("batching", {})["prefill_chunk_tokens"] = args.prefill_chunk_tokens
    settings = ServiceConfig(**app_args)
    cap = min(settings.limits.max_template_chars, settings.limits.max_template_bytes)
    model = args.models.split(",")[0]
    chunk = settings.batching.prefill_chunk_tokens
    print(f"service: {args.config}, model {model}, template of {cap} characters, prefill chunks of {chunk}")

    def explain(template: str) -> pb.ExplainRequest:
        generation = pb.GenerationOptions(max_new_tokens=args.new_tokens)
        target = pb.TargetSpec(model=model, template=template, generation=generation)
        return pb.ExplainRequest(
            source=model,
            prompt="The river runs past the old mill",
            layers=[args.layer],
            positions=[-1],
            target=target,
        )

    started = time.perf_counter()
    service = start(config, grpc_port=free_port(), http_port=free_port())
    print(f"  started in {time.perf_counter() - started:.0f} s")
    try:
        target = serve.get_deployment_handle("TargetModel", app_name=APP_NAME)
        with grpc.insecure_channel(service.address) as channel:
            stub = pb_grpc.PatchscopeStub(channel)

            def ordinary() -> float:
                began = time.perf_counter()
                events = list(stub.Explain(explain(""), timeout=300))
                if events[-1].WhichOneof("event") != "finished":
                    raise RuntimeError(f"the ordinary Explain did not finish: {events[-1]}")
                return time.perf_counter() - began

            ordinary()  # warm-up
            alone, after, dropped = [], [], []
            for trial in range(args.repeats):
                alone.append(ordinary())
                rows_before = target.stats.remote().result()["rows_dropped"]
                call = stub.Explain(explain(huge_template(trial, cap)), timeout=300)
                time.sleep(args.leave_after_ms / 1000)
                call.cancel()  # the caller leaves
                after.append(ordinary())
                dropped.append(target.stats.remote().result()["rows_dropped"] - rows_before)
        excess = [w - a for w, a in zip(after, alone, strict=True)]
        print(
            f"  ordinary Explain alone: {spread(alone)}\n"
            f"  right after a huge Explain whose caller left after {args.leave_after_ms:.0f} ms: "
            f"{spread(after)}; excess over alone {spread(excess)}; after / alone "
            f"{interval([w / a for w, a in zip(after, alone, strict=True)], 2)}\n"
            f"  TargetModel rows dropped per trial: {dropped}"
        )
    finally:
        service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--chunk-repeats", type=int, default=3, help="runs of the huge prefill alone")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--leave-after-ms", type=float, default=50.0)
    parser.add_argument("--one-chunk-tokens", type=int, default=1 << 20, help="the unchunked prefill")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the replica's torch_threads)")
    parser.add_argument("--service", action="store_true", help="through a real local Ray and gRPC")
    parser.add_argument("--config", default=str(ROOT / "deploy" / "config" / "local.yaml"))
    parser.add_argument("--layer", type=int, default=15, help="--service: the Explain's source layer")
    parser.add_argument("--prefill-chunk-tokens", type=int, default=None, help="--service: override")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    print(
        f"bench_target_prefill at {commit.stdout.strip()} on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    if args.service:
        service_bench(args)
    else:
        for model_id in args.models.split(","):
            bench_model(model_id, args)
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
