"""The unpatched scoring of finished requests on the replica's worker thread, all those waiting at once.

Why: each request with a control is scored once its rows end (engine/scoring.py), a forward of its
explanations and one product with the target's head. Under load many requests end within a few steps of
each other, and each product would read the whole head again (for Gemma 3, 262,144 × 640 weights, the
largest matrix the target has). Here a request's scoring joins a queue; the first waiting request queues
one task on the worker thread, behind the steps already there, and that task scores everything waiting by
then through `score_jobs`' one head product. A lone request waits for nothing it would not have waited
for: its task is queued when it asks.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass

from patchscope.engine.runtime import TargetRuntime
from patchscope.engine.scoring import ScoreJob, score_jobs

Scores = list[float | None]


@dataclass(eq=False)
class _Waiting:
    model: str
    job: ScoreJob
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Scores]


class ScoreQueue:
    """Scores jobs on `executor` (the target's one worker thread), every job of one target that waits."""

    def __init__(self, runtimes: Mapping[str, TargetRuntime], executor: Executor) -> None:
        self.runtimes = runtimes
        self.executor = executor
        self._lock = threading.Lock()
        self._waiting: list[_Waiting] = []
        self._queued = False  # a drain task is queued on the worker thread and has not yet started
        self.batch_sizes: deque[int] = deque(maxlen=4096)  # jobs per product (latest), for tests and benches

    async def score(self, model: str, job: ScoreJob) -> Scores:
        """`job`'s scores on target `model`, computed with whatever else waits when the worker gets to it."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(model, job, loop, loop.create_future())
        with self._lock:
            self._waiting.append(waiting)
            start, self._queued = not self._queued, True
        if start:
            try:
                self.executor.submit(self._drain)
            except RuntimeError:  # the executor is shut down: the replica is stopping
                with self._lock:
                    self._waiting.remove(waiting)
                    self._queued = False
                raise
        return await waiting.future

    def _drain(self) -> None:
        """On the worker thread: score every job waiting now, one `score_jobs` call per target."""
        with self._lock:
            batch, self._waiting, self._queued = self._waiting, [], False
        by_model: dict[str, list[_Waiting]] = {}
        for waiting in batch:
            if not waiting.future.cancelled():  # a caller that left is not scored
                by_model.setdefault(waiting.model, []).append(waiting)
        for model, group in by_model.items():
            self.batch_sizes.append(len(group))
            try:
                results = score_jobs(self.runtimes[model], [w.job for w in group])
            except Exception as error:  # every caller of this product hears it; other targets go on
                for waiting in group:
                    _deliver(waiting, error=error)
                continue
            for waiting, scores in zip(group, results, strict=True):
                _deliver(waiting, scores)


def _deliver(waiting: _Waiting, scores: Scores | None = None, error: Exception | None = None) -> None:
    """Resolve a caller's future on its own event loop (a closed loop is a caller that has gone)."""

    def resolve() -> None:
        if waiting.future.done():  # cancelled meanwhile
            return
        if error is not None:
            waiting.future.set_exception(error)
        else:
            waiting.future.set_result(scores)

    try:
        waiting.loop.call_soon_threadsafe(resolve)
    except RuntimeError:
        pass
