"""Per-key quotas: a sliding minute of starts and a count of open calls, per key."""

from __future__ import annotations

from patchscope.serve.quotas import Quotas


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
