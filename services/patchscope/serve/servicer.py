"""The gRPC servicer of `patchscope.v1.Patchscope`: authenticate, convert, call the pipeline, stream.

Serve's gRPC proxy calls the methods named like the RPCs. Nothing here validates or orchestrates: proto
becomes a domain request (`wire/`), the pipeline plans it (every check, before any model runs) and runs
it, and its events become proto again. What every method does around that (authentication, the API
version, a quota slot, errors as status codes) is the `rpc` decorator's (`rpc.py`). The class runs
without Ray given a backend (tests drive it with fakes).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

from patchscope import __version__
from patchscope.calibration.registry import CalibrationRegistry
from patchscope.explain.checks import check_prompt_size
from patchscope.explain.plan import plan_extract
from patchscope.explain.run import Pipeline
from patchscope.mapping.registry import MappingRegistry
from patchscope.mapping.resolve import registry_resolver
from patchscope.serve.auth import TokenCheck
from patchscope.serve.backend import ServeBackend
from patchscope.serve.config import ServiceConfig
from patchscope.serve.health import hosted_ready, mark_ready
from patchscope.serve.rpc import rpc
from patchscope.wire import (
    LayerStates,
    Stamp,
    activations_from_proto,
    event_to_proto,
    explain_from_proto,
    layer_messages,
    mapping_info_to_proto,
    model_info_to_proto,
    pb,
    wire_dtype,
)
from patchscope_client.version import API_VERSION


class Metrics(Protocol):
    """What the servicer counts (serve/metrics.py on a Ray replica; a no-op without one)."""

    def sites(self, target: str, count: int = 1) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def mapping(self, mapping_id: str, count: int = 1) -> None: ...


class NoMetrics:
    """Counts nothing: a servicer outside a Ray replica."""

    def sites(self, target: str, count: int = 1) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def mapping(self, mapping_id: str, count: int = 1) -> None: ...


class Servicer:
    """The RPCs of `patchscope.v1.Patchscope` over one backend."""

    def __init__(
        self, backend: ServeBackend, config: ServiceConfig, *, metrics: Metrics, quotas=None
    ) -> None:
        self.config = config
        self.backend = backend
        self.registry = MappingRegistry(config.registry)
        self.calibrations = CalibrationRegistry(self.registry.root)
        self.pipeline = Pipeline(
            backend, config.limits, registry_resolver(self.registry), self.calibrations.lookup
        )
        auth = config.auth
        self.auth = TokenCheck.from_config(auth)  # every line validated; the file re-read on change
        self.quotas = quotas
        self.metrics = metrics

    def _stamp(self, context) -> Stamp:
        request_id = context.request_id() or uuid.uuid4().hex
        return Stamp(request_id, time.time(), __version__, API_VERSION)

    @rpc
    async def ListModels(self, request: pb.ListModelsRequest, grpc_context) -> pb.ListModelsResponse:
        sources, targets = await self.backend.cards()
        models = [
            model_info_to_proto(card, model_id in sources, model_id in targets)
            for model_id, card in {**sources, **targets}.items()
        ]
        mark_ready(models, await hosted_ready(self.backend))  # asked now, not remembered from startup
        return pb.ListModelsResponse(api_version=API_VERSION, server_version=__version__, models=models)

    @rpc
    async def ListMappings(self, request: pb.ListMappingsRequest, grpc_context) -> pb.ListMappingsResponse:
        listing = self.registry.scan()  # rescanned on every call: a prepare job may have added files
        infos = [
            i
            for i in listing.mappings
            if (not request.source or i.source_model == request.source)
            and (not request.target or i.target_model == request.target)
        ]
        unreadable = [f"{name}: {why}" for name, why in listing.unreadable]
        return pb.ListMappingsResponse(
            mappings=[mapping_info_to_proto(i) for i in infos], unreadable=unreadable
        )

    @rpc
    async def ExtractHiddenStates(
        self, request: pb.ExtractHiddenStatesRequest, grpc_context
    ) -> AsyncIterator[pb.ExtractHiddenStatesResponse]:
        source = await self.backend.source_info(request.model)
        wire_dtype("dtype", request.dtype)  # an unknown dtype is refused before the source runs
        check_prompt_size("prompt", request.prompt, self.config.limits)
        tokens = await self.backend.tokenize(source.id, request.prompt)
        layers, positions = plan_extract(
            source, request.prompt, request.layers, request.positions, tokens, self.config.limits
        )
        hidden = await self.backend.extract(source.id, request.prompt, layers, positions)
        for i, layer in enumerate(hidden.layers):
            states = LayerStates(layer, hidden.states[i])
            for message in layer_messages(
                source.id,
                source.fingerprint,
                states,
                hidden.positions,
                hidden.token_ids,
                hidden.tokens,
                request.dtype,
            ):
                yield message

    @rpc
    async def Explain(self, request: pb.ExplainRequest, grpc_context) -> AsyncIterator[pb.ExplainEvent]:
        stamp = self._stamp(grpc_context)
        plan = await self.pipeline.plan(explain_from_proto(request))
        async with contextlib.aclosing(self._stream(plan, stamp)) as events:
            async for event in events:
                yield event

    @rpc
    async def ExplainActivations(
        self, request: pb.ExplainActivationsRequest, grpc_context
    ) -> AsyncIterator[pb.ExplainEvent]:
        stamp = self._stamp(grpc_context)
        activations = activations_from_proto(request, max_bytes=self.config.limits.max_activation_bytes)
        plan = await self.pipeline.plan(activations)
        async with contextlib.aclosing(self._stream(plan, stamp, activations.states)) as events:
            async for event in events:
                yield event

    async def _stream(self, plan, stamp: Stamp, states=None) -> AsyncIterator[pb.ExplainEvent]:
        first = True
        async with contextlib.aclosing(self.pipeline.run(plan, states)) as events:
            async for event in events:
                now = time.time()
                message = event_to_proto(plan, event, stamp, now)
                if message.HasField("started"):
                    self.metrics.mapping(message.started.mapping_id)
                elif message.HasField("token") and first:
                    self.metrics.first_token(now - stamp.started)
                    first = False
                yield message
        self.metrics.sites(plan.target.id, len(plan.sites))
