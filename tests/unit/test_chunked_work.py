"""The source pass and the logit lens in chunks: same answers, and a caller that leaves stops them.

A cancel is made to land between two chunks for certain: the chunk after the first waits, on the worker
thread, until the test has cancelled the caller; the work must then run no chunk after that one, leave
no hook on the model, and the same single-thread executor must serve the next call correctly.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from patchscope.engine.errors import InvalidArgument
from patchscope.engine.hooks import drain, extract, iter_extract
from patchscope.engine.lens import iter_logit_lens, logit_lens
from patchscope.serve.chunked import run_chunked
from patchscope.serve.hosting import Hosted
from patchscope.serve.source import SourceModel

PROMPT = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat by the door"
LAYERS = [0, 2, 3]
POSITIONS = [1, 5, -1, 3, 5]  # unordered, one twice, the last counted from the end


class Counted:
    """Wraps chunked work: counts the chunks it ran; chunk `hold_at` (1-based) waits for `release`."""

    def __init__(self, work: Generator, hold_at: int | None = None) -> None:
        self.work, self.hold_at = work, hold_at
        self.chunks = 0
        self.holding = threading.Event()  # set while chunk `hold_at` waits
        self.release = threading.Event()

    def run(self) -> Generator:
        while True:
            if self.chunks + 1 == self.hold_at:
                self.holding.set()
                assert self.release.wait(30), "the test never released the held chunk"
            self.chunks += 1
            try:
                next(self.work)
            except StopIteration as stop:
                return stop.value
            yield


def hooks_left(model) -> int:
    return sum(len(block._forward_hooks) for block in model.layout.blocks)


async def idle(executor: ThreadPoolExecutor) -> None:
    """Wait until every task queued on the (single-thread) executor so far has run."""
    await asyncio.get_running_loop().run_in_executor(executor, lambda: None)


async def cancel_while_holding(executor: ThreadPoolExecutor, counted: Counted) -> None:
    """Start the work, cancel its caller while chunk `hold_at` runs, then let that chunk finish."""
    task = asyncio.ensure_future(run_chunked(executor, counted.run()))
    while not counted.holding.is_set():
        await asyncio.sleep(0.001)
    task.cancel()
    await asyncio.sleep(0)  # the cancel reaches the task's await before the chunk ends
    counted.release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    await idle(executor)


def test_chunked_source_pass_gives_the_one_pass_states(tiny):
    full = extract(tiny, PROMPT, LAYERS, POSITIONS)
    for chunk_tokens in (1, 7, 10_000):
        got = drain(iter_extract(tiny, PROMPT, LAYERS, POSITIONS, chunk_tokens=chunk_tokens))
        assert got.positions == full.positions and got.token_ids == full.token_ids
        torch.testing.assert_close(got.states, full.states, atol=1e-4, rtol=1e-4)
    assert hooks_left(tiny) == 0


def test_source_pass_runs_one_chunk_per_step_and_stops_after_the_last_position(llama):
    tokens = len(extract(llama, PROMPT, [0]).token_ids)
    assert tokens > 12
    whole = Counted(iter_extract(llama, PROMPT, [1], [-1], chunk_tokens=4))
    drain(whole.run())
    assert whole.chunks == -(-tokens // 4)
    early = Counted(iter_extract(llama, PROMPT, [1], [2, 5], chunk_tokens=4))
    drain(early.run())
    assert early.chunks == 2  # positions 2 and 5 lie in the first two chunks: the rest never runs


def test_cancel_between_source_chunks_stops_the_pass_and_the_next_call_is_served(llama):
    async def scenario() -> None:
        executor = ThreadPoolExecutor(max_workers=1)
        counted = Counted(iter_extract(llama, PROMPT * 4, LAYERS, [-1], chunk_tokens=4), hold_at=2)
        await cancel_while_holding(executor, counted)
        assert counted.chunks == 2  # the held chunk finished; none after it ran (the prompt has ~25)
        assert hooks_left(llama) == 0
        nxt = await run_chunked(executor, iter_extract(llama, PROMPT, LAYERS, POSITIONS, chunk_tokens=4))
        torch.testing.assert_close(nxt.states, extract(llama, PROMPT, LAYERS, POSITIONS).states)
        executor.shutdown()

    asyncio.run(scenario())


def test_an_abandoned_pass_delays_the_next_call_by_at_most_one_chunk(llama):
    """The next call's first chunk runs right after the abandoned call's chunk in flight."""
    order: list[str] = []

    def logged(name: str, work: Generator) -> Generator:
        while True:
            try:
                next(work)
            except StopIteration as stop:
                order.append(name)
                return stop.value
            order.append(name)
            yield

    async def scenario() -> None:
        executor = ThreadPoolExecutor(max_workers=1)
        held = Counted(logged("huge", iter_extract(llama, PROMPT * 4, [3], [-1], chunk_tokens=4)), hold_at=3)
        huge = asyncio.ensure_future(run_chunked(executor, held.run()))
        while not held.holding.is_set():
            await asyncio.sleep(0.001)
        nxt = asyncio.ensure_future(run_chunked(executor, logged("next", iter_extract(llama, PROMPT, [3]))))
        await asyncio.sleep(0.01)  # the next call's first chunk is queued behind the held one
        huge.cancel()
        await asyncio.sleep(0)
        held.release.set()
        with pytest.raises(asyncio.CancelledError):
            await huge
        await nxt
        executor.shutdown()

    asyncio.run(scenario())
    assert order == ["huge", "huge", "huge", "next"]  # chunk 3 was in flight; the next call came after it


def test_source_deployment_extracts_in_chunks_and_a_bad_call_leaves_it_serving(llama):
    replica = object.__new__(SourceModel.func_or_class)  # the class itself, without Serve or a config
    replica.hosted = Hosted(config=None, models={llama.id: llama}, cards={})
    replica.executor = ThreadPoolExecutor(max_workers=1)
    replica.chunk_tokens = 3

    async def scenario() -> None:
        with pytest.raises(InvalidArgument):
            await replica.extract(llama.id, PROMPT, [99], None)
        got = await replica.extract(llama.id, PROMPT, LAYERS, POSITIONS)
        torch.testing.assert_close(got.states, extract(llama, PROMPT, LAYERS, POSITIONS).states)

    asyncio.run(scenario())
    replica.executor.shutdown()


def test_chunked_logit_lens_reads_each_state_as_alone(llama):
    torch.manual_seed(0)
    vectors = [torch.randn(llama.facts.hidden_size) for _ in range(11)]
    readings = drain(iter_logit_lens(llama, vectors, 5, chunk_sites=4))
    assert readings == [logit_lens(llama, v, 5) for v in vectors]


def test_cancel_between_lens_chunks_stops_the_lens_and_the_next_call_is_served(llama):
    torch.manual_seed(1)
    vectors = [torch.randn(llama.facts.hidden_size) for _ in range(40)]

    async def scenario() -> None:
        executor = ThreadPoolExecutor(max_workers=1)
        counted = Counted(iter_logit_lens(llama, vectors, 3, chunk_sites=4), hold_at=2)
        await cancel_while_holding(executor, counted)
        assert counted.chunks == 2  # of 10
        readings = await run_chunked(executor, iter_logit_lens(llama, vectors[:5], 3, chunk_sites=4))
        assert readings == [logit_lens(llama, v, 3) for v in vectors[:5]]
        executor.shutdown()

    asyncio.run(scenario())


@pytest.mark.realmodel
@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_real_models_chunked_source_pass_gives_the_one_pass_states(fixture, request):
    model = request.getfixturevalue(fixture)
    prompt = " ".join(["The river runs past the old mill, and the miller counts his sacks of grain."] * 12)
    full = extract(model, prompt, [0, 5, -1], [3, 100, -1])
    assert len(full.token_ids) > 3 * 64
    got = drain(iter_extract(model, prompt, [0, 5, -1], [3, 100, -1], chunk_tokens=64))
    scale = full.states.abs().amax(dim=-1, keepdim=True)  # per state: the residual stream grows with depth
    assert ((got.states - full.states).abs() / scale).max() < 1e-3
