"""The SourceModel deployment: extracts hidden states of the source models it hosts.

States leave as float32 CPU tensors (a CUDA tensor would arrive on the caller's `cuda:0` or fail where
there is no GPU). Model work runs on one worker thread, so calls queue instead of racing on the model.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import torch
from ray import serve

from patchscope.engine.errors import ModelNotFound
from patchscope.engine.hooks import HiddenStates, extract
from patchscope.serve.config import ServiceConfig
from patchscope.serve.hosting import ModelCard, load_hosted, warm_up

logger = logging.getLogger("patchscope.serve")


@serve.deployment(name="SourceModel", max_ongoing_requests=64)
class SourceModel:
    """Hosts the config's `sources:`; one replica per GPU (`num_gpus: 1`) or on the CPU."""

    def __init__(self, config: dict) -> None:
        self.config = ServiceConfig.model_validate(config)
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        self.models = load_hosted(self.config.sources, self.config)
        self.cards = {model_id: warm_up(model) for model_id, model in self.models.items()}
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="source")
        logger.info("SourceModel ready: %s", ", ".join(self.cards))

    def list_cards(self) -> list[ModelCard]:
        return list(self.cards.values())

    async def extract(
        self, model_id: str, prompt: str, layers: list[int], positions: list[int] | None
    ) -> HiddenStates:
        if model_id not in self.models:
            raise ModelNotFound(model_id, list(self.models))
        model = self.models[model_id]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, extract, model, prompt, layers, positions)
