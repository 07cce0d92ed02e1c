"""The one orchestrator of an Explain: source pass → map → patched generation, as a stream of events.

Where the models are is injected as a `Backend`: Ray deployments in the service, models in this process
for the CLI and the experiments. The plan is already validated (plan.py), so nothing here checks input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

import torch

from patchscope.engine.errors import IncompatibleModels
from patchscope.engine.hooks import HiddenStates
from patchscope.engine.lens_control import LensControlRequest, LensReadings
from patchscope.engine.streaming import GenerateRequest, RowEvent
from patchscope.engine.timings import Timings
from patchscope.explain.checks import check_prompt_size
from patchscope.explain.events import Event, Explanation, SiteFinished, SiteResult, SiteStarted, SiteToken
from patchscope.explain.limits import Limits
from patchscope.explain.plan import MappingResolver, ModelInfo, Plan, plan_activations, plan_explain
from patchscope.explain.request import ActivationsRequest, ExplainRequest, Site
from patchscope.explain.signals import Calibrator, control
from patchscope.serve import tracing

__all__ = ["Backend", "GenerateRequest", "Pipeline", "RowEvent", "collect"]


class Backend(Protocol):
    """Where the models are: looked up by id, each call one model's work."""

    async def source_info(self, model_id: str) -> ModelInfo:
        """The source model's facts (NOT_FOUND naming the hosted ids when it is not hosted)."""
        ...

    async def target_info(self, model_id: str) -> ModelInfo: ...

    async def tokenize(self, model_id: str, prompt: str) -> list[str]:
        """The source prompt's tokens as the source pass will see them (BOS counted); runs no model."""
        ...

    async def extract(
        self, model_id: str, prompt: str, layers: list[int], positions: list[int]
    ) -> HiddenStates: ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[list[RowEvent]]:
        """Row events per decoding step; closing the iterator early drops the rows from the target.

        With `request.control`, the control row's finished event comes last and carries the other rows'
        unpatched scores (`engine.scoring.with_unpatched_scores`, run where the target runs).
        """
        ...

    async def logit_lens(
        self,
        model_id: str,
        vectors: list[torch.Tensor],
        top_k: int,
        control: LensControlRequest | None = None,
    ) -> LensReadings:
        """The lens of each state; with `control`, each site's unpatched reading (engine/lens_control.py)."""
        ...


# (source, target, preset) -> the registered calibrator, or None.
CalibratorLookup = Callable[[ModelInfo, ModelInfo, str], Calibrator | None]


def no_calibrators(source: ModelInfo, target: ModelInfo, preset: str) -> Calibrator | None:
    return None


def map_states(plan: Plan, states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """f(h) for each site's state ([d] -> [d*]); the state itself when source and target are one model."""
    if plan.mapping is None:
        return list(states)
    hidden = plan.target.facts.hidden_size
    vectors = []
    for state, site in zip(states, plan.sites, strict=True):
        vector = plan.mapping(state, site.source_layer, site.target_layer)
        if vector.shape != (hidden,):
            raise IncompatibleModels(f"mapped state has shape {list(vector.shape)}, target needs [{hidden}]")
        vectors.append(vector)
    return vectors


class Pipeline:
    """Plans and runs Explains against one backend, under one set of limits and one mapping resolver."""

    def __init__(
        self,
        backend: Backend,
        limits: Limits,
        resolve: MappingResolver,
        calibrators: CalibratorLookup = no_calibrators,
    ) -> None:
        self.backend = backend
        self.limits = limits
        self.resolve = resolve
        self.calibrators = calibrators

    async def plan(self, request: ExplainRequest | ActivationsRequest) -> Plan:
        """Validate `request` completely; only the source's tokenizer runs (for positions and length)."""
        source = await self.backend.source_info(request.source)
        target = await self.backend.target_info(request.target.model)
        if isinstance(request, ActivationsRequest):
            plan = plan_activations(request, source, target, self.limits, self.resolve)
        else:
            check_prompt_size("prompt", request.prompt, self.limits)
            tokens = await self.backend.tokenize(source.id, request.prompt)
            plan = plan_explain(request, source, target, tokens, self.limits, self.resolve)
        if not plan.controls:
            return plan
        return dataclasses.replace(plan, calibrator=self.calibrators(source, target, plan.preset.name))

    async def run(self, plan: Plan, states: torch.Tensor | None = None) -> AsyncIterator[Event]:
        """Extract (unless `states`, [sites, d], came with the request), map, and verbalise every site."""
        timings = Timings()
        if states is None:
            started = time.perf_counter()
            with tracing.span(tracing.SOURCE_PASS, source=plan.source.id, sites=len(plan.sites)):
                site_states = await self._extract(plan)
            timings.source_s = time.perf_counter() - started
        else:
            site_states = list(states)
        with tracing.span(
            tracing.MAP, source=plan.source.id, target=plan.target.id, identity=plan.mapping is None
        ):
            vectors = map_states(plan, site_states)
        for index, (site, vector) in enumerate(zip(plan.sites, vectors, strict=True)):
            mapping_id, r2 = ("", None)
            if plan.mapping is not None:
                mapping_id, r2 = plan.mapping.describe(site.source_layer, site.target_layer)
            norms = plan.target.layer_norms
            yield SiteStarted(
                index=index,
                mapping_id=mapping_id,
                mapping_r2=r2,
                mapped_norm=float(vector.norm()),
                target_layer_norm=norms[site.target_layer] if norms else None,
            )
        if not plan.preset.generates:
            async for event in self._lens(plan, vectors, timings):
                yield event
            return
        # Rows: the sites, then one per mean-state layer, then the unpatched control (GenerateRequest).
        layers, row_vectors = plan.rows(vectors)
        request = GenerateRequest(
            model=plan.target.id,
            template=plan.template,
            filler=plan.preset.filler,
            layers=layers,
            vectors=row_vectors,
            config=plan.generation,
            control=plan.controls,
        )
        n = len(plan.sites)
        control_row = len(layers)
        held: dict[int, RowEvent] = {}  # finished rows waiting for the control to end
        spans = tracing.generation(target=plan.target.id, sites=n, rows=request.num_rows)
        async with spans, contextlib.aclosing(self.backend.generate(request)) as steps:
            async for events in steps:
                spans.tokens(sum(1 for e in events if not e.stop))
                for e in events:
                    if e.row >= n:  # a control row: never streamed
                        if e.finished:
                            held[e.row] = e
                        continue
                    if not e.stop or e.text:
                        yield SiteToken(e.row, e.step, e.token_id, e.text)
                    if e.finished and plan.controls:
                        held[e.row] = e
                    elif e.finished:
                        yield self._finished(plan, e, timings)
        if plan.controls:
            # The target scored every row once they had all ended.
            unpatched = held[control_row].unpatched_logprobs
            if unpatched is None or len(unpatched) != control_row:
                raise RuntimeError(f"the control row's finished event carries no scores for the {n} sites")
            for index in range(n):
                mean_state = None
                if plan.mean_state_control:
                    mean_state = held[plan.mean_state_row(plan.sites[index])].explanation or ""
                yield self._finished(
                    plan, held[index], timings, held[control_row], unpatched[index], mean_state
                )

    async def _lens(
        self, plan: Plan, vectors: list[torch.Tensor], timings: Timings
    ) -> AsyncIterator[SiteFinished]:
        """The logit lens of every site; with controls, beside the unpatched reading at the same site."""
        spec = None
        # The mean-state control reads each layer's mean state after the sites' own states.
        layers, row_vectors = plan.rows(vectors)
        if plan.controls:
            spec = LensControlRequest(plan.template, plan.preset.filler, layers)
        lens = await self.backend.logit_lens(plan.target.id, row_vectors, plan.top_k, spec)
        n = len(plan.sites)
        for index, (explanation, pairs) in enumerate(lens.readings[:n]):
            answer = plan.preset.answer(explanation)
            site_control = None
            if lens.controls is not None:
                c, site = lens.controls[index], plan.sites[index]
                r2 = plan.mapping.describe(site.source_layer, site.target_layer)[1] if plan.mapping else None
                mean_state = None
                if plan.mean_state_control:
                    mean_state = self._mean_state(plan, lens.readings[plan.mean_state_row(site)][0])
                site_control = control(
                    answer=answer,
                    unpatched_explanation=c.explanation,
                    unpatched_answer=plan.preset.answer(c.explanation),
                    patch_effect=c.patch_effect,
                    explanation_logprob=c.explanation_logprob,
                    unpatched_logprob=c.unpatched_logprob,
                    depths=depths(plan, site),
                    mapping_r2=r2,
                    calibrator=plan.calibrator,
                    unpatched_top_k=c.top_k,
                    mean_state=mean_state,
                )
            yield SiteFinished(index, explanation, answer, top_k=pairs, timings=timings, control=site_control)

    def _finished(
        self,
        plan: Plan,
        e: RowEvent,
        timings: Timings,
        control_row: RowEvent | None = None,
        unpatched_logprob: float | None = None,
        mean_state: str | None = None,
    ) -> SiteFinished:
        """A site's finished event; with the controls, from the control row's and the mean-state row's."""
        explanation = e.explanation or ""
        answer = plan.preset.answer(explanation)
        generated = e.timings or Timings()
        site_timings = Timings(
            source_s=timings.source_s,
            queue_s=generated.queue_s,
            prefill_s=generated.prefill_s,
            decode_s=generated.decode_s,
        )
        site_control = None
        if control_row is not None:
            site = plan.sites[e.row]
            r2 = plan.mapping.describe(site.source_layer, site.target_layer)[1] if plan.mapping else None
            unpatched_explanation = control_row.explanation or ""
            site_control = control(
                answer=answer,
                unpatched_explanation=unpatched_explanation,
                unpatched_answer=plan.preset.answer(unpatched_explanation),
                patch_effect=e.patch_effect,
                explanation_logprob=e.logprob,
                unpatched_logprob=unpatched_logprob,
                depths=depths(plan, site),
                mapping_r2=r2,
                calibrator=plan.calibrator,
                mean_state=self._mean_state(plan, mean_state) if mean_state is not None else None,
            )
        return SiteFinished(e.row, explanation, answer, timings=site_timings, control=site_control)

    @staticmethod
    def _mean_state(plan: Plan, explanation: str) -> tuple[str, str]:
        return explanation, plan.preset.answer(explanation)

    async def _extract(self, plan: Plan) -> list[torch.Tensor]:
        assert plan.prompt is not None
        layers = sorted({s.source_layer for s in plan.sites})
        positions = sorted({s.position for s in plan.sites})
        hidden = await self.backend.extract(plan.source.id, plan.prompt, layers, positions)
        return [
            hidden.states[hidden.layers.index(s.source_layer), hidden.positions.index(s.position)]
            for s in plan.sites
        ]


def depths(plan: Plan, site: Site) -> tuple[float, float]:
    """The site's relative depths ℓ / (L − 1) and ℓ* / (L* − 1): a calibrator feature."""
    return (
        site.source_layer / max(1, plan.source.facts.num_layers - 1),
        site.target_layer / max(1, plan.target.facts.num_layers - 1),
    )


async def collect(plan: Plan, events: AsyncIterator[Event]) -> Explanation:
    """Run a plan's events to the end and gather one result per site, in site order."""
    finished: dict[int, SiteFinished] = {}
    started: dict[int, SiteStarted] = {}
    async for event in events:
        if isinstance(event, SiteStarted):
            started[event.index] = event
        elif isinstance(event, SiteFinished):
            finished[event.index] = event
    results = []
    timings = Timings()
    for index, site in enumerate(plan.sites):
        done, begun = finished[index], started[index]
        results.append(
            SiteResult(
                site=site,
                source_token=plan.source_tokens[index],
                explanation=done.explanation,
                answer=done.answer,
                mapping_id=begun.mapping_id or None,
                mapping_r2=begun.mapping_r2,
                top_k=done.top_k,
                control=done.control,
            )
        )
        timings = done.timings
    return Explanation(results, timings)
