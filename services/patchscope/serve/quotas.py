"""Per-key quotas counted in one place for every ingress replica: a named Ray actor.

Each API key (the sha256 of its bearer token, never the token; "anonymous" when auth is off) may start at
most `requests_per_minute` calls in any 60-second window and hold at most `concurrent_streams` calls at
once. Over either, the call is refused with RESOURCE_EXHAUSTED and the seconds to wait.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict, deque

import ray

from patchscope.engine.errors import PatchscopeError

ACTOR_NAME = "patchscope-quotas"
WINDOW_S = 60.0


class QuotaExceeded(PatchscopeError):
    """A key is over its request rate or concurrent-stream quota (RESOURCE_EXHAUSTED)."""


class Quotas:
    """The counting itself (plain Python, so it is tested without Ray)."""

    def __init__(self, requests_per_minute: int, concurrent_streams: int, clock=time.monotonic) -> None:
        self.rpm, self.streams, self.clock = requests_per_minute, concurrent_streams, clock
        self._starts: dict[str, deque[float]] = defaultdict(deque)
        self._open: Counter[str] = Counter()

    def acquire(self, key: str) -> str | None:
        """None when the call may start (and it is counted), else why not and when to retry."""
        now = self.clock()
        starts = self._starts[key]
        while starts and now - starts[0] >= WINDOW_S:
            starts.popleft()
        if self.rpm and len(starts) >= self.rpm:
            wait = WINDOW_S - (now - starts[0])
            return f"quota: at most {self.rpm} requests per minute for this key; retry in {wait:.0f} s"
        if self.streams and self._open[key] >= self.streams:
            return f"quota: at most {self.streams} concurrent calls for this key; retry when one of them ends"
        starts.append(now)
        self._open[key] += 1
        return None

    def release(self, key: str) -> None:
        self._open[key] = max(0, self._open[key] - 1)

    def configure(self, requests_per_minute: int, concurrent_streams: int) -> None:
        """A redeploy with new limits applies them to the running actor."""
        self.rpm, self.streams = requests_per_minute, concurrent_streams


@ray.remote(num_cpus=0, max_concurrency=1)
class QuotaKeeper(Quotas):
    """The named actor every ingress replica asks (`get_if_exists`, so all replicas share one)."""


def keeper(requests_per_minute: int, concurrent_streams: int):
    return QuotaKeeper.options(
        name=ACTOR_NAME, namespace="serve", get_if_exists=True, lifetime="detached"
    ).remote(requests_per_minute, concurrent_streams)
