"""The pipeline in this process: models loaded here, for the CLI, the experiments and batch jobs.

Model work runs inline on the caller's thread (there is nothing else for the event loop to do), through
the same engine calls the service's deployments make.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import torch

from patchscope.engine.errors import ModelNotFound
from patchscope.engine.generation import iter_patched_generate
from patchscope.engine.hooks import HiddenStates, extract
from patchscope.engine.layer_stats import layer_stats
from patchscope.engine.lens import logit_lens
from patchscope.engine.lens_control import LensControlRequest, LensReadings, lens_controls
from patchscope.engine.models import LoadedModel
from patchscope.engine.runtime import TargetRuntime
from patchscope.engine.scoring import with_unpatched_scores
from patchscope.engine.streaming import GenerateRequest, RowEvent, row_events
from patchscope.engine.template import normaliser_growth, prompt_tokens
from patchscope.engine.timings import Timings
from patchscope.explain.events import Explanation
from patchscope.explain.limits import Limits
from patchscope.explain.plan import MappingResolver, ModelInfo, no_mappings
from patchscope.explain.request import ActivationsRequest, ExplainRequest
from patchscope.explain.run import CalibratorLookup, Pipeline, collect, no_calibrators


def model_info(model: LoadedModel) -> ModelInfo:
    """What the service's warm-up card says of a model (serve/hosting.py), computed here: one forward."""
    stats = layer_stats(model)
    return ModelInfo(
        id=model.id,
        fingerprint=model.fingerprint,
        facts=model.facts,
        dtype=str(model.dtype).removeprefix("torch."),
        layer_norms=stats.norms,
        normaliser_growth=normaliser_growth(model.tokenizer),
        layer_means=stats.means,
    )


class LocalBackend:
    """Every model given is a source; targets are the runtimes given (one per target model)."""

    def __init__(self, sources: Iterable[LoadedModel], targets: Iterable[TargetRuntime]) -> None:
        self.sources = {m.id: m for m in sources}
        self.targets = {t.model.id: t for t in targets}
        # Read once here, as a replica's warm-up does: planning a request then runs no model.
        models = {**self.sources, **{t.model.id: t.model for t in self.targets.values()}}
        self.infos = {model_id: model_info(model) for model_id, model in models.items()}

    @classmethod
    def of(cls, source: LoadedModel, target: TargetRuntime) -> LocalBackend:
        """One source and one target (the same model may be both)."""
        return cls([source], [target])

    def _source(self, model_id: str) -> LoadedModel:
        if model_id not in self.sources:
            raise ModelNotFound(model_id or "(empty)", list(self.sources))
        return self.sources[model_id]

    def _target(self, model_id: str) -> TargetRuntime:
        if model_id not in self.targets:
            raise ModelNotFound(model_id or "(empty)", list(self.targets))
        return self.targets[model_id]

    async def source_info(self, model_id: str) -> ModelInfo:
        return self.infos[self._source(model_id).id]

    async def target_info(self, model_id: str) -> ModelInfo:
        return self.infos[self._target(model_id).model.id]

    async def tokenize(self, model_id: str, prompt: str) -> list[str]:
        return prompt_tokens(self._source(model_id).tokenizer, prompt)

    async def extract(
        self, model_id: str, prompt: str, layers: list[int], positions: list[int]
    ) -> HiddenStates:
        return extract(self._source(model_id), prompt, layers, positions)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[list[RowEvent]]:
        target = self._target(request.model)
        async for events in with_unpatched_scores(request, self._generate(target, request), target):
            yield events

    async def _generate(
        self, target: TargetRuntime, request: GenerateRequest
    ) -> AsyncIterator[list[RowEvent]]:
        timings = Timings()
        rows = request.rows()
        steps = iter_patched_generate(
            target, rows, request.config, timings=timings, keep_logits=request.control
        )
        controls = {k: len(rows) - 1 for k in range(len(rows))} if request.control else None
        tokenizer = target.model.tokenizer
        stop = request.config.stop
        for events in row_events(steps, tokenizer, request.config.max_new_tokens, timings, controls, stop):
            yield events

    async def logit_lens(
        self,
        model_id: str,
        vectors: list[torch.Tensor],
        top_k: int,
        control: LensControlRequest | None = None,
    ) -> LensReadings:
        model = self._target(model_id).model
        readings = [logit_lens(model, vector, top_k) for vector in vectors]
        controls = lens_controls(model, vectors, control, top_k) if control is not None else None
        return LensReadings(readings, controls)


def explain(
    backend: LocalBackend,
    request: ExplainRequest | ActivationsRequest,
    resolve: MappingResolver = no_mappings,
    limits: Limits | None = None,
    calibrators: CalibratorLookup = no_calibrators,
) -> Explanation:
    """Plan and run one request to the end in this process (the CLI's and the experiments' entry).

    `resolve` finds the mappings of a cross-model request (`mapping.resolve.registry_resolver`); the
    default plans same-model requests only; `calibrators` finds the confidence calibrator
    (`calibration.registry.CalibrationRegistry.lookup`). Runs its own event loop: call it outside one.
    """

    async def run() -> Explanation:
        pipeline = Pipeline(backend, limits or LOCAL_LIMITS, resolve, calibrators)
        plan = await pipeline.plan(request)
        states = request.states if isinstance(request, ActivationsRequest) else None
        return await collect(plan, pipeline.run(plan, states))

    return asyncio.run(run())


# In process the caller owns the machine: the engine's own bounds, not a shared service's quotas.
LOCAL_LIMITS = Limits(
    max_prompt_chars=1 << 20,
    max_prompt_tokens=1 << 16,
    max_template_chars=1 << 16,
    max_template_bytes=1 << 18,
    max_sites=4096,
    max_new_tokens=512,
    max_token_steps=1 << 40,
)
