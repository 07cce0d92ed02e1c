"""The Explainer deployment: the servicer, wired to the model deployments' handles on a Ray replica."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable

from ray import serve
from ray.serve.handle import DeploymentHandle
from transformers import PreTrainedTokenizerBase

from patchscope.engine.template import prompt_tokens
from patchscope.serve.backend import ServeBackend
from patchscope.serve.config import ServiceConfig
from patchscope.serve.frames import Frames, frame_stream
from patchscope.serve.hosting import rss_bytes
from patchscope.serve.metrics import ServiceMetrics
from patchscope.serve.quotas import QuotaClient
from patchscope.serve.servicer import Servicer


class IngressBackend(ServeBackend):
    """The handles' backend, with each source's tokenizer held here once it has been asked for.

    Planning needs the prompt's tokens before any model runs; a handle call to SourceModel for them
    cost every Explain one more round trip through Ray. The tokenizer is the hosted model's own object
    (fetched once per source and replica), so the tokens are the ones SourceModel's `extract` sees.
    """

    def __init__(self, source: DeploymentHandle, target: DeploymentHandle) -> None:
        super().__init__(source, target)
        self._tokenizers: dict[str, asyncio.Task[PreTrainedTokenizerBase]] = {}

    async def tokenize(self, model_id: str, prompt: str) -> list[str]:
        await self.source_card(model_id)  # NOT_FOUND, naming the hosted sources, before any fetch
        task = self._tokenizers.get(model_id)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = asyncio.ensure_future(self.source.tokenizer.remote(model_id))  # retried after a failure
            self._tokenizers[model_id] = task
        return prompt_tokens(await asyncio.shield(task), prompt)


def framed(method: Callable) -> Callable:
    """A streaming RPC whose messages leave in `Frames` (the proxy splits them: serve/proxy.py).

    `functools.wraps` keeps the signature Serve reads to pass `grpc_context`.
    """

    @functools.wraps(method)
    async def stream(self: Servicer, request, grpc_context) -> AsyncIterator[Frames]:
        async for frames in frame_stream(method(self, request, grpc_context)):
            yield frames

    return stream


class Explainer(Servicer):
    """The gRPC ingress: holds no model, only the handles of SourceModel and TargetModel.

    Its streaming RPCs yield `Frames`, so it is served only behind Serve's proxy with
    `add_patchscope_servicer` registered (every config's `grpc_servicer_functions`).
    """

    ExtractHiddenStates = framed(Servicer.ExtractHiddenStates)
    Explain = framed(Servicer.Explain)
    ExplainActivations = framed(Servicer.ExplainActivations)

    def __init__(self, source: DeploymentHandle, target: DeploymentHandle, config: dict) -> None:
        settings = ServiceConfig.model_validate(config)
        quotas = settings.quotas
        keeper_handle = (
            QuotaClient(quotas.requests_per_minute, quotas.concurrent_streams)
            if quotas.requests_per_minute or quotas.concurrent_streams
            else None
        )
        super().__init__(
            IngressBackend(source, target), settings, metrics=ServiceMetrics(), quotas=keeper_handle
        )

    def stats(self) -> dict[str, object]:
        """Not an RPC: read through a deployment handle by tests and operators."""
        return {"rss_bytes": rss_bytes()}


ExplainerDeployment = serve.deployment(
    Explainer, name="Explainer", max_ongoing_requests=256, graceful_shutdown_timeout_s=120
)
