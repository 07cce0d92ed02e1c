"""`AsyncPatchscopeClient`: the same calls as `PatchscopeClient`, on `grpc.aio`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import grpc

from patchscope_client import convert
from patchscope_client._proto import patchscope_pb2 as pb
from patchscope_client._proto import patchscope_pb2_grpc as pb_grpc
from patchscope_client.client import bearer, check_version, open_channel
from patchscope_client.errors import from_rpc_error
from patchscope_client.types import Event, Extraction, MappingInfo, ModelInfo, ResultTable, collect

T = TypeVar("T")


class AsyncPatchscopeClient:
    """Use as `async with AsyncPatchscopeClient(address) as client:`."""

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
            grpc.aio, address, tls, client_cert=client_cert, retries=retries, backoff_s=backoff_s
        )
        self._stub = pb_grpc.PatchscopeStub(self._channel)
        self._metadata = bearer(token)
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s
        self._server_version: str | None = None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncPatchscopeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _retrying(self, method: str, call: Callable[[], Awaitable[T]]) -> T:
        """Await `call`; gRPC retries it per the channel's service config, this names the failure."""
        try:
            return await call()
        except grpc.RpcError as error:
            raise from_rpc_error(method, error) from None

    async def _handshake(self) -> None:
        if self._server_version is None:
            await self.models()

    async def models(self, timeout: float | None = None) -> list[ModelInfo]:
        response = await self._retrying(
            "ListModels",
            lambda: self._stub.ListModels(
                pb.ListModelsRequest(), timeout=timeout or self.timeout, metadata=self._metadata
            ),
        )
        check_version(response.api_version)
        self._server_version = response.api_version
        return [convert.model_info(m) for m in response.models]

    async def mappings(
        self, source: str = "", target: str = "", timeout: float | None = None
    ) -> list[MappingInfo]:
        await self._handshake()
        response = await self._retrying(
            "ListMappings",
            lambda: self._stub.ListMappings(
                pb.ListMappingsRequest(source=source, target=target),
                timeout=timeout or self.timeout,
                metadata=self._metadata,
            ),
        )
        return [convert.mapping_info(m) for m in response.mappings]

    async def extract(
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
        await self._handshake()
        request = convert.extract_request(model, prompt, layers, positions, dtype)

        async def call() -> list:
            stream = self._stub.ExtractHiddenStates(
                request, timeout=timeout or self.timeout, metadata=self._metadata
            )
            return [m async for m in stream]

        return convert.extraction(await self._retrying("ExtractHiddenStates", call), as_torch=as_torch)

    async def _stream(self, method: str, call, request, timeout: float | None) -> AsyncIterator[Event]:
        await self._handshake()
        responses = call(request, timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            async for message in responses:
                yield convert.event(message)
        except grpc.RpcError as error:
            raise from_rpc_error(method, error) from None
        finally:
            responses.cancel()

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
    ) -> AsyncIterator[Event]:
        request = convert.explain_request(
            source, prompt, layers, positions, convert.target_spec(target, controls=controls, **options)
        )
        return self._stream("Explain", self._stub.Explain, request, timeout)

    async def explain_table(self, *args, **kwargs) -> ResultTable:
        return collect([e async for e in self.explain(*args, **kwargs)])

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
    ) -> AsyncIterator[Event]:
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
