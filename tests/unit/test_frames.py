"""The ingress-to-proxy framing (serve/frames.py): order, grouping, errors and cancellation."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patchscope.serve.frames import Frames, frame_stream, unframe


class Message:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:
        return self.data


async def produce(steps: list[list[bytes]], log: list[str] | None = None, fail_after: bool = False):
    """Like the pipeline: each step's messages together, then a real wait (the next decode step)."""
    try:
        for step in steps:
            for data in step:
                yield Message(data)
            await asyncio.sleep(0.001)
        if fail_after:
            raise LookupError("the target went away")
    except asyncio.CancelledError:
        if log is not None:
            log.append("cancelled inside")
        raise
    finally:
        if log is not None:
            log.append("closed")


async def collect(stream, *, slow: bool = False) -> list[Frames]:
    out = []
    async for item in stream:
        out.append(item)
        if slow:
            await asyncio.sleep(0.002)  # the item is being sent: the next step is produced meanwhile
    return out


steps_strategy = st.lists(
    st.lists(st.binary(max_size=40) | st.sampled_from([b"", b"x" * 300]), max_size=6), max_size=8
)


@settings(max_examples=60, deadline=None)
@given(steps=steps_strategy, cap=st.sampled_from([64, 1 << 20]), slow=st.booleans())
def test_every_message_arrives_once_in_order_and_items_respect_the_cap(steps, cap, slow):
    items = asyncio.run(collect(frame_stream(produce(steps), max_frame=cap), slow=slow))
    parts = [unframe(item.SerializeToString()) for item in items]
    assert [m for p in parts for m in p] == [m for step in steps for m in step]
    assert all(p for p in parts)  # no empty item
    for p in parts:  # over the cap only by its last message
        assert sum(map(len, p[:-1])) < cap


def test_a_step_s_messages_travel_as_one_item():
    steps = [[b"t1", b"t2", b"t3"], [b"u1", b"u2", b"u3"]]
    items = asyncio.run(collect(frame_stream(produce(steps))))
    assert [unframe(i.SerializeToString()) for i in items] == steps


def test_an_error_is_raised_after_the_messages_before_it():
    received: list[bytes] = []

    async def run() -> None:
        async for item in frame_stream(produce([[b"a", b"b"], [b"c"]], fail_after=True)):
            received.extend(unframe(item.SerializeToString()))

    with pytest.raises(LookupError, match="went away"):
        asyncio.run(run())
    assert received == [b"a", b"b", b"c"]


@pytest.mark.parametrize("how", ["cancel", "close"])
def test_a_consumer_that_leaves_cancels_the_inner_stream_where_it_waits(how):
    log: list[str] = []

    async def run() -> None:
        stream = frame_stream(produce([[b"a"]] * 1000, log))
        first = await stream.__anext__()
        assert unframe(first.SerializeToString()) == [b"a"]
        if how == "close":
            await stream.aclose()
            return
        pending = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending

    asyncio.run(run())
    assert log == ["cancelled inside", "closed"]


def test_a_cut_item_is_refused():
    whole = asyncio.run(collect(frame_stream(produce([[b"abc", b"de"]]))))[0].SerializeToString()
    assert unframe(whole) == [b"abc", b"de"]
    with pytest.raises(ValueError, match="cut short"):
        unframe(whole[:-1])


def test_the_ingress_s_streaming_rpcs_are_framed_and_keep_the_signature_serve_reads():
    import inspect

    from patchscope.serve.ingress import Explainer
    from patchscope.serve.rpc import STREAMING
    from patchscope.serve.servicer import Servicer

    for name in STREAMING:
        method = getattr(Explainer, name)
        assert method is not getattr(Servicer, name) and method.__name__ == name
        assert inspect.isasyncgenfunction(method)
        assert "grpc_context" in inspect.signature(method).parameters
