"""Run the service on this machine: a private local Ray instance, the Serve config deployed, ready or not.

`patchscope serve`, `make run`, the integration tests and the service benchmark all start the service
through `start()`, the same path `serve run CONFIG` takes (start Serve with the config's proxy options,
then deploy its applications), so what they test is what a config file deploys.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

APP_NAME = "patchscope"
DEFAULT_SERVE_CONFIG = "deploy/config/local.yaml"  # `patchscope serve` and `make run` without --config
# Set before Ray starts so every Ray process inherits them (the gRPC proxy and every replica).
RAY_ENV = {
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1",
}


# The standard gRPC health service, answered by the proxy itself (serve/health.py), beside the API.
HEALTH_SERVICER = "patchscope.serve.health.add_health_servicer"
# Where Serve's proxy binds its gRPC port (Serve itself always binds every interface): read by
# `bind_grpc_host` in the proxy process, which inherits the environment of the Ray it was started with.
GRPC_HOST_ENV = "PATCHSCOPE_GRPC_HOST"


def bind_grpc_host() -> None:
    """A `worker_process_setup_hook`: Serve's gRPC proxy binds on $PATCHSCOPE_GRPC_HOST, not on `[::]`.

    Serve 2.60 has no host option for gRPC; the one place that binds is `default_impl.add_grpc_address`,
    looked up when the proxy starts its server, so replacing it in each Ray worker before that is enough.
    """
    host = os.environ.get(GRPC_HOST_ENV)
    if not host:
        return
    from ray.serve._private import default_impl

    bind = default_impl.add_grpc_address
    if getattr(bind, "patchscope_host", None) == host:
        return

    def add_grpc_address(server, address: str) -> None:
        bind(server, f"{host}:{address.rsplit(':', 1)[1]}")

    add_grpc_address.patchscope_host = host  # type: ignore[attr-defined]
    default_impl.add_grpc_address = add_grpc_address


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proxy_message_limit(config: dict[str, Any]) -> int:
    """The gRPC proxy's maximum message size: the activation payload limit plus 1 MiB for the rest.

    Serve's proxy buffers a whole message before the ingress sees it, so this bounds what one request can
    make the proxy hold. Read from the environment by every Ray process, so it is set before Ray starts.
    """
    from patchscope.serve.config import Limits

    args = config["applications"][0].get("args", {})
    limits = Limits.model_validate(args.get("limits", {}))
    return limits.max_activation_bytes + (1 << 20)


def read_config(path: str | Path) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


@dataclass
class LocalService:
    """A running local service; `stop()` shuts Serve and Ray down."""

    address: str
    http_port: int
    temp_dir: str
    config: dict[str, Any]

    def redeploy(self, config: dict[str, Any], ready: Callable[[], bool], timeout_s: float = 300.0) -> None:
        """Deploy another version of the application on the running Serve (same ports).

        Returns once `ready()` says the new version answers.
        """
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        config = {
            **config,
            "grpc_options": self.config["grpc_options"],
            "http_options": self.config["http_options"],
        }
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the new version of {APP_NAME} did not answer within {timeout_s:.0f} s")
            time.sleep(0.5)
        # The new ingress answers; wait until every deployment of the new version is up too.
        wait_running(max(1.0, deadline - time.monotonic()))
        self.config = config

    def process_memory(self) -> dict[str, int]:
        """Resident bytes of every Ray process of this service, by process title.

        GCS, raylet, controller, proxy, replicas, the quota keeper and idle workers: every descendant of
        this process (the Ray it started); a title seen twice gets a `#pid` suffix.
        """
        import psutil

        memory: dict[str, int] = {}
        for process in psutil.Process().children(recursive=True):
            try:
                title = " ".join(process.cmdline()[:1]) or process.name()
                rss = process.memory_info().rss
            except psutil.Error:  # gone between the listing and the look
                continue
            # A Ray worker's title names the task it runs ("ray::ServeController.listen_for_change"):
            # keep the actor's part, so one process has one name at the start and at the end.
            if title.startswith("ray::"):
                name = title.split(".")[0]
            else:
                name = title.split("/")[-1].split(" ")[0]
            memory[name if name not in memory else f"{name}#{process.pid}"] = rss
        return memory

    def stop(self) -> None:
        """Shut Serve and Ray down; remove Ray's temp dir unless PATCHSCOPE_KEEP_RAY_TMP=1 (its logs)."""
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if os.environ.get("PATCHSCOPE_KEEP_RAY_TMP") != "1":
                shutil.rmtree(self.temp_dir, ignore_errors=True)


def start(
    config: dict[str, Any],
    *,
    grpc_port: int | None = None,
    http_port: int | None = None,
    num_cpus: float | None = None,
    timeout_s: float = 300.0,
    progress: Callable[[str], None] = lambda _: None,
    grpc_host: str | None = None,
) -> LocalService:
    """Start Ray and deploy `config` (a Serve config as a dict); return when the application is RUNNING.

    `grpc_host` binds Serve's plaintext gRPC port there only ("127.0.0.1" behind a TLS front); the
    default is Serve's own, every interface. Raises RuntimeError with Serve's message when the deploy
    fails or does not finish within `timeout_s`.
    """
    os.environ.update(RAY_ENV)
    if grpc_host:
        os.environ[GRPC_HOST_ENV] = grpc_host
    else:
        os.environ.pop(GRPC_HOST_ENV, None)
    os.environ["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] = str(proxy_message_limit(config))
    import ray
    from ray.serve._private import api as serve_api  # what `serve run CONFIG` uses
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    config = dict(config)
    functions = list(config.get("grpc_options", {}).get("grpc_servicer_functions", []))
    config["grpc_options"] = {
        **config.get("grpc_options", {}),
        "port": grpc_port or config["grpc_options"]["port"],
        "grpc_servicer_functions": functions + [HEALTH_SERVICER] * (HEALTH_SERVICER not in functions),
    }
    config["http_options"] = {**config.get("http_options", {})}
    if http_port is not None:
        config["http_options"]["port"] = http_port
    schema = ServeDeploySchema.model_validate(config)

    # A short private temp dir: Ray's socket paths must stay under the OS limit.
    temp_dir = tempfile.mkdtemp(prefix="ray-ps-", dir="/tmp")
    progress("starting Ray")
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _temp_dir=temp_dir,
        namespace="serve",
        log_to_driver=os.environ.get("PATCHSCOPE_RAY_LOGS", "0") == "1",
        runtime_env={"worker_process_setup_hook": "patchscope.serve.local.bind_grpc_host"}
        if grpc_host
        else None,
    )
    progress("deploying")
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
        proxy_location=schema.proxy_location,
    )
    client.deploy_apps(schema, _blocking=False)
    service = LocalService(
        address=f"{grpc_host or '127.0.0.1'}:{schema.grpc_options.port}",
        http_port=schema.http_options.port,
        temp_dir=temp_dir,
        config=config,
    )
    try:
        wait_running(timeout_s, progress)
    except BaseException:
        service.stop()
        raise
    return service


def wait_running(timeout_s: float, progress: Callable[[str], None] = lambda _: None) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP_NAME)
        status = app.status if app else "NOT_STARTED"
        if status == "RUNNING":
            return
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"deploying {APP_NAME} failed: {app.message if app else ''}")
        if status != last:
            progress(f"application {status.lower()}")
            last = status
        time.sleep(0.5)
    raise RuntimeError(f"{APP_NAME} was not RUNNING after {timeout_s:.0f} s")
