"""Continuous batching's steps, driven on the replica's worker thread, a bounded lead ahead of the loop.

Why: a driver task on the event loop that awaited each step before submitting the next made every step
wait for the loop to stream the one before it (and, on a loaded machine, for the loop's thread to get a
CPU), a wait each step of a lone request paid. Here each round of steps (one `run_once` per busy
scheduler) queues the next on the worker thread itself, behind whatever else waits for that thread (the
logit lens, scoring, which so interleave with steps). The loop acknowledges each round; at most `LEAD`
rounds run unacknowledged, so a caller that leaves, which the loop notices, has its rows dropped within a
few steps, and a stalled loop stalls the steps instead of letting them run on unseen.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Executor

from patchscope.engine.scheduler import Scheduler

logger = logging.getLogger("patchscope.serve")
LEAD = 2  # rounds of steps the worker thread may run ahead of the event loop's acknowledgements


class StepDriver:
    """Runs the schedulers' rounds on `executor` (one worker thread) while any scheduler has work."""

    def __init__(
        self,
        schedulers: Mapping[str, Scheduler],
        executor: Executor,
        fail: Callable[[Scheduler, Exception], None],
    ) -> None:
        self.schedulers = schedulers
        self.executor = executor
        self.fail = fail  # told a scheduler's error (after `scheduler.fail()` is due), on the worker thread
        self._lock = threading.Lock()
        self._driving = False  # a round is queued or running on the worker thread
        self._parked = False  # the next round waits for the loop to acknowledge earlier ones
        self._unacked = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        """On the event loop, after admitting work: start the rounds unless they run or are parked."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._loop is not loop:  # a new event loop (tests): acknowledgements owed to the old are void
                self._loop, self._unacked, self._parked = loop, 0, False
            if self._driving or self._parked:
                return
            self._driving = True
        self._submit()

    def _round(self) -> None:
        """On the worker thread: one step of every busy scheduler, then queue the next while work remains."""
        try:
            for scheduler in self.schedulers.values():
                if scheduler.busy():
                    try:
                        scheduler.run_once()
                    except Exception as error:  # delivered to every request of that target, never swallowed
                        self.fail(scheduler, error)
            with self._lock:  # admission appends before it wakes: a job admitted now is seen, or wakes anew
                assert self._loop is not None
                try:
                    self._loop.call_soon_threadsafe(self._ack)
                except RuntimeError:  # the loop is closed (its process is ending): nobody reads the rows on
                    self._driving = self._parked = False
                    return
                self._unacked += 1
                more = any(s.busy() for s in self.schedulers.values())
                self._parked = more and self._unacked > LEAD
                self._driving = more and not self._parked
        except BaseException:  # nobody awaits this task: say so, and let the next admission drive again
            logger.exception("continuous batching: the step driver stopped")
            self._driving = False
            raise
        if self._driving:
            self._submit()

    def _ack(self) -> None:
        """On the event loop: a round has been seen; resume rounds parked ahead of the loop."""
        with self._lock:
            self._unacked -= 1
            resume = self._parked and self._unacked <= LEAD
            if resume:
                self._parked, self._driving = False, True
        if resume:
            self._submit()

    def _submit(self) -> None:
        try:
            self.executor.submit(self._round)
        except RuntimeError:  # the executor is shut down: the replica is stopping
            self._driving = False
