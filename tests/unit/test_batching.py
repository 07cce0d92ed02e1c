"""Cross-request batching: shared batches give the same text as one generation, cancel drops rows."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from patchscope.engine.errors import InvalidArgument
from patchscope.engine.generation import GenerationConfig, PatchedRow, RowPatch, patched_generate
from patchscope.engine.hooks import extract
from patchscope.engine.models import load_directory
from patchscope.engine.options import EngineOptions
from patchscope.engine.runtime import TargetRuntime
from patchscope.engine.streaming import GenerateRequest
from patchscope.serve.batching import Batcher, ContinuousBatcher, QueueFull
from patchscope.serve.stepping import LEAD

TEMPLATE = "cat -> cat\n1135 -> 1135\nhello -> hello\n{}"


def requests(llama, n: int, max_new_tokens: int = 8, temperature: float = 0.0) -> list[GenerateRequest]:
    hidden = extract(llama, "The river runs past the old mill and the bakery", [1, 2, 3], [1, 2, 3, -1])
    vectors = hidden.states.reshape(-1, hidden.states.shape[-1])  # 12 rows
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=1)
    return [
        GenerateRequest(
            "tiny-llama",
            TEMPLATE,
            "?",
            [1 + (i + k) % 3 for k in range(2)],
            [vectors[i], vectors[i + 1]],
            config,
        )
        for i in range(n)
    ]


async def consume(
    batcher: Batcher, request: GenerateRequest, stop_after: int | None = None
) -> dict[int, str]:
    texts: dict[int, str] = {}
    finals: dict[int, str] = {}
    steps = 0
    async for events in batcher.submit(request):
        for e in events:
            texts[e.row] = texts.get(e.row, "") + e.text
            if e.finished:
                finals[e.row] = e.explanation
        steps += 1
        if stop_after is not None and steps >= stop_after:
            break
    assert all(texts[r] == finals[r] for r in finals), "streamed deltas must add up to the explanation"
    return finals


def expected(runtime, request: GenerateRequest) -> list[str]:
    rows = [
        PatchedRow(TEMPLATE, "?", (RowPatch(layer=layer, vector=v),))
        for layer, v in zip(request.layers, request.vectors, strict=True)
    ]
    return [g.text for g in patched_generate(runtime, rows, request.config)]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def batcher(llama_runtime):
    with ThreadPoolExecutor(1) as executor:
        yield Batcher({"tiny-llama": llama_runtime}, executor, wait_s=0.05)


def test_concurrent_requests_share_one_batch_and_match_separate_generation(llama, llama_runtime, batcher):
    reqs = requests(llama, 4)

    async def main():
        return await asyncio.gather(*(consume(batcher, r) for r in reqs))

    results = run(main())
    assert list(batcher.batch_sizes) == [8], "four requests of two rows each must form one batch"
    for request, result in zip(reqs, results, strict=True):
        assert [result[k] for k in range(2)] == expected(llama_runtime, request)
    assert batcher.queued_rows == 0


def test_batching_off_runs_each_request_alone(llama, llama_runtime):
    reqs = requests(llama, 3)
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher({"tiny-llama": llama_runtime}, executor, enabled=False)

        async def main():
            return await asyncio.gather(*(consume(batcher, r) for r in reqs))

        results = run(main())
    assert list(batcher.batch_sizes) == [2, 2, 2]
    assert [results[0][k] for k in range(2)] == expected(llama_runtime, reqs[0])


def test_a_caller_that_leaves_stops_its_rows_within_one_step(llama, llama_runtime, batcher):
    keep, leave = requests(llama, 2, max_new_tokens=40)

    async def main():
        return await asyncio.gather(consume(batcher, keep), consume(batcher, leave, stop_after=2))

    kept, _ = run(main())
    assert batcher.rows_dropped == 2, "both rows of the leaving request must leave the batch"
    assert [kept[k] for k in range(2)] == expected(llama_runtime, keep)


def test_sampled_requests_never_share_a_batch(llama, llama_runtime, batcher):
    reqs = requests(llama, 2, temperature=0.7)

    async def main():
        return await asyncio.gather(*(consume(batcher, r) for r in reqs))

    run(main())
    assert list(batcher.batch_sizes) == [2, 2]


def test_a_full_queue_is_refused_with_retry_advice(llama, llama_runtime):
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher({"tiny-llama": llama_runtime}, executor, max_queued_rows=3)
        reqs = requests(llama, 2)

        async def main():
            first = consume(batcher, reqs[0])
            task = asyncio.ensure_future(first)
            await asyncio.sleep(0)
            with pytest.raises(QueueFull, match="retry"):
                await consume(batcher, reqs[1])
            await task

        run(main())


def test_wrong_vector_width_is_refused_before_queuing(llama, llama_runtime, batcher):
    (request,) = requests(llama, 1)
    bad = GenerateRequest(request.model, TEMPLATE, "?", [1], [torch.zeros(7)], request.config)

    async def main():
        await consume(batcher, bad)

    with pytest.raises(ValueError, match=r"vectors\[0\]"):
        run(main())
    assert batcher.queued_rows == 0


def test_requests_arriving_while_the_workers_are_busy_start_together(llama, llama_runtime):
    first, *later = requests(llama, 4, max_new_tokens=12)
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher({"tiny-llama": llama_runtime}, executor, wait_s=0.0, max_active=1)

        async def main():
            running = asyncio.ensure_future(consume(batcher, first))
            await asyncio.sleep(0.01)  # the first batch is generating
            results = await asyncio.gather(*(consume(batcher, r) for r in later))
            return [await running, *results]

        results = run(main())
    assert list(batcher.batch_sizes) == [2, 6]
    for request, result in zip([first, *later], results, strict=True):
        assert [result[k] for k in range(2)] == expected(llama_runtime, request)


# Continuous batching: the same guarantees, rows sharing steps instead of batches.


@pytest.fixture
def continuous(llama_runtime):
    with ThreadPoolExecutor(1) as executor:
        yield ContinuousBatcher({"tiny-llama": llama_runtime}, executor, chunk_tokens=4)


def test_continuous_requests_arriving_apart_share_steps_and_match_separate_generation(
    llama, llama_runtime, continuous
):
    reqs = requests(llama, 4, max_new_tokens=40)

    async def main():
        tasks = []
        for r in reqs:  # arriving one after another, mid-generation: each once the one before is running
            tasks.append(asyncio.ensure_future(consume(continuous, r)))
            for _ in range(400):
                await asyncio.sleep(0.001)
                scheduler = continuous.schedulers.get("tiny-llama")
                if scheduler is not None and scheduler.rows >= 2 * len(tasks):
                    break
        return await asyncio.gather(*tasks)

    results = run(main())
    assert max(continuous.batch_sizes) > 2, "later requests must join the running rows"
    for request, result in zip(reqs, results, strict=True):
        assert [result[k] for k in range(2)] == expected(llama_runtime, request)
    assert continuous.queued_rows == 0 and continuous.schedulers["tiny-llama"].rows == 0


def test_continuous_a_caller_that_leaves_stops_its_rows_within_one_step(llama, llama_runtime, continuous):
    keep, leave = requests(llama, 2, max_new_tokens=40)

    async def main():
        return await asyncio.gather(consume(continuous, keep), consume(continuous, leave, stop_after=2))

    kept, _ = run(main())
    assert continuous.rows_dropped == 2
    assert [kept[k] for k in range(2)] == expected(llama_runtime, keep)


def test_continuous_a_caller_whose_event_loop_closed_mid_stream_fails_no_one_else(
    llama, llama_runtime, continuous
):
    gone_request, request = requests(llama, 2, max_new_tokens=32)
    scheduler = continuous.schedulers["tiny-llama"]
    gone_loop = asyncio.new_event_loop()
    stream = continuous.submit(gone_request)
    gone_loop.run_until_complete(anext(stream))  # running, never closed: its loop just stops and closes
    gone_loop.close()
    result = run(consume(continuous, request))
    assert [result[k] for k in range(2)] == expected(llama_runtime, request)
    assert scheduler.rows == 0 and scheduler.rows_dropped == 2, "the orphaned rows leave, nothing else"
    del stream


def test_continuous_controls_carry_their_signals(llama, llama_runtime, continuous):
    (request,) = requests(llama, 1)
    request = GenerateRequest(
        request.model, TEMPLATE, "?", request.layers, request.vectors, request.config, control=True
    )

    async def main():
        events = []
        async for step in continuous.submit(request):
            events += step
        return events

    finished = {e.row: e for e in run(main()) if e.finished}
    assert set(finished) == {0, 1, 2}
    assert finished[2].patch_effect == 0.0, "the control row is its own control"
    assert all(finished[r].patch_effect is not None and finished[r].logprob is not None for r in (0, 1))
    assert [finished[r].explanation for r in (0, 1)] == expected(llama_runtime, request)


def test_continuous_a_full_target_is_refused_at_once_with_retry_advice(llama, llama_runtime):
    with ThreadPoolExecutor(1) as executor:
        batcher = ContinuousBatcher({"tiny-llama": llama_runtime}, executor, max_rows=3)
        reqs = requests(llama, 2)

        async def main():
            task = asyncio.ensure_future(consume(batcher, reqs[0]))
            await asyncio.sleep(0)
            started = time.perf_counter()
            with pytest.raises(QueueFull, match="retry"):
                await consume(batcher, reqs[1])
            refused_after = time.perf_counter() - started
            await task
            return refused_after

        refused_after = run(main())
    assert refused_after < 0.5, "refused without waiting for the running request"


def test_a_transformers_forward_target_falls_back_to_template_batches(llama, tiny_dirs):
    model = load_directory("tiny-llama", tiny_dirs["llama"])
    stock = TargetRuntime.build(model, EngineOptions(forward="transformers"))
    reqs = requests(llama, 2)
    with ThreadPoolExecutor(1) as executor:
        batcher = ContinuousBatcher({"tiny-llama": stock}, executor)
        assert batcher.schedulers == {}

        async def main():
            return await asyncio.gather(*(consume(batcher, r) for r in reqs))

        results = run(main())
    assert batcher.fallback.batch_sizes, "the fallback batcher ran the requests"
    assert [results[0][k] for k in range(2)] == expected(stock, reqs[0])


def test_the_fallback_batcher_caps_a_batch_at_max_rows(llama, llama_runtime):
    reqs = requests(llama, 4)
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher({"tiny-llama": llama_runtime}, executor, wait_s=0.05, max_rows=4)

        async def main():
            return await asyncio.gather(*(consume(batcher, r) for r in reqs))

        run(main())
        assert max(batcher.batch_sizes) <= 4 and sum(batcher.batch_sizes) == 8

        async def too_big():
            await consume(batcher, GenerateRequest(*_fields(reqs[0], 5)))

        with pytest.raises(InvalidArgument, match="rows"):
            run(too_big())


def _fields(request: GenerateRequest, rows: int) -> tuple:
    return (request.model, TEMPLATE, "?", [1] * rows, [request.vectors[0]] * rows, request.config)


def test_the_config_picks_continuous_batching_its_row_cap_and_its_step(llama_runtime):
    from patchscope.serve.config import ServiceConfig
    from patchscope.serve.target import make_batcher

    base = dict(sources=["tiny-llama"], targets=["tiny-llama"], auth={"required": False})
    runtimes = {"tiny-llama": llama_runtime}
    with ThreadPoolExecutor(1) as executor:
        config = ServiceConfig(**base, batching={"max_rows": 8, "step": "bucketed"})
        batcher = make_batcher(config, runtimes, executor)
        assert isinstance(batcher, ContinuousBatcher)
        scheduler = batcher.schedulers["tiny-llama"]
        assert scheduler.max_rows == config.limits.max_sites + 1, "raised so every admitted request fits"
        assert scheduler.fast is not None and scheduler.fast.mode is None
        off = ServiceConfig(**base, batching={"continuous": False})
        assert type(make_batcher(off, runtimes, executor)) is Batcher


def test_continuous_steps_run_a_bounded_lead_ahead_of_a_busy_event_loop(llama, llama_runtime, continuous):
    (request,) = requests(llama, 1, max_new_tokens=24)
    scheduler = continuous.schedulers["tiny-llama"]

    async def main() -> tuple[int, int, int]:
        stream = continuous.submit(request)
        await anext(stream)  # the request is running
        before = scheduler.steps_run
        time.sleep(1.0)  # the event loop streams nothing meanwhile (a slow consumer, a busy replica)
        during = scheduler.steps_run
        async for _ in stream:
            pass
        return before, during, scheduler.steps_run

    before, during, end = run(main())
    assert end - before > LEAD + 2, "the request must still have steps to run when the loop blocks"
    assert during - before >= 2, "the next step must not wait for the event loop to stream the last one"
    assert during - before <= LEAD + 1, "a stalled loop stalls the steps: a leaving caller is seen soon"


def test_the_step_driver_stops_quietly_when_its_event_loop_has_closed(caplog):
    from patchscope.serve.stepping import StepDriver

    class Busy:
        """A scheduler with work forever, whose steps wait until the loop that admitted it is gone."""

        def __init__(self) -> None:
            self.steps = 0
            self.loop_closed = threading.Event()

        def busy(self) -> bool:
            return True

        def run_once(self) -> None:
            self.loop_closed.wait(5)
            self.steps += 1

    scheduler = Busy()
    with ThreadPoolExecutor(1) as executor:
        driver = StepDriver({"t": scheduler}, executor, fail=lambda s, e: None)

        async def admit() -> None:
            driver.wake()

        with caplog.at_level("ERROR", logger="patchscope.serve"):
            asyncio.run(admit())
            scheduler.loop_closed.set()
    assert scheduler.steps == 1 and not driver._driving
    assert not [r for r in caplog.records if "step driver stopped" in r.getMessage()]
