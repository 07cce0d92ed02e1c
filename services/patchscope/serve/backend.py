"""The pipeline's `Backend` over the SourceModel and TargetModel deployments' handles.

Hidden states cross as CPU tensors. A caller that leaves a token stream closes the generator at a
`yield`, where no task cancellation reaches the target call, so the call is cancelled in `finally` and
the target drops its rows at the next step.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import torch
from ray.serve.handle import DeploymentHandle

from patchscope.engine.errors import ModelNotFound
from patchscope.engine.hooks import HiddenStates
from patchscope.engine.lens_control import LensControlRequest, LensReadings
from patchscope.engine.streaming import GenerateRequest, RowEvent
from patchscope.explain.plan import ModelInfo
from patchscope.serve.hosting import ModelCard


def card_info(card: ModelCard) -> ModelInfo:
    return ModelInfo(
        id=card.id,
        fingerprint=card.fingerprint,
        facts=card.facts,
        dtype=card.dtype,
        layer_norms=tuple(card.layer_norms),
        normaliser_growth=card.normaliser_growth,
        layer_means=tuple(card.layer_means),
    )


class ServeBackend:
    """Model work through deployment handles; the hosted models' cards are read once and kept."""

    def __init__(self, source: DeploymentHandle, target: DeploymentHandle) -> None:
        self.source = source
        self.target = target
        self.stream_target = target.options(stream=True)
        self._cards: tuple[dict[str, ModelCard], dict[str, ModelCard]] | None = None

    async def cards(self) -> tuple[dict[str, ModelCard], dict[str, ModelCard]]:
        """The hosted sources and targets by id."""
        if self._cards is None:
            sources = await self.source.list_cards.remote()
            targets = await self.target.list_cards.remote()
            self._cards = ({c.id: c for c in sources}, {c.id: c for c in targets})
        return self._cards

    async def source_card(self, model_id: str) -> ModelCard:
        sources, _ = await self.cards()
        if model_id not in sources:
            raise ModelNotFound(model_id or "(empty)", list(sources))
        return sources[model_id]

    async def source_info(self, model_id: str) -> ModelInfo:
        return card_info(await self.source_card(model_id))

    async def target_info(self, model_id: str) -> ModelInfo:
        _, targets = await self.cards()
        if model_id not in targets:
            raise ModelNotFound(model_id or "(empty)", list(targets))
        return card_info(targets[model_id])

    async def tokenize(self, model_id: str, prompt: str) -> list[str]:
        return await self.source.tokenize.remote(model_id, prompt)

    async def extract(
        self, model_id: str, prompt: str, layers: list[int], positions: list[int]
    ) -> HiddenStates:
        return await self.source.extract.remote(model_id, prompt, layers, positions)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[list[RowEvent]]:
        tokens = self.stream_target.generate.remote(request)
        try:
            async for events in tokens:
                yield events
        finally:
            tokens.cancel()

    async def logit_lens(
        self,
        model_id: str,
        vectors: list[torch.Tensor],
        top_k: int,
        control: LensControlRequest | None = None,
    ) -> LensReadings:
        return await self.target.logit_lens.remote(model_id, vectors, top_k, control)
