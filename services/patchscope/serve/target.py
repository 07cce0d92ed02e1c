"""The TargetModel deployment: batched patched generation (streamed) and the logit lens.

Concurrent requests share batches through the `Batcher`; a request streams one list of row events per
decoding step, and leaving the stream early (client cancel or deadline) drops its rows from the batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import torch
from ray import serve

from patchscope.engine.errors import ModelNotFound
from patchscope.engine.explain import _logit_lens
from patchscope.engine.validation import check_vector
from patchscope.serve.batching import Batcher, GenerateRequest, RowEvent
from patchscope.serve.config import ServiceConfig
from patchscope.serve.hosting import ModelCard, load_hosted, warm_up
from patchscope.serve.metrics import ServiceMetrics

logger = logging.getLogger("patchscope.serve")


@serve.deployment(name="TargetModel", max_ongoing_requests=256, graceful_shutdown_timeout_s=120)
class TargetModel:
    """Hosts the config's `targets:`; on its own GPU, apart from SourceModel, where there are two."""

    def __init__(self, config: dict) -> None:
        self.config = ServiceConfig.model_validate(config)
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        self.models = load_hosted(self.config.targets, self.config)
        self.cards = {model_id: warm_up(model) for model_id, model in self.models.items()}
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="target")
        batching = self.config.batching
        self.batcher = Batcher(
            self.models,
            self.executor,
            enabled=batching.enabled,
            wait_s=batching.wait_ms / 1000 if batching.enabled else 0.0,
            max_rows=batching.max_rows,
            max_queued_rows=self.config.limits.max_queued_rows,
            max_active=batching.max_active_batches if batching.enabled else 1 << 30,
        )
        self.metrics = ServiceMetrics()
        logger.info("TargetModel ready: %s", ", ".join(self.cards))

    def list_cards(self) -> list[ModelCard]:
        return list(self.cards.values())

    def stats(self) -> dict[str, object]:
        """Counters tests and benchmarks read: batch sizes, steps run, rows dropped, rows queued."""
        b = self.batcher
        return {
            "batch_sizes": list(b.batch_sizes),
            "steps_run": b.steps_run,
            "rows_dropped": b.rows_dropped,
            "queued_rows": b.queued_rows,
        }

    def _model(self, model_id: str):
        if model_id not in self.models:
            raise ModelNotFound(model_id, list(self.models))
        return self.models[model_id]

    async def generate(self, request: GenerateRequest) -> AsyncIterator[list[RowEvent]]:
        self._model(request.model)
        batches_before = len(self.batcher.batch_sizes)
        self.metrics.queue_rows(self.batcher.queued_rows + len(request.vectors))
        async for events in self.batcher.submit(request):
            self.metrics.tokens(sum(1 for e in events if not e.stop))
            yield events
        for size in self.batcher.batch_sizes[batches_before:]:
            self.metrics.batch(size)

    async def logit_lens(
        self, model_id: str, vectors: list[torch.Tensor], top_k: int
    ) -> list[tuple[str, list[tuple[str, float]]]]:
        model = self._model(model_id)
        for k, vector in enumerate(vectors):
            check_vector(f"vectors[{k}]", vector, model.facts)

        def run() -> list[tuple[str, list[tuple[str, float]]]]:
            return [_logit_lens(model, vector, top_k) for vector in vectors]

        return await asyncio.get_running_loop().run_in_executor(self.executor, run)
