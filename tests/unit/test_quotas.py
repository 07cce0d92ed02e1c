"""Per-key quotas: a sliding minute of starts and a count of open calls, per key."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import ray.exceptions

from patchscope.serve.quotas import QuotaClient, QuotaExceeded, Quotas, QuotaUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_slide_with_the_window():
    clock = Clock()
    quotas = Quotas(requests_per_minute=3, concurrent_streams=0, clock=clock)
    for _ in range(3):
        assert quotas.acquire("a") is None
        quotas.release("a")
    refused = quotas.acquire("a")
    assert refused is not None and "3 requests per minute" in refused and "retry in 60 s" in refused
    assert quotas.acquire("b") is None, "keys are counted apart"
    clock.now += 59.0
    assert quotas.acquire("a") is not None
    clock.now += 1.0
    assert quotas.acquire("a") is None


def test_concurrent_calls_are_bounded_until_one_ends():
    quotas = Quotas(requests_per_minute=0, concurrent_streams=2)
    assert quotas.acquire("a") is None and quotas.acquire("a") is None
    assert "2 concurrent calls" in quotas.acquire("a")
    quotas.release("a")
    assert quotas.acquire("a") is None


def test_a_refused_call_is_not_counted():
    quotas = Quotas(requests_per_minute=1, concurrent_streams=1)
    assert quotas.acquire("a") is None
    assert quotas.acquire("a") is not None
    quotas.release("a")
    quotas.configure(requests_per_minute=5, concurrent_streams=1)
    assert quotas.acquire("a") is None


def test_a_lease_not_renewed_is_reclaimed_and_a_renewed_one_is_kept():
    """A slot whose holder died (no release, no renewal) comes back within the lease time."""
    clock = Clock()
    quotas = Quotas(requests_per_minute=0, concurrent_streams=1, lease_s=30, clock=clock)
    assert quotas.acquire("a", "gone") is None
    assert quotas.acquire("a", "next") is not None
    clock.now += 29.0
    assert quotas.acquire("a", "next") is not None and quotas.held("a") == 1
    clock.now += 1.0
    assert quotas.held("a") == 0 and quotas.acquire("a", "next") is None
    for _ in range(5):  # a long stream renews its lease and keeps its slot
        clock.now += 20.0
        quotas.renew({"next": "a"})
    assert quotas.acquire("a", "other") is not None


def test_a_release_names_its_lease_and_an_unknown_one_is_ignored():
    quotas = Quotas(requests_per_minute=0, concurrent_streams=2)
    assert quotas.acquire("a", "x") is None and quotas.acquire("a", "y") is None
    quotas.release("a", "x")
    quotas.release("a", "x")  # a release sent twice does not free another call's slot
    quotas.release("a", "never")
    assert quotas.held("a") == 1


def test_a_restarted_keeper_gets_the_live_leases_back():
    old, new = Quotas(0, 1), Quotas(0, 1)
    assert old.acquire("a", "x") is None
    assert new.incarnation != old.incarnation
    new.renew({"x": "a"})
    assert new.held("a") == 1 and new.acquire("a", "y") is not None


class FakeKeeper:
    """A keeper's handle: each method's `.remote` runs the plain `Quotas`, or fails like a dead actor."""

    def __init__(self, quotas: Quotas, latency_s: float = 0.0) -> None:
        self.quotas, self.down, self.calls, self.latency_s = quotas, False, [], latency_s

    def __getattr__(self, name):
        keeper = self

        class Method:
            @staticmethod
            def remote(*args):
                """Runs at once, as an actor runs a call whoever waits for it; answers a loop turn later."""
                keeper.calls.append(name)
                future = asyncio.get_running_loop().create_future()
                if keeper.down:
                    outcome = (future.set_exception, ray.exceptions.ActorDiedError())
                else:
                    outcome = (future.set_result, getattr(keeper.quotas, name)(*args))
                asyncio.get_running_loop().call_later(keeper.latency_s, *outcome)
                return future

        return Method


def test_the_client_fails_closed_while_the_keeper_is_unreachable_and_recovers_by_itself():
    first = FakeKeeper(Quotas(0, 1))
    handles = [first]
    client = QuotaClient(requests_per_minute=5, concurrent_streams=1, connect=lambda *_: handles[-1])

    async def scenario():
        lease = await client.acquire("a")
        assert first.quotas.rpm == 5, "the client's limits are applied to the keeper it first sees"
        with pytest.raises(QuotaExceeded):
            await client.acquire("a")
        first.down = True
        with pytest.raises(QuotaUnavailable, match="quota keeper unreachable"):
            await client.acquire("b")
        replacement = FakeKeeper(Quotas(0, 0))  # what `get_if_exists` creates once the old one died
        handles.append(replacement)
        await client.acquire("b")
        assert replacement.quotas.rpm == 5 and replacement.quotas.streams == 1, "limits re-applied"
        assert replacement.quotas.held("a") == 1, "the live lease of 'a' was handed to the new keeper"
        client.release(lease)
        await asyncio.sleep(0)
        assert replacement.quotas.held("a") == 0

    asyncio.run(scenario())


def test_a_call_cancelled_during_acquire_releases_its_lease():
    keeper = FakeKeeper(Quotas(0, 1), latency_s=0.05)
    client = QuotaClient(0, 1, connect=lambda *_: keeper)

    async def scenario():
        await client.acquire("warm")  # the keeper is known; the next call waits only for acquire
        task = asyncio.ensure_future(client.acquire("a"))
        await asyncio.sleep(0.01)  # the keeper has counted the call; its answer is on the way
        assert keeper.quotas.held("a") == 1
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert keeper.quotas.held("a") == 0 and not any(k == "a" for k in client._live.values())

    asyncio.run(scenario())
