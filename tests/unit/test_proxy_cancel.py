"""Cancellation through `patchscope.serve.proxy`, on a stand-in for Serve's proxy generator chain."""

from __future__ import annotations

import asyncio
import contextlib
import inspect

import pytest

from patchscope.serve.frames import Frames, frame_stream
from patchscope.serve.proxy import add_patchscope_servicer, cancel_on_leave


class Message:
    """A protobuf message as the framing sees one: it serializes to its bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:
        return self.data


async def framed(*messages: bytes) -> bytes:
    """One replica item carrying `messages`, made by the ingress's framing."""
    items = [f async for f in frame_stream(_messages(messages))]
    assert len(items) == 1 and isinstance(items[0], Frames)
    return items[0].SerializeToString()


async def _messages(data):
    for d in data:
        yield Message(d)


class Replica:
    """Stands in for a replica call: cancelled only when CancelledError reaches its wait, as in Serve."""

    def __init__(self) -> None:
        self.cancelled = False
        self.items: asyncio.Queue[bytes] = asyncio.Queue()

    async def next(self) -> bytes:
        try:
            return await self.items.get()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


def proxy_handler(replica: Replica):
    """Like Serve's unary_stream: nested generators, and a layer that swallows GeneratorExit at a yield."""

    async def send_to_replica():
        try:
            while True:
                yield await replica.next()
        except BaseException:  # Serve turns every exception into a final status message
            pass
        yield b"status"

    async def unary_stream(request, context):
        async for message in send_to_replica():
            if message != b"status":
                yield message

    return unary_stream


class SlowWriter:
    """A servicer context whose writes block until released, so a cancel lands during a write."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.writing = asyncio.Event()
        self.release = asyncio.Event()

    async def write(self, message: bytes) -> None:
        self.written.append(message)
        self.writing.set()
        await self.release.wait()


@pytest.mark.parametrize("during", ["write", "wait for the replica"])
def test_a_cancelled_stream_cancels_the_replica_call_wherever_it_waits(during):
    async def scenario() -> Replica:
        replica, context = Replica(), SlowWriter()
        handler = cancel_on_leave(proxy_handler(replica))
        task = asyncio.ensure_future(handler(None, context))
        if during == "write":
            replica.items.put_nowait(await framed(b"token"))
            await context.writing.wait()
        else:
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):  # Serve's chain may end with a status instead
            await task
        return replica

    assert asyncio.run(scenario()).cancelled


def test_a_finished_stream_writes_every_message_and_cancels_nothing():
    async def scenario() -> tuple[Replica, SlowWriter]:
        replica, context = Replica(), SlowWriter()
        context.release.set()

        items = [await framed(b"a", b"b"), await framed(b""), await framed(b"c")]

        async def finite(request, ctx):
            for item in items:
                yield item

        await cancel_on_leave(finite)(None, context)
        return replica, context

    replica, context = asyncio.run(scenario())
    assert context.written == [b"a", b"b", b"", b"c"] and not replica.cancelled


class ProxyServer:
    """Serve's proxy server as `add_patchscope_servicer` sees it: handlers come from its factory."""

    def __init__(self) -> None:
        self.handlers: dict[str, object] = {}

    def service_handler_factory(self, service_method: str, streaming_type):
        async def unary_unary(request, context):
            return b""

        async def unary_stream(request, context):
            yield b""

        return unary_stream if streaming_type.name == "UNARY_STREAM" else unary_unary

    def add_generic_rpc_handlers(self, generic_handlers) -> None:
        for name, handler in generic_handlers[0]._method_handlers.items():
            kind = "UNARY_STREAM" if handler.response_streaming else "UNARY_UNARY"
            made = self.service_handler_factory(name, type("Kind", (), {"name": kind}))
            self.handlers[name] = made

    def add_registered_method_handlers(self, service_name, method_handlers) -> None:
        pass


def test_on_serve_s_proxy_streaming_methods_write_themselves_and_unary_methods_are_unchanged():
    from patchscope.wire import pb_grpc

    server = ProxyServer()
    factory = server.service_handler_factory
    add_patchscope_servicer(pb_grpc.PatchscopeServicer(), server)
    streaming = {"ExtractHiddenStates", "Explain", "ExplainActivations"}
    for name, handler in server.handlers.items():
        method = name.rsplit("/", 1)[-1]
        assert inspect.iscoroutinefunction(handler), name
        assert (
            handler.__name__ == "unary_stream" and handler.__qualname__.startswith("cancel_on_leave")
        ) == (method in streaming), name
    assert server.service_handler_factory == factory  # restored for services registered later


def test_on_a_plain_grpc_server_the_generated_servicer_registers():
    import grpc

    from patchscope.wire import pb_grpc

    server = grpc.server(thread_pool=None)
    add_patchscope_servicer(pb_grpc.PatchscopeServicer(), server)
