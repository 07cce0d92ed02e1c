"""Every process in a call's path killed in the middle of two streams, with auth and quotas on.

TargetModel, SourceModel, the Explainer (the ingress replica) and Serve's gRPC proxy: the streams in flight
are told UNAVAILABLE, Serve replaces what died, nothing is left held (the key's concurrent-stream leases in
the quota keeper, rows in TargetModel's queue) and a normal request is served again, within bounds measured
and printed here. The keeper itself is killed in test_auth_and_quotas.py.

The session's service is redeployed once with tokens and quotas for the whole module; conftest.py runs
this module after every other one that calls the service (test_logs.py only reads the logs), so it is not
redeployed back unless a later test needs the plain service.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import time

import grpc
import pytest
import ray
from ray import serve

from patchscope.serve.local import APP_NAME
from patchscope.serve.quotas import ACTOR_NAME, LEASE_S, NAMESPACE, RENEW_S
from patchscope.wire import pb
from tests.integration.test_service import collect, explain_request

pytestmark = pytest.mark.ray
TOKEN = "faults-secret-0123456789"
KEY = "key-" + hashlib.sha256(TOKEN.encode()).hexdigest()[:12]  # how the ingress names a key
AUTH = [("authorization", f"Bearer {TOKEN}")]
STREAMS = 2  # long streams of the key in flight at each kill
QUOTA = STREAMS + 1  # the key's concurrent-stream quota: the streams and one probe
RECOVERY_S = 120  # sane bounds only; the measured figures are printed
RELEASE_S = LEASE_S + RENEW_S + 15  # a lease whose holder died expires unrenewed


def answers(stub, metadata=()) -> grpc.StatusCode:
    try:
        stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=list(metadata))
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


def later_tests_call_the_service(request) -> bool:
    items = request.session.items
    mine = [i for i, item in enumerate(items) if item.module is request.module]
    return any({"stub", "channel"} & set(item.fixturenames) for item in items[mine[-1] + 1 :])


@pytest.fixture(scope="module")
def guarded(tiny_service, stub, tmp_path_factory, request):
    tokens = tmp_path_factory.mktemp("faults") / "tokens"
    tokens.write_text(TOKEN + "\n")
    original = copy.deepcopy(tiny_service.config)
    config = copy.deepcopy(original)
    args = config["applications"][0]["args"]
    args["auth"] = {"required": True, "tokens_file": str(tokens)}
    args["quotas"] = {"requests_per_minute": 100_000, "concurrent_streams": QUOTA}
    started = time.monotonic()
    tiny_service.redeploy(config, ready=lambda: answers(stub) == grpc.StatusCode.UNAUTHENTICATED)
    print(f"redeployed with tokens and quotas in {time.monotonic() - started:.1f} s")
    yield stub
    if later_tests_call_the_service(request):
        tiny_service.redeploy(original, ready=lambda: answers(stub) == grpc.StatusCode.OK)


def named_actors(prefix: str, part: str = "") -> list:
    return [
        ray.get_actor(a["name"], namespace=a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix) and part in a["name"]
    ]


def replica_actors(deployment: str) -> list:
    return named_actors("SERVE_REPLICA", f"{APP_NAME}#{deployment}#")


def held_leases() -> int:
    return ray.get(ray.get_actor(ACTOR_NAME, namespace=NAMESPACE).held.remote(KEY), timeout=30)


def queued_rows() -> int:
    handle = serve.get_deployment_handle("TargetModel", app_name=APP_NAME)
    return handle.stats.remote().result(timeout_s=30)["queued_rows"]


def small_explain(stub) -> dict:
    request = explain_request(layers=[1], positions=[-1], max_new_tokens=2)
    return collect(stub.Explain(request, timeout=30, metadata=AUTH))


def succeeds_again(stub, since: float) -> float:
    """Seconds from `since` until a normal Explain succeeds again."""
    while True:
        try:
            assert small_explain(stub)
            return time.monotonic() - since
        except grpc.RpcError as error:
            if time.monotonic() - since > RECOVERY_S:
                raise AssertionError(f"no success {RECOVERY_S} s after the kill: {error.code()}") from error
            time.sleep(0.5)


def drained(probe, since: float, bound: float, what: str) -> float:
    """Seconds from `since` until `probe()` is 0; fails after `bound`."""
    while True:
        try:
            value = probe()
        except Exception as error:  # a replica still restarting: ask again
            value = repr(error)[:80]
        if value == 0:
            return time.monotonic() - since
        assert time.monotonic() - since < bound, f"{what} still {value} {bound:.0f} s after the kill"
        time.sleep(0.5)


class Streams:
    """`STREAMS` long Explains of one key, in threads; `outcomes` once they end."""

    def __init__(self, stub) -> None:
        drained(held_leases, time.monotonic(), RELEASE_S, "leases of an earlier test")
        self.outcomes: dict[int, object] = {}
        self.first_token = [threading.Event() for _ in range(STREAMS)]
        self.threads = [threading.Thread(target=self._stream, args=(stub, k)) for k in range(STREAMS)]
        for t in self.threads:
            t.start()

    def _stream(self, stub, k: int) -> None:
        request = explain_request(layers=[0, 1, 2, 3], positions=[1, -1], max_new_tokens=200)
        try:
            for event in stub.Explain(request, timeout=120, metadata=AUTH):
                if event.WhichOneof("event") == "token":
                    self.first_token[k].set()
            self.outcomes[k] = "completed"
        except grpc.RpcError as error:
            self.outcomes[k] = (error.code(), error.details())
        finally:
            self.first_token[k].set()

    def generating(self) -> None:
        for event in self.first_token:
            assert event.wait(60), "no token within 60 s"
        assert not self.outcomes, self.outcomes
        assert held_leases() == STREAMS

    def join(self) -> dict[int, object]:
        for t in self.threads:
            t.join(150)
        assert len(self.outcomes) == STREAMS, "a stream was left hanging"
        return self.outcomes


def full_quota_served(stub) -> bool:
    results: list[object] = []

    def one() -> None:
        try:
            results.append(bool(small_explain(stub)))
        except grpc.RpcError as error:
            results.append(error.code())

    threads = [threading.Thread(target=one) for _ in range(QUOTA)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [True] * QUOTA, results
    return True


def check_told_and_nothing_left(stub, streams: Streams, killed: float, what: str) -> None:
    outcomes = streams.join()
    told = time.monotonic() - killed
    codes = {outcome[0] if isinstance(outcome, tuple) else outcome for outcome in outcomes.values()}
    assert codes == {grpc.StatusCode.UNAVAILABLE}, outcomes
    recovered = succeeds_again(stub, killed)
    rows = drained(queued_rows, killed, RECOVERY_S, "TargetModel's queued rows")
    slots = drained(held_leases, killed, RELEASE_S, "the key's leases")
    # Every slot is free again: the key's full quota of concurrent calls is served.
    assert full_quota_served(stub)
    print(
        f"{what} killed mid-stream: both streams UNAVAILABLE after {told:.1f} s; normal requests served "
        f"again {recovered:.1f} s after the kill; TargetModel's queue empty after {rows:.1f} s, the key's "
        f"leases free after {slots:.1f} s (each checked once the one before holds)"
    )


@pytest.mark.parametrize("deployment", ["TargetModel", "SourceModel", "Explainer"])
def test_a_replica_killed_mid_stream_is_reported_replaced_and_leaves_nothing_held(guarded, deployment):
    (actor,) = replica_actors(deployment)
    if deployment == "SourceModel":
        # The source works for milliseconds per request: killed while the streams generate, the next
        # request is told at once (UNAVAILABLE, never a hang or another code) and the streams finish.
        streams = Streams(guarded)
        streams.generating()
        ray.kill(actor, no_restart=True)
        killed = time.monotonic()
        try:
            small_explain(guarded)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert set(streams.join().values()) == {"completed"}, streams.outcomes
        recovered = succeeds_again(guarded, killed)
        slots = drained(held_leases, killed, RELEASE_S, "the key's leases")
        print(
            f"SourceModel killed: normal requests served again {recovered:.1f} s after; "
            f"leases free after {slots:.1f} s"
        )
    else:
        streams = Streams(guarded)
        streams.generating()
        ray.kill(actor, no_restart=True)
        check_told_and_nothing_left(guarded, streams, time.monotonic(), deployment)
    assert replica_actors(deployment), f"Serve did not start a new {deployment} replica"


def test_the_grpc_proxy_killed_mid_stream_is_reported_replaced_and_leaves_nothing_held(guarded):
    (proxy,) = named_actors("SERVE_PROXY_ACTOR")
    streams = Streams(guarded)
    streams.generating()
    ray.kill(proxy, no_restart=True)
    check_told_and_nothing_left(guarded, streams, time.monotonic(), "Serve's gRPC proxy")
    assert named_actors("SERVE_PROXY_ACTOR"), "Serve did not start a new proxy"
