"""How patchscope registers with Serve's gRPC proxy, so that a caller who leaves stops the work.

Serve's proxy forwards a server-streaming call by iterating an async generator that gRPC drives. When the
caller cancels, gRPC cancels that task wherever it waits. If it waits inside the generator (for the next
message from the replica), the proxy cancels the replica call, and the cancellation travels to the
Explainer and on to TargetModel, which drops the rows. If it waits while gRPC *writes* a message (the
generator is suspended at a `yield`), nothing reaches the generator's inner frames, the replica call is
never cancelled, and the target generates every remaining token for nobody. Token streams write often, so
this happened to about half of the cancelled Explains (Ray 2.60; the gap is described in
ray-project/ray#42665, never merged).

`add_patchscope_servicer` is the `grpc_servicer_functions` entry of the service's configs. Registering on
Serve's proxy server, it makes every server-streaming handler of `patchscope.v1.Patchscope` a coroutine
that writes the messages itself (several per replica item: serve/frames.py); cancelled anywhere, it
resumes the proxy's generator once and cancels it at its innermost wait, which is where the proxy cancels
the replica call. On any other gRPC server it registers the generated servicer unchanged.

It also makes a call whose ingress replica died (killed, out of memory) UNAVAILABLE, as a call whose
model replica died already is (the ingress maps that one itself): Serve's proxy gives any `RayActorError`
of the replica it called INTERNAL, which tells a client not to retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from patchscope.serve.frames import unframe
from patchscope_client._proto.patchscope_pb2_grpc import add_PatchscopeServicer_to_server

logger = logging.getLogger("patchscope.serve")


async def cancel_inside(messages: AsyncIterator[Any]) -> None:
    """Cancel a suspended async generator at its innermost `await`, not at its `yield`.

    A fresh `__anext__` task runs one loop iteration, which carries it down to the first real wait (the
    proxy's wait for the replica's next message); cancelling it there raises `CancelledError` where the
    proxy handles it. A generator that already ended just raises `StopAsyncIteration`.
    """
    step = asyncio.ensure_future(messages.__anext__())
    await asyncio.sleep(0)
    step.cancel()
    with contextlib.suppress(BaseException):
        await step


def cancel_on_leave(handler: Callable[[Any, Any], AsyncIterator[Any]]) -> Callable[[Any, Any], Any]:
    """A unary-stream handler that writes `handler`'s messages and cancels it properly when cancelled.

    Each item `handler` yields is one of the ingress's `Frames`: split here into its messages.
    """

    async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> None:
        messages = handler(request, context)
        try:
            async for item in messages:
                for message in unframe(item):
                    await context.write(message)
        except asyncio.CancelledError:
            await cancel_inside(messages)
            raise

    return unary_stream


REPLICA_DIED = "the replica serving this call died ({}); retry: Serve is starting another"


def unavailable_when_the_replica_died(status_of: Callable[..., Any]) -> Callable[..., Any]:
    """Serve's `get_grpc_response_status`, with a dead or unreachable replica UNAVAILABLE, not INTERNAL."""
    if getattr(status_of, "patchscope", False):
        return status_of

    def get_grpc_response_status(exc: BaseException, *args: Any, **kwargs: Any) -> Any:
        status = status_of(exc, *args, **kwargs)
        import ray.exceptions

        if status.code == grpc.StatusCode.INTERNAL and isinstance(exc, ray.exceptions.RayActorError):
            message = REPLICA_DIED.format(type(exc).__name__)
            return dataclasses.replace(status, code=grpc.StatusCode.UNAVAILABLE, message=message)
        return status

    get_grpc_response_status.patchscope = True  # type: ignore[attr-defined]
    return get_grpc_response_status


def patch_serve_proxy_status() -> None:
    """In the proxy process: Serve's proxy module looks the function up at each call, so replace it there."""
    from ray.serve._private import proxy

    proxy.get_grpc_response_status = unavailable_when_the_replica_died(proxy.get_grpc_response_status)


def add_patchscope_servicer(servicer: Any, server: Any) -> None:
    """Register `patchscope.v1.Patchscope`; on Serve's proxy, with cancellation that reaches the replicas."""
    factory = getattr(server, "service_handler_factory", None)
    if factory is None:
        add_PatchscopeServicer_to_server(servicer, server)
        return
    patch_serve_proxy_status()

    def handler_factory(service_method: str, streaming_type: Any) -> Callable:
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        streams = getattr(streaming_type, "name", "") == "UNARY_STREAM" and inspect.isasyncgenfunction(
            handler
        )
        return cancel_on_leave(handler) if streams else handler

    server.service_handler_factory = handler_factory
    try:
        add_PatchscopeServicer_to_server(servicer, server)
    finally:
        server.service_handler_factory = factory
