"""`PatchscopeClient`: the synchronous client.

Every call has a deadline (`timeout`, per call or the client's default), one for all its attempts.
Idempotent calls (models, mappings, extract) are retried on UNAVAILABLE by gRPC itself, from the channel's
service config (`retry_policy`): exponential backoff with gRPC's jitter, the server's pushback
(`grpc-retry-pushback-ms`) honoured, a stream only before its first message. `explain` is never retried,
since a repeat would generate again. The first call checks the server's API
version once and fails with one sentence when it cannot serve this client. Leaving an `explain` loop
early cancels the call, and the server stops generating for it within one step.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import grpc

from patchscope_client import convert
from patchscope_client._proto import patchscope_pb2 as pb
from patchscope_client._proto import patchscope_pb2_grpc as pb_grpc
from patchscope_client.errors import CallError, IncompatibleServer, from_rpc_error
from patchscope_client.types import Event, Extraction, MappingInfo, ModelInfo, ResultTable, collect
from patchscope_client.version import API_VERSION, compatible

T = TypeVar("T")
MAX_MESSAGE = 64 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.enable_retries", 1),
    # A server that comes back is found within ~a retry's backoff, not after gRPC's 1-120 s reconnect wait.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
SERVICE = "patchscope.v1.Patchscope"
IDEMPOTENT = ("ListModels", "ListMappings", "ExtractHiddenStates")


def retry_policy(retries: int, backoff_s: float) -> str:
    """The service config retrying the idempotent methods on UNAVAILABLE (gRPC caps attempts at 5)."""
    config = {
        "methodConfig": [
            {
                "name": [{"service": SERVICE, "method": m} for m in IDEMPOTENT],
                "retryPolicy": {
                    "maxAttempts": max(2, min(retries + 1, 5)),
                    "initialBackoff": f"{backoff_s:.3f}s",
                    "maxBackoff": f"{max(backoff_s, 5.0):.3f}s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
    return json.dumps(config)


def credentials(
    tls: bool | bytes | grpc.ChannelCredentials | None, client_cert: tuple[bytes, bytes] | None = None
) -> grpc.ChannelCredentials | None:
    """`True`: the system's roots; bytes: a PEM root certificate; or credentials made by the caller.

    `client_cert` (PEM certificate chain, PEM private key) presents a client certificate (mTLS).
    """
    if (tls is None or tls is False) and client_cert is None:
        return None
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    chain, key = client_cert or (None, None)
    roots = None if tls in (None, True) else tls
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)


def open_channel(
    channels,
    address: str,
    tls: bool | bytes | grpc.ChannelCredentials | None,
    *,
    client_cert: tuple[bytes, bytes] | None = None,
    retries: int = 4,
    backoff_s: float = 0.25,
):
    """A channel from `grpc` or `grpc.aio` (`channels`): TLS when asked for, our limits, the retry policy."""
    options = [*CHANNEL_OPTIONS, ("grpc.service_config", retry_policy(retries, backoff_s))]
    if retries <= 0:
        options = [*CHANNEL_OPTIONS[:-4], ("grpc.enable_retries", 0)]
    creds = credentials(tls, client_cert)
    if creds:
        return channels.secure_channel(address, creds, options=options)
    return channels.insecure_channel(address, options=options)


def bearer(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


def check_version(server: str) -> None:
    if not compatible(server, API_VERSION):
        raise IncompatibleServer(
            f"the patchscope server speaks API {server}, but this client needs {API_VERSION.split('.')[0]}.x "
            f"with minor >= {API_VERSION.split('.')[1]}: install a patchscope-client matching the server"
        )


class PatchscopeClient:
    """A connection to a patchscope service. Use as a context manager, or call `close()`."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        tls: bool | bytes | grpc.ChannelCredentials | None = None,
        client_cert: tuple[bytes, bytes] | None = None,
        timeout: float = 120.0,
        retries: int = 4,
        backoff_s: float = 0.25,
    ) -> None:
        self._channel = open_channel(
            grpc, address, tls, client_cert=client_cert, retries=retries, backoff_s=backoff_s
        )
        self._stub = pb_grpc.PatchscopeStub(self._channel)
        self._metadata = bearer(token)
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s
        self.address = address
        self._server_version: str | None = None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PatchscopeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- plumbing ----------------------------------------------------------------------------------

    def _retrying(self, method: str, call: Callable[[], T]) -> T:
        """Run `call`; gRPC retries it per the channel's service config, this names the failure."""
        try:
            return call()
        except grpc.RpcError as error:
            raise from_rpc_error(method, error) from None

    def _handshake(self) -> None:
        if self._server_version is None:
            self.models()

    # ---- calls -------------------------------------------------------------------------------------

    def models(self, timeout: float | None = None) -> list[ModelInfo]:
        """The hosted models (checks the server's API version on the way)."""
        response = self._retrying(
            "ListModels",
            lambda: self._stub.ListModels(
                pb.ListModelsRequest(), timeout=timeout or self.timeout, metadata=self._metadata
            ),
        )
        check_version(response.api_version)
        self._server_version = response.api_version
        return [convert.model_info(m) for m in response.models]

    def mappings(self, source: str = "", target: str = "", timeout: float | None = None) -> list[MappingInfo]:
        self._handshake()
        response = self._retrying(
            "ListMappings",
            lambda: self._stub.ListMappings(
                pb.ListMappingsRequest(source=source, target=target),
                timeout=timeout or self.timeout,
                metadata=self._metadata,
            ),
        )
        return [convert.mapping_info(m) for m in response.mappings]

    def extract(
        self,
        model: str,
        prompt: str,
        layers: Sequence[int],
        positions: Sequence[int] | None = None,
        *,
        dtype: str = "float32",
        as_torch: bool = False,
        timeout: float | None = None,
    ) -> Extraction:
        """Hidden states of `prompt` at `layers` × `positions` (default: the last token) as float32 arrays."""
        self._handshake()
        request = convert.extract_request(model, prompt, layers, positions, dtype)
        messages = self._retrying(
            "ExtractHiddenStates",
            lambda: list(
                self._stub.ExtractHiddenStates(
                    request, timeout=timeout or self.timeout, metadata=self._metadata
                )
            ),
        )
        return convert.extraction(messages, as_torch=as_torch)

    def _stream(self, method: str, call, request, timeout: float | None) -> Iterator[Event]:
        self._handshake()
        responses = call(request, timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            for message in responses:
                yield convert.event(message)
        except grpc.RpcError as error:
            raise from_rpc_error(method, error) from None
        finally:
            responses.cancel()  # a caller that stops iterating cancels the call (a no-op once it ended)

    def explain(
        self,
        source: str,
        prompt: str,
        layers: Sequence[int],
        *,
        target: str,
        positions: Sequence[int] | None = None,
        controls: bool = True,
        timeout: float | None = None,
        **options,
    ) -> Iterator[Event]:
        """Stream `Started`, `Token` and `Finished` events of every site (layers × positions).

        Each `Finished` carries its `control` (what the target says unpatched, `same_as_unpatched`,
        `patch_effect`, `dependence`, `confidence`); `controls=False` skips the control row, and then
        `control` is None. `options`: preset, template, target_layers, mapping, max_new_tokens,
        temperature, top_p, seed, top_k (see `convert.target_spec`).
        """
        request = convert.explain_request(
            source, prompt, layers, positions, convert.target_spec(target, controls=controls, **options)
        )
        return self._stream("Explain", self._stub.Explain, request, timeout)

    def explain_table(self, *args, **kwargs) -> ResultTable:
        """`explain`, collected into one row per site."""
        return collect(self.explain(*args, **kwargs))

    def explain_activations(
        self,
        states,
        *,
        source: str,
        layers: Sequence[int],
        target: str,
        positions: Sequence[int] | None = None,
        tokens: Sequence[str] | None = None,
        model: str = "",
        fingerprint: str = "",
        controls: bool = True,
        timeout: float | None = None,
        **options,
    ) -> Iterator[Event]:
        """Explain states captured elsewhere: `states` [sites, hidden], `layers` one per row (or one for all).

        `model` and `fingerprint` say where they came from; a fingerprint other than the hosted `source`'s
        is explained all the same and flagged (`provenance_mismatch`).
        """
        request = convert.activations_request(
            states,
            source=source,
            layers=layers,
            positions=positions,
            tokens=tokens,
            model=model,
            fingerprint=fingerprint,
            spec=convert.target_spec(target, controls=controls, **options),
        )
        return self._stream("ExplainActivations", self._stub.ExplainActivations, request, timeout)


__all__ = ["CallError", "IncompatibleServer", "PatchscopeClient"]
