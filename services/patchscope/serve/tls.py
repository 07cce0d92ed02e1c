"""A TLS front for one machine: `patchscope serve --tls-cert CERT --tls-key KEY`.

Serve's gRPC proxy has no TLS. This front terminates TLS (optionally mTLS with `--tls-client-ca`) and
forwards every patchscope call, as raw bytes with its metadata and remaining deadline, to the proxy on the
loopback interface; a client that cancels cancels the forwarded call. Calls are coroutines on one event
loop, not threads of a fixed pool, so any number of long streams leaves health checks answered
(`grpc.health.v1.Health` is forwarded to the proxy, which answers it itself). On a cluster the same job
falls to an ingress or Envoy in front of the Serve service (deploy/README.md).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from patchscope.wire import pb

SERVICE = pb.DESCRIPTOR.services_by_name["Patchscope"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
# Every RPC of the API and of the standard health service, and whether its response streams; Serve's
# own health check is forwarded too.
METHODS = {f"/{SERVICE.full_name}/{m.name}": m.server_streaming for m in SERVICE.methods}
METHODS.update({f"/{HEALTH.full_name}/{m.name}": m.server_streaming for m in HEALTH.methods})
METHODS["/ray.serve.RayServeAPIService/Healthz"] = False
_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


class _Forward(grpc.GenericRpcHandler):
    """Forwards each call as it comes, on one event loop: no thread pool that long streams could fill."""

    def __init__(self, upstream: grpc.aio.Channel) -> None:
        self.upstream = upstream

    def service(self, details: grpc.HandlerCallDetails):
        streaming = METHODS.get(details.method)
        if streaming is None:
            return None  # UNIMPLEMENTED for anything else
        if streaming:
            call = self.upstream.unary_stream(details.method)
            # partial, not lambda: grpc.aio tells coroutine and async-generator handlers by inspection
            return grpc.unary_stream_rpc_method_handler(functools.partial(self._stream, call))
        call = self.upstream.unary_unary(details.method)
        return grpc.unary_unary_rpc_method_handler(functools.partial(self._unary, call))

    @staticmethod
    async def _unary(call, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        forwarded = call(request, metadata=context.invocation_metadata(), timeout=context.time_remaining())
        try:
            response = await forwarded
            context.set_trailing_metadata(await forwarded.trailing_metadata() or ())
            return response
        except grpc.aio.AioRpcError as error:
            await context.abort(error.code(), error.details())
        finally:
            forwarded.cancel()  # the client went away (this task was cancelled): so does the forwarded call

    @staticmethod
    async def _stream(call, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        forwarded = call(request, metadata=context.invocation_metadata(), timeout=context.time_remaining())
        try:
            async for response in forwarded:
                yield response
            context.set_trailing_metadata(await forwarded.trailing_metadata() or ())
        except grpc.aio.AioRpcError as error:
            await context.abort(error.code(), error.details())
        finally:
            forwarded.cancel()


class TlsFront:
    """The TLS server, on an event loop of its own thread; `stop()` ends both."""

    def __init__(self, upstream: str, address: str, credentials: grpc.ServerCredentials) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-front", daemon=True)
        self._thread.start()
        self._server: grpc.aio.Server = self._run(self._start(upstream, address, credentials))

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    async def _start(self, upstream: str, address: str, credentials) -> grpc.aio.Server:
        server = grpc.aio.server(options=_OPTIONS)
        server.add_generic_rpc_handlers([_Forward(grpc.aio.insecure_channel(upstream, options=_OPTIONS))])
        if server.add_secure_port(address, credentials) == 0:
            raise OSError(f"cannot listen on {address} for the TLS front")
        await server.start()
        return server

    def stop(self, grace: float | None = None) -> None:
        try:
            self._run(self._server.stop(grace))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)


def tls_front(
    upstream: str, port: int, cert: Path, key: Path, client_ca: Path | None = None, host: str = "0.0.0.0"
) -> TlsFront:
    """Start a TLS server on `host:port` forwarding to the plaintext proxy at `upstream`."""
    credentials = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )
    return TlsFront(upstream, f"{host}:{port}", credentials)
