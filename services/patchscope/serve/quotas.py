"""Per-key quotas counted in one place for every ingress replica: a named, restartable Ray actor.

Each API key (the sha256 of its bearer token, never the token; "anonymous" when auth is off) may start at
most `requests_per_minute` calls in any 60-second window and hold at most `concurrent_streams` calls at
once. Over either, the call is refused with RESOURCE_EXHAUSTED and the seconds to wait.

A concurrent call holds a *lease* that expires unless its ingress renews it, so a slot whose holder is
gone (a replica that died mid-stream, a forced shutdown, a cancel that landed during `acquire`, a release
that was lost) comes back within `LEASE_S` by itself. The keeper restarts when it dies (`max_restarts`);
an ingress that finds it restarted hands it its live leases and its limits again, and one that cannot
reach it refuses calls (fails closed, UNAVAILABLE) until it can.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict, deque

import ray

from patchscope.engine.errors import PatchscopeError

ACTOR_NAME = "patchscope-quotas"
NAMESPACE = "serve"
WINDOW_S = 60.0
LEASE_S = 30.0  # a slot not renewed for this long is reclaimed
RENEW_S = 5.0  # how often an ingress renews the leases it holds
CALL_TIMEOUT_S = 5.0  # longer than this and the keeper counts as unreachable
STARTUP_S = 120.0  # a new keeper's process starts in seconds, more on a busy machine

logger = logging.getLogger("patchscope.serve")


class QuotaExceeded(PatchscopeError):
    """A key is over its request rate or concurrent-stream quota (RESOURCE_EXHAUSTED)."""


class QuotaUnavailable(PatchscopeError):
    """The quota keeper cannot be reached: calls are refused, not let through (UNAVAILABLE)."""


class Quotas:
    """The counting itself (plain Python, so it is tested without Ray)."""

    def __init__(
        self,
        requests_per_minute: int,
        concurrent_streams: int,
        lease_s: float = LEASE_S,
        clock=time.monotonic,
    ) -> None:
        self.rpm, self.streams, self.lease_s, self.clock = (
            requests_per_minute,
            concurrent_streams,
            lease_s,
            clock,
        )
        self._starts: dict[str, deque[float]] = defaultdict(deque)
        self._leases: dict[str, dict[str, float]] = defaultdict(dict)  # key -> lease id -> expiry
        self.incarnation = uuid.uuid4().hex  # a restarted keeper has another

    def _open(self, key: str, now: float) -> dict[str, float]:
        leases = self._leases[key]
        for lease, expiry in list(leases.items()):
            if expiry <= now:
                del leases[lease]
        return leases

    def acquire(self, key: str, lease: str = "") -> str | None:
        """None when the call may start (counted, holding `lease`), else why not and when to retry."""
        now = self.clock()
        starts = self._starts[key]
        while starts and now - starts[0] >= WINDOW_S:
            starts.popleft()
        if self.rpm and len(starts) >= self.rpm:
            wait = WINDOW_S - (now - starts[0])
            return f"quota: at most {self.rpm} requests per minute for this key; retry in {wait:.0f} s"
        leases = self._open(key, now)
        if self.streams and len(leases) >= self.streams:
            return f"quota: at most {self.streams} concurrent calls for this key; retry when one of them ends"
        starts.append(now)
        leases[lease or uuid.uuid4().hex] = now + self.lease_s
        return None

    def acquire_lease(self, key: str, lease: str) -> tuple[str | None, str]:
        """`acquire`, and this keeper's incarnation (one call per RPC)."""
        return self.acquire(key, lease), self.incarnation

    def release(self, key: str, lease: str = "") -> None:
        """Ends `lease` (any one of the key's when not named); unknown or expired leases are ignored."""
        leases = self._leases[key]
        if lease:
            leases.pop(lease, None)
        elif leases:
            leases.pop(next(iter(leases)))

    def renew(self, leases: dict[str, str]) -> str:
        """Extends `leases` (lease id -> key), restoring any this keeper does not know; its incarnation."""
        expiry = self.clock() + self.lease_s
        for lease, key in leases.items():
            self._leases[key][lease] = expiry
        return self.incarnation

    def configure(self, requests_per_minute: int, concurrent_streams: int) -> str:
        """A (re)deploy with new limits applies them to the running keeper; its incarnation."""
        self.rpm, self.streams = requests_per_minute, concurrent_streams
        return self.incarnation

    def held(self, key: str) -> int:
        """Leases of `key` not yet expired (tests and operators)."""
        return len(self._open(key, self.clock()))


@ray.remote(num_cpus=0, max_concurrency=1)
class QuotaKeeper(Quotas):
    """The named actor every ingress replica asks (`get_if_exists`, so all replicas share one)."""


def keeper(requests_per_minute: int, concurrent_streams: int):
    """The shared keeper, created when there is none (or the last one died for good)."""
    return QuotaKeeper.options(
        name=ACTOR_NAME,
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        max_restarts=-1,  # restarted with its first arguments; each ingress re-applies its own limits
        max_task_retries=0,  # a call lost in a restart is refused (fail closed), never applied twice
    ).remote(requests_per_minute, concurrent_streams)


class QuotaClient:
    """One ingress replica's side: acquire and release leases, renew the live ones, survive restarts.

    `acquire` returns a lease (the key and its id) for `release`, or raises `QuotaExceeded`, or
    `QuotaUnavailable` when the keeper cannot be reached within `CALL_TIMEOUT_S`.
    """

    def __init__(self, requests_per_minute: int, concurrent_streams: int, connect=keeper) -> None:
        self.limits = (requests_per_minute, concurrent_streams)
        self._connect = connect
        self._handle = None
        self._incarnation: str | None = None
        self._live: dict[str, str] = {}  # lease id -> key, renewed until released
        self._renewer: asyncio.Task | None = None
        if connect is keeper:  # on a replica: up and given this deploy's limits before the first call
            self._handle = keeper(*self.limits)
            self._incarnation = ray.get(self._handle.configure.remote(*self.limits), timeout=STARTUP_S)

    async def _call(self, method: str, *args):
        if self._handle is None:
            self._handle = await asyncio.to_thread(self._connect, *self.limits)
        ref = getattr(self._handle, method).remote(*args)
        try:
            return await asyncio.wait_for(asyncio.ensure_future(ref), CALL_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError) as error:
            # Dead for good, restarting, or too slow: fetch (or recreate) the keeper on the next call.
            if isinstance(error, ray.exceptions.ActorDiedError):
                self._handle = None
            raise QuotaUnavailable(
                f"quota keeper unreachable ({type(error).__name__}); calls are refused until it answers, "
                "retry shortly"
            ) from None

    async def _sync(self, incarnation: str) -> None:
        """A keeper seen for the first time (new, or restarted): give it our limits and live leases."""
        if incarnation != self._incarnation:
            self._incarnation = await self._call("configure", *self.limits)
            await self._call("renew", dict(self._live))

    async def acquire(self, key: str) -> tuple[str, str]:
        self._start_renewing()
        lease = uuid.uuid4().hex
        self._live[lease] = key  # before the call: a cancel during it still releases the lease
        try:
            reason, incarnation = await self._call("acquire_lease", key, lease)
            await self._sync(incarnation)
        except BaseException:
            self.release((key, lease))
            raise
        if reason is not None:
            self._live.pop(lease, None)
            raise QuotaExceeded(reason)
        return key, lease

    def release(self, lease: tuple[str, str]) -> None:
        """Fire and forget: a release that is lost only leaves a lease that expires unrenewed."""
        key, lease_id = lease
        self._live.pop(lease_id, None)
        if self._handle is not None:
            try:
                self._handle.release.remote(key, lease_id)
            except Exception:  # the lease expires on its own
                logger.info("quota release not sent; the lease expires in %.0f s", LEASE_S)

    def _start_renewing(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(RENEW_S)
            if not self._live:
                continue
            try:
                await self._sync(await self._call("renew", dict(self._live)))
            except QuotaUnavailable as error:
                logger.warning("%s", error)
