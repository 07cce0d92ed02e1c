"""The TargetModel deployment: batched patched generation (streamed, with its controls), the logit lens.

Concurrent requests share decoding steps through the `ContinuousBatcher` (per-template batches through
the `Batcher` where continuous batching is off or the target runs transformers' forward); a request
streams one list of row events per step, and leaving the stream early (client cancel or deadline) drops
its rows before the next step or prefill chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor

import torch
from ray import serve

from patchscope.engine.lens import iter_logit_lens
from patchscope.engine.lens_control import LensControlRequest, LensReadings, lens_controls
from patchscope.engine.runtime import TargetRuntime
from patchscope.engine.scoring import ScoreJob, with_unpatched_scores
from patchscope.engine.streaming import GenerateRequest, RowEvent
from patchscope.engine.validation import check_vector
from patchscope.serve.batching import Batcher, ContinuousBatcher
from patchscope.serve.chunked import run_chunked
from patchscope.serve.config import ServiceConfig
from patchscope.serve.hosting import Hosted, ModelCard, rss_bytes
from patchscope.serve.metrics import ServiceMetrics
from patchscope.serve.scores import ScoreQueue


def make_batcher(
    config: ServiceConfig,
    runtimes: dict[str, TargetRuntime],
    executor: Executor,
    on_batch: Callable[[int], None] = lambda _rows: None,
) -> Batcher | ContinuousBatcher:
    """The config's batching: continuous for lean-forward targets, per-template batches for the rest."""
    batching = config.batching
    batcher = Batcher(
        runtimes,
        executor,
        enabled=batching.enabled,
        wait_s=batching.wait_ms / 1000 if batching.enabled else 0.0,
        max_rows=config.max_rows(),
        max_queued_rows=config.limits.max_queued_rows,
        max_active=batching.max_active_batches if batching.enabled else 1 << 30,
        on_batch=on_batch,
    )
    if not (batching.enabled and batching.continuous):
        return batcher
    return ContinuousBatcher(
        runtimes,
        executor,
        max_rows=config.max_rows(),
        chunk_tokens=batching.prefill_chunk_tokens,
        max_queued_rows=config.limits.max_queued_rows,
        fallback=batcher,
        on_batch=on_batch,
        step_options=batching.step_options(),
    )


@serve.deployment(name="TargetModel", max_ongoing_requests=256, graceful_shutdown_timeout_s=120)
class TargetModel:
    """Hosts the config's `targets:`; on its own GPU, apart from SourceModel, where there are two."""

    def __init__(self, config: dict) -> None:
        self.hosted = Hosted.start(config, "targets")
        self.config = self.hosted.config
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="target")
        self.metrics = ServiceMetrics()
        options = self.config.engine_options()
        self.runtimes = {
            model_id: TargetRuntime.build(m, options) for model_id, m in self.hosted.models.items()
        }
        self.batcher = make_batcher(self.config, self.runtimes, self.executor, self.metrics.batch)
        self.scores = ScoreQueue(self.runtimes, self.executor)

    def list_cards(self) -> list[ModelCard]:
        return list(self.hosted.cards.values())

    def stats(self) -> dict[str, object]:
        """Counters tests and benchmarks read: batch sizes, steps run, rows dropped, rows queued."""
        b = self.batcher
        return {
            "batch_sizes": list(b.batch_sizes),
            "steps_run": b.steps_run,
            "rows_dropped": b.rows_dropped,
            "queued_rows": b.queued_rows,
            "rss_bytes": rss_bytes(),
        }

    async def generate(self, request: GenerateRequest) -> AsyncIterator[list[RowEvent]]:
        """The request's row events; with a control, its rows' unpatched scores come on the control's last.

        The scores are computed here, on the worker thread, once the rows have ended: no second call;
        requests that end together share one head product (serve/scores.py).
        """
        self.hosted.model(request.model)
        self.metrics.queue_rows(self.batcher.queued_rows + request.num_rows)

        def score(job: ScoreJob) -> Awaitable[list[float | None]]:
            return self.scores.score(request.model, job)

        runtime = self.runtimes[request.model]
        try:
            async with (
                contextlib.aclosing(self.batcher.submit(request)) as stream,
                contextlib.aclosing(with_unpatched_scores(request, stream, runtime, score)) as scored,
            ):
                async for events in scored:
                    self.metrics.tokens(sum(1 for e in events if not e.stop))
                    yield events
        finally:  # the batcher counts the rows out as its stream closes (finished, failed or left)
            self.metrics.queue_rows(self.batcher.queued_rows)

    async def logit_lens(
        self,
        model_id: str,
        vectors: list[torch.Tensor],
        top_k: int,
        control: LensControlRequest | None = None,
    ) -> LensReadings:
        """The lens of each state; with `control`, each site's unpatched reading and signals too."""
        model = self.hosted.model(model_id)
        for k, vector in enumerate(vectors):
            check_vector(f"vectors[{k}]", vector, model.facts)

        # In chunks, so a caller who leaves stops the work at the next chunk (serve/chunked.py).
        readings = await run_chunked(self.executor, iter_logit_lens(model, vectors, top_k))
        controls = None
        if control is not None:
            controls = await asyncio.get_running_loop().run_in_executor(
                self.executor, lens_controls, model, vectors, control, top_k
            )
        return LensReadings(readings, controls)
