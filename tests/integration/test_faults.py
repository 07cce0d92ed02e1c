"""Replicas killed in the middle of a stream: the caller is told (UNAVAILABLE), Serve restarts the replica,
and the next request succeeds. Runs last among the service tests that share the session's service."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import ray

from patchscope.serve.local import APP_NAME
from tests.integration.test_service import collect, explain_request

pytestmark = pytest.mark.ray


def replica_actors(deployment: str) -> list:
    names = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if f"#{deployment}#" in a["name"] and a["name"].startswith("SERVE_REPLICA") and APP_NAME in a["name"]
    ]
    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in names]


def succeeds_again(stub, timeout_s: float = 120) -> float:
    """Seconds until a normal Explain succeeds again."""
    started = time.monotonic()
    while True:
        try:
            assert collect(
                stub.Explain(explain_request(layers=[1], positions=[-1], max_new_tokens=2), timeout=30)
            )
            return time.monotonic() - started
        except grpc.RpcError as error:
            if time.monotonic() - started > timeout_s:
                raise AssertionError(f"no success {timeout_s} s after the kill: {error.code()}") from error
            time.sleep(0.5)


@pytest.mark.parametrize("deployment", ["TargetModel", "SourceModel"])
def test_a_replica_killed_mid_stream_is_reported_and_replaced(stub, deployment):
    (actor,) = replica_actors(deployment)
    outcomes: dict[int, object] = {}
    first_token = [threading.Event(), threading.Event()]

    def stream(k: int) -> None:
        try:
            for event in stub.Explain(
                explain_request(layers=[0, 1, 2, 3], positions=[1, -1], max_new_tokens=500), timeout=120
            ):
                if event.WhichOneof("event") == "token":
                    first_token[k].set()
            outcomes[k] = "completed"
        except grpc.RpcError as error:
            outcomes[k] = error.code()
        finally:
            first_token[k].set()

    if deployment == "TargetModel":  # two streams in flight on the replica that dies
        threads = [threading.Thread(target=stream, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for event in first_token:
            assert event.wait(60)
        ray.kill(actor, no_restart=True)
        for t in threads:
            t.join(120)
        assert set(outcomes.values()) == {grpc.StatusCode.UNAVAILABLE}, outcomes
    else:  # the source is busy only for milliseconds per request: kill it, then ask at once
        ray.kill(actor, no_restart=True)
        try:
            collect(stub.Explain(explain_request(layers=[1], positions=[-1], max_new_tokens=2), timeout=60))
        except grpc.RpcError as error:  # told at once, never left hanging or given another code
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    recovered = succeeds_again(stub)
    assert replica_actors(deployment), f"Serve did not start a new {deployment} replica"
    print(f"{deployment}: normal requests succeed again {recovered:.1f} s after the kill")
