"""The standard `grpc.health.v1.Health` service, answered by Serve's gRPC proxy itself.

`add_health_servicer` is a `grpc_servicer_functions` entry (serve/local.py adds it to every config it
starts). On Serve's proxy it registers the health service as a *passthrough* service, so a check runs in
the proxy process and never waits behind the streams an Explainer replica is busy with. A watcher there
asks Serve's controller: SERVING once the application is RUNNING and every deployment (SourceModel,
TargetModel, Explainer) is HEALTHY, i.e. each replica's constructor has loaded and warmed up every model
the config hosts; NOT_SERVING while a replica is missing or restarting, or the controller cannot be
reached. It asks every second until SERVING, then every `SERVING_POLL_S`. The overall service "" and
`patchscope.v1.Patchscope` share the status.

`hosted_ready` is the same question asked of the model deployments by the ingress, for `ready` in
ListModels.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name  # grpc.health.v1.Health
API_SERVICE = "patchscope.v1.Patchscope"
DEPLOYMENTS = ("SourceModel", "TargetModel", "Explainer")
POLL_S = 1.0  # while not serving: a replica that comes up is announced within a second
# While serving: each probe costs the proxy ~40 ms of CPU (Serve's status object), taken from the cores the
# models decode on; a lost replica is announced within this many seconds (its calls fail over at once).
SERVING_POLL_S = 5.0
SERVING_POLL_ENV = "PATCHSCOPE_HEALTH_POLL_S"  # read in the proxy process, which inherits Ray's environment
READY_TIMEOUT_S = 2.0

logger = logging.getLogger("patchscope.serve")
_watchers: list[asyncio.Task] = []  # a reference, so the task is not collected


def serving(app_name: str = "patchscope") -> bool:
    """Whether Serve reports the application RUNNING with every deployment HEALTHY (blocking call)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or app.status != "RUNNING":
        return False
    deployments = app.deployments
    return all(name in deployments and deployments[name].status == "HEALTHY" for name in DEPLOYMENTS)


async def watch(
    servicer: HealthServicer, probe=serving, poll_s: float = POLL_S, serving_poll_s: float = SERVING_POLL_S
) -> None:
    """Keep the health status in step with `probe()` (run in a thread: it blocks on the controller).

    `probe` runs every `poll_s` while the status is NOT_SERVING and every `serving_poll_s` while SERVING.
    """
    last = None
    while True:
        try:
            ok = await asyncio.wait_for(asyncio.to_thread(probe), timeout=max(5.0, poll_s))
        except Exception as error:  # the controller is away: not serving, and say why once
            ok = False
            if last is not False:
                logger.warning("health: Serve's controller did not answer (%s)", type(error).__name__)
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        if status != last:
            for service in ("", API_SERVICE):
                await servicer.set(service, status)
            last = status
        await asyncio.sleep(serving_poll_s if ok else poll_s)


def add_health_servicer(servicer: Any, server: Any) -> None:
    """Register `grpc.health.v1.Health` on `server` (the proxy's: run there, not on a replica)."""
    passthrough = getattr(server, "add_passthrough_service", None)
    if passthrough is not None:
        passthrough(SERVICE_NAME)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not on an event loop (a plain gRPC server): the caller sets the status
        return
    serving_poll_s = float(os.environ.get(SERVING_POLL_ENV, SERVING_POLL_S))
    _watchers.append(loop.create_task(watch(health, serving_poll_s=serving_poll_s)))


async def hosted_ready(backend: Any) -> tuple[set[str], set[str]] | None:
    """Ids of the source and target models whose deployment answers now.

    A replica exists only once it has loaded and warmed up all its models. None where the backend has
    no deployments to ask (in-process tests): every model counts as ready.
    """
    handles = getattr(backend, "source", None), getattr(backend, "target", None)
    if any(h is None for h in handles):
        return None
    ready: list[set[str]] = []
    for handle in handles:
        try:
            cards = await asyncio.wait_for(asyncio.ensure_future(handle.list_cards.remote()), READY_TIMEOUT_S)
            ready.append({card.id for card in cards})
        except Exception:  # a replica restarting or unreachable: its models are not ready
            ready.append(set())
    return ready[0], ready[1]


def mark_ready(models: list[Any], live: tuple[set[str], set[str]] | None) -> None:
    """`ready` of each ListModels entry: every deployment hosting the model answers."""
    if live is None:
        return
    sources, targets = live
    for info in models:
        info.ready = (not info.source or info.id in sources) and (not info.target or info.id in targets)
