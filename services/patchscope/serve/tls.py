"""A TLS front for one machine: `patchscope serve --tls-cert CERT --tls-key KEY`.

Serve's gRPC proxy has no TLS. This front terminates TLS (optionally mTLS with `--tls-client-ca`) and
forwards every patchscope call, as raw bytes with its metadata and remaining deadline, to the proxy on the
loopback interface; a client that cancels cancels the forwarded call. On a cluster the same job falls to
an ingress or Envoy in front of the Serve service (deploy/README.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc

from patchscope.wire import pb

SERVICE = pb.DESCRIPTOR.services_by_name["Patchscope"]
# Every RPC of the API, and whether its response streams; Serve's health check is forwarded too.
METHODS = {f"/{SERVICE.full_name}/{m.name}": m.server_streaming for m in SERVICE.methods}
METHODS["/ray.serve.RayServeAPIService/Healthz"] = False
_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


class _Forward(grpc.GenericRpcHandler):
    def __init__(self, upstream: grpc.Channel) -> None:
        self.upstream = upstream

    def service(self, details: grpc.HandlerCallDetails):
        streaming = METHODS.get(details.method)
        if streaming is None:
            return None  # UNIMPLEMENTED for anything else
        if streaming:
            call = self.upstream.unary_stream(details.method)
            return grpc.unary_stream_rpc_method_handler(
                lambda request, context: self._stream(call, request, context)
            )
        call = self.upstream.unary_unary(details.method)
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: self._unary(call, request, context)
        )

    @staticmethod
    def _unary(call, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            response, outcome = call.with_call(
                request, metadata=context.invocation_metadata(), timeout=context.time_remaining()
            )
            context.set_trailing_metadata(outcome.trailing_metadata() or ())
            return response
        except grpc.RpcError as error:
            context.abort(error.code(), error.details())

    @staticmethod
    def _stream(call, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        responses = call(request, metadata=context.invocation_metadata(), timeout=context.time_remaining())
        context.add_callback(responses.cancel)  # the client went away: so does the forwarded call
        try:
            yield from responses
            context.set_trailing_metadata(responses.trailing_metadata() or ())
        except grpc.RpcError as error:
            context.abort(error.code(), error.details())


def tls_front(
    upstream: str, port: int, cert: Path, key: Path, client_ca: Path | None = None, workers: int = 32
) -> grpc.Server:
    """Start a TLS server on `port` forwarding to the plaintext proxy at `upstream`."""
    credentials = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=_OPTIONS)
    server.add_generic_rpc_handlers([_Forward(grpc.insecure_channel(upstream, options=_OPTIONS))])
    if server.add_secure_port(f"0.0.0.0:{port}", credentials) == 0:
        raise OSError(f"cannot listen on port {port} for the TLS front")
    server.start()
    return server
