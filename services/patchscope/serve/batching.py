"""Cross-request batching of patched generation, with cancellation that takes effect within one step.

Two batchers with one interface (`submit`). `ContinuousBatcher` (the default for lean-forward targets)
runs every request's rows in shared decoding steps that rows join and leave at any step
(engine/scheduler.py). `Batcher` is the per-template batching that targets on transformers' forward keep,
and what the service runs with `batching.continuous` off: concurrent calls with the same target model,
template and decoding options become rows of one batched generation. A batch opens when the first request
of a key arrives and starts `wait_s` later (or when it holds `max_rows`); requests of that key arriving
meanwhile join it. At most `max_active` batches run at once, their steps interleaved on the replica's one
worker thread (the event loop streams tokens meanwhile); requests arriving while that many run wait, and
when a batch ends everything waiting with one key starts as one batch. On the CPU a decoding step costs
about the same for 1 or 30 rows, so a waiting request loses little and the batch gains a row for free.

A request whose caller goes away (client cancel, deadline) is marked dropped; the engine asks after every
step and removes its rows, so no further step is spent on them. Sampled requests (temperature > 0) never
share a batch, so that a seed reproduces an explanation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field

from patchscope.engine.errors import InvalidArgument, PatchscopeError
from patchscope.engine.generation import GenerationConfig, Step
from patchscope.engine.generation import iter_patched_generate as _iter_patched_generate
from patchscope.engine.runtime import TargetRuntime
from patchscope.engine.scheduler import Scheduler, SchedulerFull, supported
from patchscope.engine.streaming import GenerateRequest, RowEvent, RowEventStream, row_events
from patchscope.engine.timings import Timings
from patchscope.engine.validation import check_vector
from patchscope.serve.stepping import StepDriver


class QueueFull(PatchscopeError):
    """More rows are waiting for the target model than the configured limit (RESOURCE_EXHAUSTED)."""


@dataclass(eq=False)  # identity: tickets are dictionary keys
class _Ticket:
    request: GenerateRequest
    queue: asyncio.Queue
    enqueued_at: float = field(default_factory=time.perf_counter)
    dropped: bool = False


@dataclass(frozen=True)
class _Key:
    model: str
    template: str
    filler: str
    config: GenerationConfig
    nonce: int = 0  # unique for requests that must not share a batch


_DONE = object()


class Batcher:
    """Groups requests by key into batched generations on one worker thread."""

    def __init__(
        self,
        models: dict[str, TargetRuntime],
        executor: Executor,
        *,
        enabled: bool = True,
        wait_s: float = 0.005,
        max_rows: int = 256,
        max_queued_rows: int = 4096,
        max_active: int = 2,
        on_batch: Callable[[int], None] = lambda _rows: None,
        generate: Callable[..., Iterator[Step]] = _iter_patched_generate,
    ) -> None:
        self.models = models
        self.executor = executor
        self.enabled = enabled
        self.wait_s = wait_s
        self.max_rows = max_rows
        self.max_queued_rows = max_queued_rows
        self.max_active = max_active
        self._active = 0
        self._waiting: deque[_Key] = deque()  # keys whose batch is due but all workers are busy
        self._generate = generate
        self._pending: dict[_Key, list[_Ticket]] = {}
        self._nonce = itertools.count(1)
        self.queued_rows = 0  # rows submitted and not yet finished
        self.rows_dropped = 0
        self.on_batch = on_batch  # told the rows of every batch that starts (metrics)
        self.batch_sizes: deque[int] = deque(maxlen=4096)  # the latest batches' rows, for tests and benches
        self.steps_run = 0

    def _key(self, request: GenerateRequest) -> _Key:
        shared = self.enabled and request.config.temperature == 0.0
        nonce = 0 if shared else next(self._nonce)
        return _Key(request.model, request.template, request.filler, request.config, nonce)

    async def submit(self, request: GenerateRequest) -> AsyncIterator[list[RowEvent]]:
        """Stream the request's row events, one list per decoding step; leaving early drops its rows."""
        facts = self.models[request.model].model.facts
        for k, vector in enumerate(request.vectors):
            check_vector(f"vectors[{k}]", vector, facts)
        rows = request.num_rows
        if rows > self.max_rows:  # a batch never holds more than max_rows: this one could never run
            raise InvalidArgument(
                "rows", "more rows than the target runs at once", limit=f"<= {self.max_rows}", value=rows
            )
        if self.queued_rows + rows > self.max_queued_rows:
            raise QueueFull(
                f"target model queue is full ({self.queued_rows} rows waiting, "
                f"limit {self.max_queued_rows}); retry after a short backoff"
            )
        ticket = _Ticket(request, asyncio.Queue())
        self.queued_rows += rows
        key = self._key(request)
        first = key not in self._pending
        self._pending.setdefault(key, []).append(ticket)
        if sum(t.request.num_rows for t in self._pending[key]) >= self.max_rows or self.wait_s == 0:
            self._start(key)
        elif first:
            asyncio.get_running_loop().call_later(self.wait_s, self._start, key)
        completed = False
        try:
            while (item := await ticket.queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
            completed = True
        finally:
            if not completed:
                ticket.dropped = True  # the caller left before the end: stop spending steps on it
            self.queued_rows -= rows

    def _start(self, key: _Key) -> None:
        if key not in self._pending:
            return
        if self._active >= self.max_active:
            if key not in self._waiting:
                self._waiting.append(key)
            return
        pending = self._pending.pop(key)
        tickets, rows = [], 0
        while pending and rows + pending[0].request.num_rows <= self.max_rows:
            rows += pending[0].request.num_rows
            tickets.append(pending.pop(0))
        self._active += 1
        asyncio.get_running_loop().create_task(self._run(key, tickets))
        if pending:  # the rest make the next batch of this key: now if a worker is free, else queued
            self._pending[key] = pending
            self._start(key)

    def _finished(self) -> None:
        self._active -= 1
        while self._waiting and self._active < self.max_active:
            self._start(self._waiting.popleft())

    async def _run(self, key: _Key, tickets: list[_Ticket]) -> None:
        live = [t for t in tickets if not t.dropped]
        try:
            if live:
                await self._generate_for(key, live)
        except BaseException as error:  # delivered to every caller still waiting, never swallowed
            for ticket in live:
                ticket.queue.put_nowait(error)
                ticket.queue.put_nowait(_DONE)
            if not isinstance(error, Exception):
                raise
        finally:
            self._finished()

    async def _generate_for(self, key: _Key, live: list[_Ticket]) -> None:
        runtime = self.models[key.model]
        owners: list[tuple[_Ticket, int]] = [(t, k) for t in live for k in range(t.request.num_rows)]
        rows = [row for t in live for row in t.request.rows()]  # in the order of `owners`
        controls: dict[int, int] = {}  # batch row -> the control row of its request
        start = 0
        for ticket in live:
            if ticket.request.control:
                control = start + ticket.request.num_rows - 1
                controls.update({start + k: control for k in range(ticket.request.num_rows)})
            start += ticket.request.num_rows
        self.batch_sizes.append(len(rows))
        self.on_batch(len(rows))
        open_rows = {t: t.request.num_rows for t in live}
        timings = Timings()
        started = time.perf_counter()
        loop = asyncio.get_running_loop()

        def dropped(row: int) -> bool:
            ticket = owners[row][0]
            if ticket.dropped:
                self.rows_dropped += 1
            return ticket.dropped

        steps = self._generate(
            runtime, rows, key.config, timings=timings, dropped=dropped, keep_logits=bool(controls)
        )
        tokenizer = runtime.model.tokenizer
        stream = row_events(
            steps, tokenizer, key.config.max_new_tokens, timings, controls or None, key.config.stop
        )
        # Each step (the model's work and the text decoding) runs on the worker thread.
        while (step := await loop.run_in_executor(self.executor, next, stream, None)) is not None:
            self.steps_run += 1
            events: dict[_Ticket, list[RowEvent]] = {}
            finishing: list[_Ticket] = []
            for event in step:
                ticket, local = owners[event.row]
                finished_timings = None
                if event.finished:
                    assert event.timings is not None
                    finished_timings = dataclasses.replace(
                        event.timings, queue_s=started - ticket.enqueued_at
                    )
                    open_rows[ticket] -= 1
                    if open_rows[ticket] == 0:
                        finishing.append(ticket)
                events.setdefault(ticket, []).append(
                    dataclasses.replace(event, row=local, timings=finished_timings)
                )
            for ticket, batch in events.items():
                if not ticket.dropped:
                    ticket.queue.put_nowait(batch)
            for ticket in finishing:
                ticket.queue.put_nowait(_DONE)
        if any(open_rows[t] > 0 and not t.dropped for t in live):
            raise RuntimeError("generation ended before every row finished")


class ContinuousBatcher:
    """Continuous batching (engine/scheduler.py) for lean-forward targets, `fallback`'s batches for the rest.

    A request is admitted at once (or refused at once: the row cap, the queue) and joins the running rows
    at the next step. The steps run on the worker thread, driven there a bounded lead ahead of the event
    loop (serve/stepping.py), so the logit lens and scoring interleave with them and no step waits for the
    loop to stream the one before it. A request's steps become its row events on the worker thread, then
    cross to the event loop. Targets on transformers' forward keep per-template batches.
    """

    def __init__(
        self,
        models: dict[str, TargetRuntime],
        executor: Executor,
        *,
        max_rows: int = 256,
        chunk_tokens: int = 128,
        max_queued_rows: int = 4096,
        fallback: Batcher | None = None,
        on_batch: Callable[[int], None] = lambda _rows: None,
        step_options: dict[str, object] | None = None,
    ) -> None:
        self.models = models
        self.executor = executor
        self.max_queued_rows = max_queued_rows
        self.schedulers = {
            model_id: Scheduler(runtime, max_rows=max_rows, chunk_tokens=chunk_tokens, **(step_options or {}))
            for model_id, runtime in models.items()
            if supported(runtime)
        }
        self.fallback = fallback or Batcher(
            models, executor, max_rows=max_rows, max_queued_rows=max_queued_rows, on_batch=on_batch
        )
        self.on_batch = on_batch
        self.driver = StepDriver(self.schedulers, executor, self._fail)
        self._jobs: dict = {}  # open jobs -> (loop, queue), so a failed step reaches their callers
        self._queued = 0  # rows submitted to the schedulers and not yet finished

    @property
    def queued_rows(self) -> int:
        return self._queued + self.fallback.queued_rows

    @property
    def steps_run(self) -> int:
        return sum(s.steps_run for s in self.schedulers.values()) + self.fallback.steps_run

    @property
    def rows_dropped(self) -> int:
        return sum(s.rows_dropped for s in self.schedulers.values()) + self.fallback.rows_dropped

    @property
    def batch_sizes(self) -> list[int]:
        """Rows of the latest decode steps (continuous), then the fallback's batches."""
        sizes = [n for s in self.schedulers.values() for n in s.step_sizes]
        return sizes + list(self.fallback.batch_sizes)

    async def submit(self, request: GenerateRequest) -> AsyncIterator[list[RowEvent]]:
        """Stream the request's row events, one list per step it takes part in; leaving drops its rows."""
        scheduler = self.schedulers.get(request.model)
        if scheduler is None:
            async for events in self.fallback.submit(request):
                yield events
            return
        runtime = self.models[request.model]
        for k, vector in enumerate(request.vectors):
            check_vector(f"vectors[{k}]", vector, runtime.model.facts)
        rows = request.num_rows
        if self.queued_rows + rows > self.max_queued_rows:
            raise QueueFull(
                f"target model queue is full ({self.queued_rows} rows waiting, "
                f"limit {self.max_queued_rows}); retry after a short backoff"
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        dropped = False
        controls = {k: rows - 1 for k in range(rows)} if request.control else None
        enqueued_at = time.perf_counter()
        timings = Timings()
        stream = RowEventStream(
            runtime.model.tokenizer, request.config.max_new_tokens, timings, controls, request.config.stop
        )
        open_rows = rows

        def on_step(step: Step) -> None:  # on the worker thread: text decoding stays off the event loop
            nonlocal open_rows, dropped
            events = stream.feed(step)
            open_rows -= sum(e.finished for e in events)
            if not _post(loop, queue, events):
                dropped = True  # the caller's event loop has closed: nobody reads this stream any more
            elif open_rows == 0:
                _post(loop, queue, _DONE)

        try:
            job = scheduler.admit(
                request.rows(),
                request.config,
                on_step,
                keep_logits=controls is not None,
                dropped=lambda: dropped,
                on_error=lambda error: _post(loop, queue, error),
                timings=timings,
            )
        except SchedulerFull as full:
            raise QueueFull(str(full)) from None
        self._jobs[job] = (loop, queue)
        self._queued += rows
        self.on_batch(rows)
        self.driver.wake()
        completed = False
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield [_with_queue_time(e, enqueued_at) for e in item]
            completed = True
        finally:
            if not completed:
                dropped = True  # the scheduler drops its rows before its next step or chunk
            self._queued -= rows
            self._jobs.pop(job, None)

    def _fail(self, scheduler: Scheduler, error: Exception) -> None:
        for job in scheduler.fail():  # every open job of that target hears the error
            if (entry := self._jobs.get(job)) is not None:
                _post(*entry, error)


def _post(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item: object) -> bool:
    """Hand `item` to a caller's queue from the worker thread; False when the caller's loop has closed.

    A closed loop is a caller that has gone: it must not fail the step every other request shares.
    """
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:
        return False
    return True


def _with_queue_time(event: RowEvent, enqueued_at: float) -> RowEvent:
    """A finished event's timings with `queue_s`: the time since arrival not spent on the row's work."""
    if not event.finished or event.timings is None:
        return event
    t = event.timings
    waited = max(0.0, time.perf_counter() - enqueued_at - t.prefill_s - t.decode_s)
    return dataclasses.replace(event, timings=dataclasses.replace(t, queue_s=waited))
