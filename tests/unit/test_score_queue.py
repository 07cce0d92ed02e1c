"""Requests that end together are scored together: one head product, and each request's scores as alone."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from patchscope.engine import scoring
from patchscope.engine.presets import PRESETS
from patchscope.engine.scoring import ScoreJob, score_continuations, score_jobs
from patchscope.serve import scores as scores_module
from patchscope.serve.scores import ScoreQueue

IDENTITY, DESCRIPTION = PRESETS["identity"], PRESETS["description"]


def jobs_of(v: int) -> list[ScoreJob]:
    """Jobs of two templates: repeats, an empty continuation, prefixes generation already knew."""
    return [
        ScoreJob(IDENTITY.template, IDENTITY.filler, [[5 % v, 9 % v, 3 % v], [5 % v, 7 % v]]),
        ScoreJob(DESCRIPTION.template, DESCRIPTION.filler, [[2 % v], [4 % v, 1 % v, 6 % v], []]),
        ScoreJob(IDENTITY.template, IDENTITY.filler, [[5 % v, 9 % v], [8 % v]], {(5 % v,): -1.5}),
    ]


def alone(runtime, job: ScoreJob) -> list[float | None]:
    return score_continuations(runtime, job.template, job.filler, job.continuations, job.known)


def assert_same(got: list[float | None], want: list[float | None]) -> None:
    assert [g is None for g in got] == [w is None for w in want]
    assert [g for g in got if g is not None] == pytest.approx([w for w in want if w is not None], abs=1e-4)


def count_head_products(runtime, monkeypatch) -> list[int]:
    """The rows of every head product `runtime`'s layout computes from now on (the layout is frozen)."""
    calls: list[int] = []
    layout = type(runtime.model.layout)
    head = layout.unembed_normed

    def counted(self, normed):
        calls.append(normed.shape[0])
        return head(self, normed)

    monkeypatch.setattr(layout, "unembed_normed", counted)
    return calls


def test_jobs_scored_together_score_as_each_alone_through_one_head_product(tiny, tiny_runtime, monkeypatch):
    jobs = jobs_of(tiny.tokenizer.vocab_size)
    want = [alone(tiny_runtime, job) for job in jobs]
    calls = count_head_products(tiny_runtime, monkeypatch)
    forwards: list[int] = []
    forward = scoring.normed_states

    def counted(target, ids, *args, **kwargs):
        if not kwargs.get("last_only", True):  # the continuations' forward (not the template's own)
            forwards.append(ids.shape[0])
        return forward(target, ids, *args, **kwargs)

    monkeypatch.setattr(scoring, "normed_states", counted)
    together = score_jobs(tiny_runtime, jobs)
    assert len(calls) == 1  # the positions of all three requests in one product
    assert forwards == [2, 1]  # one per template: the identity jobs' rows that feed tokens, together
    for got, expected in zip(together, want, strict=True):
        assert_same(got, expected)


def test_requests_waiting_for_the_worker_are_scored_in_one_drain(llama, llama_runtime):
    """Jobs that arrive while the worker thread is busy wait for it, then share one `score_jobs` call."""
    jobs = jobs_of(llama.tokenizer.vocab_size)
    want = [alone(llama_runtime, job) for job in jobs]
    with ThreadPoolExecutor(1) as executor:
        queue = ScoreQueue({llama.id: llama_runtime}, executor)

        async def main() -> list[list[float | None]]:
            busy = threading.Event()
            executor.submit(busy.wait, 10)  # the worker is in a step while the requests end
            tasks = [asyncio.ensure_future(queue.score(llama.id, job)) for job in jobs]
            left = asyncio.ensure_future(queue.score(llama.id, jobs[0]))
            await asyncio.sleep(0.05)
            left.cancel()  # a caller that left before the worker got to it
            await asyncio.sleep(0)
            busy.set()
            return await asyncio.gather(*tasks)

        got = asyncio.run(main())
        assert list(queue.batch_sizes) == [3]  # the cancelled job was not scored
        for scores, expected in zip(got, want, strict=True):
            assert_same(scores, expected)
        # A lone request later waits for nothing: its own drain.
        (single,) = [asyncio.run(queue.score(llama.id, jobs[1]))]
        assert_same(single, want[1])
        assert list(queue.batch_sizes) == [3, 1]


def test_a_failed_product_reaches_its_callers_and_the_queue_serves_on(llama, llama_runtime, monkeypatch):
    jobs = jobs_of(llama.tokenizer.vocab_size)
    real = scores_module.score_jobs
    failures = iter([True])

    def flaky(runtime, batch):
        if next(failures, False):
            raise RuntimeError("the head product failed")
        return real(runtime, batch)

    monkeypatch.setattr(scores_module, "score_jobs", flaky)
    with ThreadPoolExecutor(1) as executor:
        queue = ScoreQueue({llama.id: llama_runtime}, executor)
        with pytest.raises(RuntimeError, match="the head product failed"):
            asyncio.run(queue.score(llama.id, jobs[0]))
        assert_same(asyncio.run(queue.score(llama.id, jobs[0])), alone(llama_runtime, jobs[0]))
