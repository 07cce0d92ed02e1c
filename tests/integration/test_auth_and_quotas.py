"""Authentication and per-key quotas end to end: the session's service redeployed with tokens and quotas,
then restored."""

from __future__ import annotations

import copy
import threading
import time

import grpc
import pytest
import ray

from patchscope.serve.quotas import ACTOR_NAME, NAMESPACE
from patchscope.wire import pb
from tests.integration.test_service import collect, explain_request

pytestmark = pytest.mark.ray
TOKENS = ["alpha-secret-1", "beta-secret-2"]
LIMITED = "gamma-secret-3 ListModels,ExplainActivations"
PROBE = "delta-secret-4"  # asks while the keeper is away, apart from the keys whose minute is spent


def answers(stub, metadata=()) -> grpc.StatusCode:
    try:
        stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=list(metadata))
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


@pytest.fixture(scope="module")
def secured(tiny_service, stub, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text("\n".join([*TOKENS, LIMITED, PROBE]) + "\n")
    original = copy.deepcopy(tiny_service.config)
    config = copy.deepcopy(original)
    args = config["applications"][0]["args"]
    args["auth"] = {"required": True, "tokens_file": str(tokens)}
    args["quotas"] = {"requests_per_minute": 12, "concurrent_streams": 1}
    tiny_service.redeploy(config, ready=lambda: answers(stub) == grpc.StatusCode.UNAUTHENTICATED)
    yield stub
    tiny_service.redeploy(original, ready=lambda: answers(stub) == grpc.StatusCode.OK)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_only_callers_with_a_configured_token_get_in(secured):
    assert answers(secured) == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as error:
        secured.ListModels(pb.ListModelsRequest(), timeout=10, metadata=bearer("alpha-secret-0"))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "alpha" not in error.value.details() and "secret" not in error.value.details()
    assert answers(secured, [("authorization", "alpha-secret-1")]) == grpc.StatusCode.UNAUTHENTICATED
    assert answers(secured, bearer("beta-secret-2")) == grpc.StatusCode.OK
    with pytest.raises(grpc.RpcError) as error:  # streaming methods too
        list(secured.Explain(explain_request(layers=[1], positions=[-1]), timeout=30))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert answers(secured, bearer("gamma-secret-3")) == grpc.StatusCode.OK
    with pytest.raises(grpc.RpcError) as error:  # a key limited to other methods
        list(
            secured.Explain(
                explain_request(layers=[1], positions=[-1]), timeout=30, metadata=bearer("gamma-secret-3")
            )
        )
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_quotas_limit_concurrent_streams_and_rate_per_key(secured):
    started, outcome = threading.Event(), {}

    def long_stream() -> None:
        try:
            for _event in secured.Explain(
                explain_request(layers=[0, 1, 2, 3], positions=[1, -1], max_new_tokens=300),
                timeout=60,
                metadata=bearer(TOKENS[0]),
            ):
                started.set()
            outcome["long"] = "ok"
        except grpc.RpcError as error:
            outcome["long"] = error.code()
        finally:
            started.set()

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert started.wait(60)
    with pytest.raises(grpc.RpcError) as error:  # a second concurrent call of the same key
        list(
            secured.Explain(
                explain_request(layers=[1], positions=[-1]), timeout=30, metadata=bearer(TOKENS[0])
            )
        )
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "concurrent" in error.value.details()
    assert collect(
        secured.Explain(
            explain_request(layers=[1], positions=[-1], max_new_tokens=2),
            timeout=60,
            metadata=bearer(TOKENS[1]),
        )
    ), "another key is not affected"
    thread.join(90)
    assert outcome["long"] == "ok"

    codes = [answers(secured, bearer(TOKENS[1])) for _ in range(12)]
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, "12 requests per minute must run out"
    with pytest.raises(grpc.RpcError) as error:
        secured.ListModels(pb.ListModelsRequest(), timeout=10, metadata=bearer(TOKENS[1]))
    assert "requests per minute" in error.value.details() and "retry in" in error.value.details()


def keeper_actor():
    return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)


@pytest.mark.parametrize("restart", [True, False], ids=["restarted", "killed-for-good"])
def test_a_lost_quota_keeper_fails_closed_and_recovers_by_itself(secured, restart):
    """Killed mid-stream: the stream finishes, calls meanwhile are UNAVAILABLE (never let through
    uncounted), and the service answers again within a bound measured here; the live lease survives."""
    started, outcome = threading.Event(), {}

    def long_stream() -> None:
        try:
            for _event in secured.Explain(
                explain_request(layers=[0, 1, 2, 3], positions=[1, -1], max_new_tokens=200),
                timeout=90,
                metadata=bearer(TOKENS[0]),
            ):
                started.set()
            outcome["long"] = "ok"
        except grpc.RpcError as error:
            outcome["long"] = error.code()
        finally:
            started.set()

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert started.wait(60)
    ray.kill(keeper_actor(), no_restart=not restart)
    killed = time.monotonic()
    codes = []
    while True:
        code = answers(secured, bearer(PROBE))
        codes.append(code)
        if code == grpc.StatusCode.OK:
            break
        assert code == grpc.StatusCode.UNAVAILABLE, code  # fails closed: never let through uncounted
        assert time.monotonic() - killed < 60, f"no recovery 60 s after the keeper died: {codes[-3:]}"
        time.sleep(0.2)
    recovered = time.monotonic() - killed
    thread.join(120)
    assert outcome["long"] == "ok", outcome
    print(f"quota keeper {'restarted' if restart else 'killed'}: answers again {recovered:.1f} s after")
