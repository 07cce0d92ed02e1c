"""The application builder every Serve config names: `import_path: patchscope.serve.app:build_app`.

Serve calls it with the application's `args:`; the config is validated here, so a typo fails the deploy
with a message instead of the first request. Placement (replicas, CPUs, GPUs) comes from the config's
`deployments:` entries, matched by the deployment names SourceModel, TargetModel and Explainer.
"""

from __future__ import annotations

import logging

from ray.serve import Application

from patchscope.serve.config import ServiceConfig
from patchscope.serve.ingress import ExplainerDeployment
from patchscope.serve.source import SourceModel
from patchscope.serve.target import TargetModel

logger = logging.getLogger("patchscope.serve")

AUTH_OFF_WARNING = (
    "WARNING: authentication is off (auth.required: false). Anyone who can reach the gRPC port can use "
    "the service; turn it on with auth.tokens_file or auth.tokens_env for anything but a local machine."
)


def build_app(args: dict) -> Application:
    config = ServiceConfig.model_validate(args)
    if not config.auth.required:
        logger.warning(AUTH_OFF_WARNING)
    data = config.model_dump()
    # A bounded queue at every deployment: beyond it a call is RESOURCE_EXHAUSTED at once (the config's
    # `deployments:` entries may still set their own).
    queue = {"max_queued_requests": config.limits.max_queued_requests}
    return ExplainerDeployment.options(**queue).bind(
        SourceModel.options(**queue).bind(data), TargetModel.options(**queue).bind(data), data
    )
