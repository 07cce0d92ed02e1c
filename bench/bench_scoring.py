"""Unpatched scoring under load: each finished request scored on its own, or through the `ScoreQueue`.

The TargetModel deployment's code without Ray (the GPU image and the CI have none): continuous batching on
both hosted targets (smollm2-135m, gemma3-270m, each patched with its own states), Poisson arrivals from
`--clients` clients, 3 sites + the control row per request, and every request's unpatched scores computed
after its rows end, as `TargetModel.generate` does. Two ways, rounds alternated: each request's scoring as
its own task on the worker thread (`score_jobs` of one job), and `serve/scores.ScoreQueue` (everything
waiting when the worker gets to it: one forward per template, one head product). Prints sites/s, the paired
ratio with a 95 % interval, the jobs per queued product, and whether any score differs between the two
(beyond 1e-4) — asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from bench_service import NEW_TOKENS, TARGETS, target_pool
from paired import interval
from patchscope.engine.options import DEFAULTS
from patchscope.engine.scoring import score_jobs, with_unpatched_scores
from patchscope.engine.streaming import GenerateRequest
from patchscope.serve.config import ServiceConfig
from patchscope.serve.scores import ScoreQueue
from patchscope.serve.target import make_batcher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=6, help="rounds per way, alternated")
    parser.add_argument("--requests", type=int, default=3, help="requests per client per round")
    parser.add_argument("--rate", type=float, default=2.0, help="each client's arrivals per second")
    args = parser.parse_args()
    torch.set_num_threads(2)
    runtimes, pool = target_pool(DEFAULTS)
    config = ServiceConfig(
        sources=["smollm2-135m"],
        targets=list(TARGETS),
        auth={"required": False},
        batching={"continuous": True},
    )
    with ThreadPoolExecutor(1, thread_name_prefix="target") as executor:
        batcher = make_batcher(config, runtimes, executor)
        queue = ScoreQueue(runtimes, executor)

        def alone(request: GenerateRequest):
            loop = asyncio.get_running_loop()
            runtime = runtimes[request.model]
            return lambda job: loop.run_in_executor(executor, lambda: score_jobs(runtime, [job])[0])

        def queued(request: GenerateRequest):
            return lambda job: queue.score(request.model, job)

        ways = {"each alone": alone, "queue": queued}

        async def one(way: str, request: GenerateRequest) -> tuple | None:
            score = ways[way](request)
            scores = None
            steps = batcher.submit(request)
            async for events in with_unpatched_scores(request, steps, runtimes[request.model], score):
                scores = next((e.unpatched_logprobs for e in events if e.unpatched_logprobs), scores)
            return scores

        async def offered_load(way: str, seed: int) -> tuple[float, list[tuple[int, tuple | None]]]:
            rng = random.Random(seed)
            plan = [
                [(rng.expovariate(args.rate), rng.randrange(len(pool))) for _ in range(args.requests)]
                for _ in range(args.clients)
            ]
            done: list[tuple[int, tuple | None]] = []

            async def client(arrivals) -> None:
                for gap, index in arrivals:
                    await asyncio.sleep(gap)
                    done.append((index, await one(way, pool[index])))

            started = time.perf_counter()
            await asyncio.gather(*(client(a) for a in plan))
            return 3 * len(done) / (time.perf_counter() - started), done

        asyncio.run(offered_load("each alone", seed=0))  # warm-up: caches, allocations
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        print(
            f"unpatched scoring under load · commit {commit.stdout.strip()} · "
            f"{platform.processor() or platform.machine()} · {os.cpu_count()} CPUs · 2 torch threads · "
            f"{args.clients} clients x {args.requests} requests per round, "
            f"Poisson {args.rate}/s per client · "
            f"3 sites + control, {NEW_TOKENS} new tokens, continuous batching, targets {', '.join(TARGETS)}",
            flush=True,
        )
        rates: dict[str, list[float]] = {way: [] for way in ways}
        ratios, sizes, reference, differ, scored = [], [], {}, 0, 0
        for repeat in range(args.repeats):
            order = list(ways) if repeat % 2 == 0 else list(ways)[::-1]
            got = {}
            for way in order:
                queue.batch_sizes.clear()
                got[way], done = asyncio.run(offered_load(way, seed=100 + repeat))
                rates[way].append(got[way])
                sizes += queue.batch_sizes
                for index, scores in done:
                    scored += 1
                    first = reference.setdefault(index, scores)
                    differ += any(
                        (a is None) != (b is None) or (a is not None and abs(a - b) > 1e-4)
                        for a, b in zip(scores or (), first or (), strict=True)
                    )
            ratios.append(got["queue"] / got["each alone"])
            print(
                f"    round {repeat}: " + ", ".join(f"{w} {r:.2f} sites/s" for w, r in got.items()),
                flush=True,
            )
        medians = ", ".join(f"{w} {statistics.median(r):.2f}" for w, r in rates.items())
        print(f"  sites/s (median of {args.repeats}): {medians}; queue / each alone {interval(ratios)}")
        print(
            f"  jobs per queued product: mean {statistics.mean(sizes):.2f}, max {max(sizes)}, "
            f"n={len(sizes)}; "
            f"requests whose scores differ from their first scoring: {differ} of {scored}"
        )


if __name__ == "__main__":
    main()
