"""The Explainer deployment: the gRPC ingress that validates, orchestrates and streams.

Serve's gRPC proxy calls the methods named like the RPCs of `patchscope.v1.Patchscope`. The ingress holds
no model: it checks a request against the hosted models' cards, asks SourceModel for states (or decodes
the caller's activations), maps them through the registry's mappings, and streams TargetModel's tokens
back as events of each site. Errors become status codes in one place (`status.py`); in a streaming
method the code is set on the context *and* raised, since returning after setting it reaches the client
as OK.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from patchscope import __version__
from patchscope.engine.errors import InvalidArgument, ModelNotFound
from patchscope.engine.explain import ExplainRequest, Site, check_request, map_states
from patchscope.engine.generation import GenerationConfig
from patchscope.engine.presets import Preset, get_preset, resolve_template
from patchscope.engine.validation import check_layers, check_positive, check_prompt
from patchscope.mapping.artefact import MappingInfo
from patchscope.mapping.pipeline import depth_proportional
from patchscope.mapping.registry import MappingRegistry
from patchscope.mapping.resolve import AUTO, MappingSet, resolve_mappings
from patchscope.serve.auth import TokenCheck
from patchscope.serve.batching import GenerateRequest
from patchscope.serve.config import ServiceConfig
from patchscope.serve.hosting import ModelCard, rss_bytes
from patchscope.serve.metrics import ServiceMetrics
from patchscope.serve.quotas import QuotaExceeded, keeper
from patchscope.serve.status import status_of
from patchscope.wire import (
    LayerStates,
    decode_tensor,
    generation_from_proto,
    generation_to_proto,
    layer_messages,
    pb,
    wire_dtype,
)
from patchscope_client.version import API_VERSION, METADATA_KEY

logger = logging.getLogger("patchscope.serve")


def rpc(method: Callable) -> Callable:
    """Authenticate, stamp the API version, and turn errors into status codes (set *and* raised)."""

    def fail(error: BaseException, context: RayServegRPCContext) -> None:
        code, message = status_of(error)
        context.set_code(code)
        context.set_details(message)
        logger.info("rpc %s failed: %s", method.__name__, code.name)

    async def begin(self: Explainer, context: RayServegRPCContext) -> str | None:
        """Authenticate and take a quota slot; the key to release, if quotas are on."""
        context.set_trailing_metadata([(METADATA_KEY, API_VERSION)])
        key = self.auth.check(context.invocation_metadata(), method.__name__)
        if self.quotas is None:
            return None
        reason = await self.quotas.acquire.remote(key)
        if reason is not None:
            raise QuotaExceeded(reason)
        return key

    def end(self: Explainer, key: str | None) -> None:
        if key is not None:
            self.quotas.release.remote(key)

    if method.__name__ in Explainer.STREAMING:

        @functools.wraps(method)
        async def stream(self: Explainer, request, grpc_context: RayServegRPCContext):
            key = None
            try:
                key = await begin(self, grpc_context)
                # aclosing: a caller that leaves closes the inner generators now, not at garbage collection.
                async with contextlib.aclosing(method(self, request, grpc_context)) as messages:
                    async for message in messages:
                        yield message
            except Exception as error:
                fail(error, grpc_context)
                raise
            finally:
                end(self, key)

        return stream

    @functools.wraps(method)
    async def unary(self: Explainer, request, grpc_context: RayServegRPCContext):
        key = None
        try:
            key = await begin(self, grpc_context)
            return await method(self, request, grpc_context)
        except Exception as error:
            fail(error, grpc_context)
            raise
        finally:
            end(self, key)

    return unary


@dataclass(frozen=True)
class _Verbalise:
    """How the target verbalises states: the validated preset, template and decoding options."""

    preset: Preset
    template: str
    generation: GenerationConfig
    top_k: int


@dataclass
class _Job:
    """A validated explain request, ready for the target: what every event of its sites needs."""

    request_id: str
    started: float
    source: ModelCard
    target: ModelCard
    how: _Verbalise
    sites: list[Site]
    source_tokens: list[str]
    vectors: list[torch.Tensor]
    mapping: MappingSet | None
    provenance_mismatch: bool
    source_s: float


class Explainer:
    """The gRPC ingress of `patchscope.v1.Patchscope`."""

    STREAMING = frozenset({"ExtractHiddenStates", "Explain", "ExplainActivations"})

    def __init__(self, source: DeploymentHandle, target: DeploymentHandle, config: dict) -> None:
        self.config = ServiceConfig.model_validate(config)
        self.source = source
        self.target = target
        self.stream_target = target.options(stream=True)
        self.registry = MappingRegistry(Path(self.config.registry) if self.config.registry else None)
        auth = self.config.auth
        self.auth = TokenCheck(auth.tokens() if auth.required else [], auth.required)
        quotas = self.config.quotas
        self.quotas = (
            keeper(quotas.requests_per_minute, quotas.concurrent_streams)
            if quotas.requests_per_minute or quotas.concurrent_streams
            else None
        )
        self.limits = self.config.limits
        self._sources: dict[str, ModelCard] | None = None
        self._targets: dict[str, ModelCard] | None = None
        self.metrics = ServiceMetrics()

    # ---- hosted models ----------------------------------------------------------------------------

    async def _cards(self) -> tuple[dict[str, ModelCard], dict[str, ModelCard]]:
        if self._sources is None or self._targets is None:
            sources = await self.source.list_cards.remote()
            targets = await self.target.list_cards.remote()
            self._sources = {c.id: c for c in sources}
            self._targets = {c.id: c for c in targets}
        return self._sources, self._targets

    async def _source(self, model_id: str) -> ModelCard:
        sources, _ = await self._cards()
        if model_id not in sources:
            raise ModelNotFound(model_id or "(empty)", list(sources)) from None
        return sources[model_id]

    async def _target(self, model_id: str) -> ModelCard:
        _, targets = await self._cards()
        if model_id not in targets:
            raise ModelNotFound(model_id or "(empty)", list(targets)) from None
        return targets[model_id]

    def stats(self) -> dict[str, object]:
        """Not an RPC: read through a deployment handle by tests and operators."""
        return {"rss_bytes": rss_bytes()}

    # ---- unary ------------------------------------------------------------------------------------

    @staticmethod
    def _model_info(card: ModelCard, source: bool, target: bool) -> pb.ModelInfo:
        return pb.ModelInfo(
            id=card.id,
            source=source,
            target=target,
            architecture=card.architecture,
            num_layers=card.num_layers,
            hidden_size=card.hidden_size,
            vocab_size=card.vocab_size,
            num_parameters=card.num_parameters,
            fingerprint=card.fingerprint,
            tokenizer_fingerprint=card.tokenizer_fingerprint,
            dtype=card.dtype,
            ready=True,
        )

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context) -> pb.ListModelsResponse:
        sources, targets = await self._cards()
        models = [
            self._model_info(card, model_id in sources, model_id in targets)
            for model_id, card in {**sources, **targets}.items()
        ]
        return pb.ListModelsResponse(api_version=API_VERSION, server_version=__version__, models=models)

    async def ListMappings(self, request: pb.ListMappingsRequest, grpc_context) -> pb.ListMappingsResponse:
        listing = self.registry.scan()  # rescanned on every call: a prepare job may have added files
        infos = [
            i
            for i in listing.mappings
            if (not request.source or i.source_model == request.source)
            and (not request.target or i.target_model == request.target)
        ]
        unreadable = [f"{name}: {why}" for name, why in listing.unreadable]
        return pb.ListMappingsResponse(mappings=[_mapping_info(i) for i in infos], unreadable=unreadable)

    # ---- ExtractHiddenStates ---------------------------------------------------------------------

    async def ExtractHiddenStates(
        self, request: pb.ExtractHiddenStatesRequest, grpc_context
    ) -> AsyncIterator[pb.ExtractHiddenStatesResponse]:
        card = await self._source(request.model)
        self._check_prompt(request.prompt)
        layers = check_layers("layers", list(request.layers), card.facts)
        positions = list(request.positions) or [-1]
        check_positive("positions", len(positions), self.limits.max_prompt_tokens)
        wire_dtype("dtype", request.dtype)  # refuse an unknown dtype before the source runs
        hidden = await self.source.extract.remote(card.id, request.prompt, layers, positions)
        self._check_tokens(len(hidden.token_ids))
        for i, layer in enumerate(hidden.layers):
            for message in layer_messages(
                card.id,
                card.fingerprint,
                LayerStates(layer, hidden.states[i]),
                hidden.positions,
                hidden.token_ids,
                hidden.tokens,
                request.dtype,
            ):
                yield message

    # ---- Explain ------------------------------------------------------------------------------------

    def _check_prompt(self, prompt: str) -> None:
        check_prompt("prompt", prompt)
        if len(prompt) > self.limits.max_prompt_chars:
            raise InvalidArgument(
                "prompt", "too long", limit=f"<= {self.limits.max_prompt_chars} characters", value=len(prompt)
            )

    def _check_tokens(self, num_tokens: int) -> None:
        if num_tokens > self.limits.max_prompt_tokens:
            raise InvalidArgument(
                "prompt",
                "too many tokens",
                limit=f"<= {self.limits.max_prompt_tokens} tokens",
                value=num_tokens,
            )

    def _verbalise(self, spec: pb.TargetSpec) -> _Verbalise:
        preset = get_preset(spec.preset or "identity")
        template = resolve_template(preset, spec.template or None)
        generation = generation_from_proto(spec.generation)
        generation.validate()
        if generation.max_new_tokens > self.limits.max_new_tokens:
            raise InvalidArgument(
                "target.generation.max_new_tokens",
                "too many new tokens",
                limit=f"<= {self.limits.max_new_tokens}",
                value=generation.max_new_tokens,
            )
        return _Verbalise(preset, template, generation, spec.top_k or 5)

    def _target_layers(self, spec: pb.TargetSpec, source: ModelCard, target: ModelCard, layers: list[int]):
        if spec.layers:
            return list(spec.layers)
        if source.fingerprint == target.fingerprint:
            return None  # the same layer as the source
        return [depth_proportional(layer, source.num_layers, target.num_layers) for layer in layers]

    def _mappings(
        self, source: ModelCard, target: ModelCard, spec: pb.TargetSpec, pairs: list[tuple[int, int]]
    ) -> MappingSet | None:
        if source.fingerprint == target.fingerprint and spec.mapping in ("", AUTO):
            return None  # the same model: the paper's same-model Patchscope (identity)
        return resolve_mappings(self.registry, source, target, pairs, spec.mapping or AUTO)

    async def Explain(self, request: pb.ExplainRequest, grpc_context) -> AsyncIterator[pb.ExplainEvent]:
        started = time.time()
        source = await self._source(request.source)
        target = await self._target(request.target.model)
        self._check_prompt(request.prompt)
        how = self._verbalise(request.target)
        layers = list(request.layers)
        positions = list(request.positions) or [-1]
        target_layers = self._target_layers(
            request.target, source, target, check_layers("layers", layers, source.facts)
        )
        explain_request = ExplainRequest(
            prompt=request.prompt,
            layers=layers,
            positions=positions,
            target_layers=target_layers,
            preset=how.preset.name,
            template=how.template,
            generation=how.generation,
            top_k=how.top_k,
        )
        pairs = check_request(source.facts, target.facts, explain_request, max_sites=self.limits.max_sites)
        mapping = self._mappings(source, target, request.target, pairs)

        source_layers = sorted({layer for layer, _ in pairs})
        hidden = await self.source.extract.remote(source.id, request.prompt, source_layers, positions)
        self._check_tokens(len(hidden.token_ids))
        sites = [Site(p, s, t) for s, t in pairs for p in hidden.positions]
        states = [
            hidden.states[hidden.layers.index(s.source_layer), hidden.positions.index(s.position)]
            for s in sites
        ]
        tokens = [hidden.tokens[s.position] for s in sites]
        job = self._job(grpc_context, started, source, target, how, sites, states, tokens, mapping)
        async with contextlib.aclosing(self._run(job)) as events:
            async for event in events:
                yield event

    def _job(
        self,
        grpc_context: RayServegRPCContext,
        started: float,
        source: ModelCard,
        target: ModelCard,
        how: _Verbalise,
        sites: list[Site],
        states: list[torch.Tensor],
        tokens: list[str],
        mapping: MappingSet | None,
        provenance_mismatch: bool = False,
        source_s: float | None = None,
    ) -> _Job:
        return _Job(
            request_id=_request_id(grpc_context),
            started=started,
            source=source,
            target=target,
            how=how,
            sites=sites,
            source_tokens=tokens,
            vectors=map_states(states, sites, mapping, target.hidden_size),
            mapping=mapping,
            provenance_mismatch=provenance_mismatch,
            source_s=time.time() - started if source_s is None else source_s,
        )

    # ---- ExplainActivations ----------------------------------------------------------------------

    async def ExplainActivations(
        self, request: pb.ExplainActivationsRequest, grpc_context
    ) -> AsyncIterator[pb.ExplainEvent]:
        started = time.time()
        source = await self._source(request.source)
        target = await self._target(request.target.model)
        states = decode_tensor("safetensors", request.safetensors, max_bytes=self.limits.max_activation_bytes)
        if states.ndim != 2 or states.shape[1] != source.hidden_size:
            raise InvalidArgument(
                "safetensors.shape",
                f"must be [sites, hidden] with hidden = {source.id}'s hidden size",
                limit=f"[n, {source.hidden_size}]",
                value=list(states.shape),
            )
        n = states.shape[0]
        if n > self.limits.max_sites:
            raise InvalidArgument(
                "safetensors.shape[0]", "too many sites", limit=f"<= {self.limits.max_sites}", value=n
            )
        provenance = request.provenance
        layers = _per_row("provenance.layers", list(provenance.layers), n, required=True)
        layers = check_layers("provenance.layers", layers, source.facts)
        positions = _per_row("provenance.positions", list(provenance.positions), n, default=-1)
        tokens = _per_row("provenance.tokens", list(provenance.tokens), n, default="")
        how = self._verbalise(request.target)
        target_layers = self._target_layers(request.target, source, target, layers) or layers
        target_layers = _per_row("target.layers", target_layers, n, required=True)
        target_layers = check_layers("target.layers", target_layers, target.facts)
        sites = [Site(p, s, t) for p, s, t in zip(positions, layers, target_layers, strict=True)]
        pairs = [(s.source_layer, s.target_layer) for s in sites]
        mapping = self._mappings(source, target, request.target, pairs)
        mismatch = provenance.fingerprint != source.fingerprint
        job = self._job(
            grpc_context, started, source, target, how, sites, list(states), tokens, mapping, mismatch, 0.0
        )
        async with contextlib.aclosing(self._run(job)) as events:
            async for event in events:
                yield event

    # ---- the stream of events --------------------------------------------------------------------

    def _event(self, job: _Job, index: int, **payload) -> pb.ExplainEvent:
        site = job.sites[index]
        return pb.ExplainEvent(
            request_id=job.request_id,
            site=pb.Site(
                index=index,
                position=site.position,
                source_layer=site.source_layer,
                target_layer=site.target_layer,
                source_token=job.source_tokens[index],
            ),
            emitted_at=time.time(),
            **payload,
        )

    def _finished(
        self, job: _Job, index: int, explanation: str, timings: dict[str, float], top_k=None
    ) -> pb.ExplainEvent:
        site = job.sites[index]
        mapping_id = job.mapping.describe(site.source_layer, site.target_layer)[0] if job.mapping else ""
        finished = pb.SiteFinished(
            explanation=explanation,
            answer=job.how.preset.answer(explanation),
            top_k=[pb.TokenProb(token=t, prob=p) for t, p in top_k or []],
            timings=pb.Timings(
                source_s=job.source_s,
                queue_s=timings.get("queue_s", 0.0),
                prefill_s=timings.get("prefill_s", 0.0),
                decode_s=timings.get("decode_s", 0.0),
                total_s=time.time() - job.started,
            ),
            reproduction=pb.Reproduction(
                request_id=job.request_id,
                source_model=job.source.id,
                source_fingerprint=job.source.fingerprint,
                target_model=job.target.id,
                target_fingerprint=job.target.fingerprint,
                mapping_id=mapping_id,
                dtype=job.target.dtype,
                generation=generation_to_proto(job.how.generation),
                preset=job.how.preset.name,
                template=job.how.template,
                server_version=__version__,
                api_version=API_VERSION,
                provenance_mismatch=job.provenance_mismatch,
            ),
        )
        return self._event(job, index, finished=finished)

    async def _run(self, job: _Job) -> AsyncIterator[pb.ExplainEvent]:
        for index, (site, vector) in enumerate(zip(job.sites, job.vectors, strict=True)):
            mapping_id, r2 = (
                job.mapping.describe(site.source_layer, site.target_layer) if job.mapping else ("", None)
            )
            started = pb.SiteStarted(
                mapping_id=mapping_id,
                mapped_norm=float(vector.norm()),
                target_layer_norm=job.target.layer_norms[site.target_layer],
                provenance_mismatch=job.provenance_mismatch,
            )
            if r2 is not None:
                started.mapping_r2 = r2
            self.metrics.mapping(mapping_id)
            yield self._event(job, index, started=started)

        if not job.how.preset.generates:
            lens = await self.target.logit_lens.remote(job.target.id, job.vectors, job.how.top_k)
            for index, (explanation, pairs) in enumerate(lens):
                yield self._finished(job, index, explanation, {}, top_k=pairs)
            self.metrics.sites(job.target.id, len(job.sites))
            return

        generate = GenerateRequest(
            model=job.target.id,
            template=job.how.template,
            filler=job.how.preset.filler,
            layers=[s.target_layer for s in job.sites],
            vectors=job.vectors,
            config=job.how.generation,
        )
        first = True
        tokens = self.stream_target.generate.remote(generate)
        try:
            async for events in tokens:
                for e in events:
                    if not e.stop or e.text:
                        if first:
                            self.metrics.first_token(time.time() - job.started)
                            first = False
                        yield self._event(
                            job, e.row, token=pb.SiteToken(step=e.step, token_id=e.token_id, text=e.text)
                        )
                    if e.finished:
                        yield self._finished(job, e.row, e.explanation or "", e.timings or {})
        finally:
            # A caller that went away closes this generator at a `yield`, where no task cancellation reaches
            # the target call: cancel it here, so the target drops the rows at its next step.
            tokens.cancel()
        self.metrics.sites(job.target.id, len(job.sites))


for _name in ("ListModels", "ListMappings", *Explainer.STREAMING):
    setattr(Explainer, _name, rpc(getattr(Explainer, _name)))

ExplainerDeployment = serve.deployment(
    Explainer, name="Explainer", max_ongoing_requests=256, graceful_shutdown_timeout_s=120
)


def _request_id(context: RayServegRPCContext) -> str:
    return context.request_id() or uuid.uuid4().hex


def _per_row(field: str, values: list, n: int, *, default=None, required: bool = False) -> list:
    """One value per row: n values, one value for all, or (when not required) none for the default."""
    if len(values) == n:
        return values
    if len(values) == 1:
        return values * n
    if not values and not required:
        return [default] * n
    raise InvalidArgument(
        field, "must have one entry, or one per row of the states", limit=f"1 or {n}", value=len(values)
    )


def _mapping_info(info: MappingInfo) -> pb.MappingInfo:
    return pb.MappingInfo(
        id=info.id,
        source=info.source_model,
        target=info.target_model,
        source_layer=info.source_layer,
        target_layer=info.target_layer,
        method=info.method,
        r2=info.r2,
        r2_mean_dim=info.r2_mean_dim,
        cosine=info.cosine,
        mse=info.mse,
        num_pairs=info.pairs_train,
        source_fingerprint=info.source_fingerprint,
        target_fingerprint=info.target_fingerprint,
        corpus_fingerprint=info.corpus_fingerprint,
    )
