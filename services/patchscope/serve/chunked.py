"""Model work in chunks on a replica's worker thread, stopped between chunks once its caller has left.

Why: a replica runs model work on one thread, so calls queue instead of racing on the model. A call run
as one executor task held that thread to its end, even after its caller cancelled or passed its deadline,
and every call behind it waited. Work written as a generator that yields between bounded chunks (the
source pass `engine.hooks.iter_extract`, the logit lens `engine.lens.iter_logit_lens`, as the scheduler's
prefill yields between chunks) runs here one chunk per executor task: other calls' tasks queue between
its chunks, and a caller that leaves gets no further chunk. Serve cancels the replica's asyncio task when
its caller cancels; the cancel lands at the await of the chunk in flight, which finishes on the worker
thread, and the generator is then closed on that same thread, after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")


def _advance(work: Generator[None, None, T]) -> tuple[bool, T | None]:
    """One chunk of `work`: (True, its value) when it has ended, else (False, None)."""
    try:
        next(work)
    except StopIteration as stop:
        return True, stop.value
    return False, None


async def run_chunked(executor: Executor, work: Generator[None, None, T]) -> T:
    """Run `work` one chunk per task on `executor`; cancelling the caller stops it before its next chunk."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            ended, value = await loop.run_in_executor(executor, _advance, work)
            if ended:
                return value  # type: ignore[return-value]
    except asyncio.CancelledError:
        # The chunk in flight still finishes on the worker thread; the generator is closed there after
        # it, so its cleanup never runs beside that chunk. (An error raised by `work` has ended it already.)
        executor.submit(work.close)
        raise
