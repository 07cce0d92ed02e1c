"""The Explainer deployment: the servicer, wired to the model deployments' handles on a Ray replica."""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle

from patchscope.serve.backend import ServeBackend
from patchscope.serve.config import ServiceConfig
from patchscope.serve.hosting import rss_bytes
from patchscope.serve.metrics import ServiceMetrics
from patchscope.serve.quotas import QuotaClient
from patchscope.serve.servicer import Servicer


class Explainer(Servicer):
    """The gRPC ingress: holds no model, only the handles of SourceModel and TargetModel."""

    def __init__(self, source: DeploymentHandle, target: DeploymentHandle, config: dict) -> None:
        settings = ServiceConfig.model_validate(config)
        quotas = settings.quotas
        keeper_handle = (
            QuotaClient(quotas.requests_per_minute, quotas.concurrent_streams)
            if quotas.requests_per_minute or quotas.concurrent_streams
            else None
        )
        super().__init__(
            ServeBackend(source, target), settings, metrics=ServiceMetrics(), quotas=keeper_handle
        )

    def stats(self) -> dict[str, object]:
        """Not an RPC: read through a deployment handle by tests and operators."""
        return {"rss_bytes": rss_bytes()}


ExplainerDeployment = serve.deployment(
    Explainer, name="Explainer", max_ongoing_requests=256, graceful_shutdown_timeout_s=120
)
