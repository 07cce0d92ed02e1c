"""`patchscope serve`: the gRPC service on a local Ray instance, up until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import os
import sys

from patchscope.cli.args import progress
from patchscope.serve.local import DEFAULT_SERVE_CONFIG

ALL_INTERFACES = "0.0.0.0"
LOOPBACK = "127.0.0.1"


def plaintext_host(given: str | None, *, tls: bool, auth: bool) -> str:
    """Where Serve's plaintext gRPC port listens, unless `--host` says.

    Loopback when a TLS front takes the outside calls or when anyone could call without a token; every
    interface otherwise (Serve's own default).
    """
    if given is not None:
        if tls and given != LOOPBACK:
            raise ValueError(f"--host {given} with --tls-cert: the plaintext port would bypass the TLS front")
        return given
    return LOOPBACK if tls or not auth else ALL_INTERFACES


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import time

    from patchscope.serve.app import AUTH_OFF_WARNING
    from patchscope.serve.config import ServiceConfig
    from patchscope.serve.local import proxy_message_limit, read_config, start

    config_path = args.config or DEFAULT_SERVE_CONFIG
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"no Serve config at {config_path}: pass --config FILE (see deploy/config/)")
    config = read_config(config_path)
    settings = ServiceConfig.model_validate(config["applications"][0].get("args", {}))  # fail before Ray
    if not settings.auth.required:
        print(AUTH_OFF_WARNING, file=sys.stderr)
    tls = bool(args.tls_cert or args.tls_key)
    if tls and not (args.tls_cert and args.tls_key):
        raise FileNotFoundError("--tls-cert and --tls-key go together")
    host = plaintext_host(args.host, tls=tls, auth=settings.auth.required)
    service = start(
        config,
        grpc_port=args.port,
        http_port=args.http_port,
        num_cpus=args.num_cpus,
        progress=progress,
        grpc_host=None if host == ALL_INTERFACES else host,
    )
    print(f"patchscope serving gRPC on {host}:{service.address.rsplit(':', 1)[1]} (Ctrl-C stops)", flush=True)
    front = None
    if tls:
        from pathlib import Path

        from patchscope.serve.tls import tls_front

        client_ca = Path(args.tls_client_ca) if args.tls_client_ca else None
        front = tls_front(
            service.address, args.tls_port, Path(args.tls_cert), Path(args.tls_key), client_ca, args.tls_host
        )
        mtls = " (mTLS: client certificates required)" if client_ca else ""
        print(
            f"  TLS front on {args.tls_host}:{args.tls_port}{mtls}: the only listener off this machine",
            flush=True,
        )
    print(
        f"  note: Serve's gRPC proxy listens on {host} in plaintext and buffers each whole message "
        f"(at most {proxy_message_limit(config)} bytes) before the ingress checks it"
        + ("" if host != ALL_INTERFACES else "; put a TLS front before it on anything but a trusted network"),
        flush=True,
    )
    print(
        f"  sources: {', '.join(settings.sources)}; targets: {', '.join(settings.targets)}; "
        f"health: http://127.0.0.1:{service.http_port}/-/healthz",
        flush=True,
    )
    # Ctrl-C, and SIGTERM from a container runtime, both shut down cleanly (even where SIGINT was ignored).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", file=sys.stderr)
    finally:
        if front is not None:
            front.stop(grace=5)
        service.stop()
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("serve", help="start the gRPC service on a local Ray instance and stay up")
    srv.add_argument("--config", default=None, help=f"Ray Serve config file (default {DEFAULT_SERVE_CONFIG})")
    srv.add_argument("--port", type=int, default=None, help="gRPC port (default: the config's, 9000)")
    srv.add_argument("--http-port", type=int, default=None, help="HTTP port (health checks)")
    srv.add_argument("--num-cpus", type=float, default=None, help="CPUs Ray may use (default: all)")
    srv.add_argument("--tls-cert", default=None, help="PEM certificate: serve through a TLS front")
    srv.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    srv.add_argument("--tls-client-ca", default=None, help="PEM CA: require client certificates (mTLS)")
    srv.add_argument("--tls-port", type=int, default=9443, help="port of the TLS front (default 9443)")
    srv.add_argument("--tls-host", default=ALL_INTERFACES, help="address of the TLS front (default 0.0.0.0)")
    srv.add_argument(
        "--host",
        default=None,
        help="address of the plaintext gRPC port (default 127.0.0.1 with TLS or with auth off, else 0.0.0.0)",
    )
    srv.set_defaults(func=cmd_serve)
