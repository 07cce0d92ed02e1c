"""How a stream's messages cross from the ingress replica to Serve's gRPC proxy: several per Ray item.

Serve turns every message a streaming replica method yields into one Ray stream item: the replica
serializes it, pickles it beside the call's context and reports it to the proxy, which unpickles it and
writes it. One decode step of an Explain is one token event per site, so that cost was paid once per
site and token, on the two cores the target decodes on. `frame_stream` instead yields, as one item,
every message that is ready at the moment the previous item left (never waiting for more, so no message
is delayed), and the proxy's handler (`serve/proxy.py`) splits the item with `unframe` and writes the
messages one by one: what the client receives is unchanged.

An item is a sequence of (4-byte big-endian length, serialized message) records, at most `MAX_FRAME`
bytes of messages (one larger message travels alone). Only this module's two functions read or write it.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

MAX_FRAME = 4 << 20  # bytes of messages per item: large tensor streams still travel in pieces
QUEUE_MESSAGES = 256  # messages ready but not yet sent: the producer waits beyond this
_LENGTH = struct.Struct(">I")


@dataclass(frozen=True)
class Frames:
    """Serialized messages as one stream item; Serve's replica sends what `SerializeToString` returns."""

    payload: bytes

    def SerializeToString(self) -> bytes:  # the protobuf method Serve calls
        return self.payload


@dataclass(frozen=True)
class _End:
    error: BaseException | None = None


def unframe(payload: bytes) -> list[bytes]:
    """The serialized messages of one item, in order."""
    out, offset = [], 0
    while offset < len(payload):
        (size,) = _LENGTH.unpack_from(payload, offset)
        offset += _LENGTH.size
        out.append(payload[offset : offset + size])
        offset += size
    if offset != len(payload):
        raise ValueError(f"a framed stream item is cut short ({len(payload)} bytes, {offset} expected)")
    return out


async def frame_stream(messages: AsyncIterator[Any], max_frame: int = MAX_FRAME) -> AsyncIterator[Frames]:
    """`messages` (protobuf messages) grouped into items, in order, with its error raised after them.

    The messages are pulled by a task of their own, so that whatever the inner stream produces while an
    item is being sent is ready for the next one. Cancelled or closed, this cancels that task where it
    waits, inside the inner stream, which is where the inner stream's cleanup (cancelling the target's
    rows) expects it.
    """
    queue: asyncio.Queue[Any] = asyncio.Queue(QUEUE_MESSAGES)

    async def pump() -> None:
        try:
            async with contextlib.aclosing(messages) as inner:  # type: ignore[type-var]
                async for message in inner:
                    await queue.put(message.SerializeToString())
        except Exception as error:  # a cancellation is not one: it ends the task, and nobody reads on
            await queue.put(_End(error))
        else:
            await queue.put(_End())

    task = asyncio.ensure_future(pump())
    try:
        while True:
            item = await queue.get()
            parts: list[bytes] = []
            size = 0
            while not isinstance(item, _End):
                parts += (_LENGTH.pack(len(item)), item)
                size += len(item)
                if size >= max_frame or queue.empty():
                    break
                item = queue.get_nowait()
            if parts:
                yield Frames(b"".join(parts))
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
