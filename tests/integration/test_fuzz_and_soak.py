"""Fuzzing every RPC's fields and payloads through the real proxy, and a soak of 500 Explain calls.

Bounded in time and loopback only. Fuzzed requests may only get documented status codes, no replica may
crash, and a normal request must succeed after each batch of cases.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import struct
import threading
import time

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from ray import serve

from patchscope.serve.local import APP_NAME
from patchscope.wire import encode_tensor, pb
from tests.integration.test_service import collect, explain_request

pytestmark = pytest.mark.ray

DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
CASES: dict[str, int] = {}
# A random seed per run, printed (PATCHSCOPE_FUZZ_SEED=N replays it); PATCHSCOPE_FUZZ_CASES=1000 for the
# issue's 1,000 cases per RPC (the default keeps `make test` short on a 2-core machine).
SEED = int(os.environ.get("PATCHSCOPE_FUZZ_SEED") or random.randrange(2**32))
EXAMPLES = int(os.environ.get("PATCHSCOPE_FUZZ_CASES", "150"))
print(f"fuzz seed {SEED} (replay: PATCHSCOPE_FUZZ_SEED={SEED})")
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)

ids = st.sampled_from(["tiny-llama", "tiny-qwen2", "", "nope", "../etc/passwd", "tiny-llama\x00"])
ints = st.lists(st.integers(-(2**31), 2**31 - 1) | st.integers(-6, 6), max_size=5)
text = st.text(max_size=60) | st.sampled_from(
    ["", " ", "a" * 9000, "{}", "x {} y {}", "\udcff".encode(errors="surrogatepass").decode(errors="replace")]
)
new_tokens = st.integers(0, 4) | st.integers(501, 2**31 - 1) | st.integers(-(2**31), -1)


def spec():
    return st.builds(
        pb.TargetSpec,
        model=ids,
        preset=st.sampled_from(["", "identity", "logit-lens", "description", "poetry"]),
        template=text,
        layers=ints,
        mapping=st.sampled_from(["", "auto", "nope", "tiny-llama.tiny-qwen2.1-1.affine"]),
        generation=st.builds(
            pb.GenerationOptions,
            max_new_tokens=new_tokens,
            temperature=st.floats(allow_nan=True, allow_infinity=True, width=64) | st.just(0.0),
            top_p=st.floats(allow_nan=True, allow_infinity=True) | st.just(1.0),
        ),
        top_k=st.integers(-5, 500),
    )


def payloads():
    header = st.builds(
        lambda dtype, shape, offsets: json.dumps(
            {"states": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}
        ),
        st.sampled_from(["F32", "BF16", "F16", "I64", "F64", "", 7]),
        st.lists(st.integers(-2, 2**40), max_size=3),
        st.lists(st.integers(-2, 2**40), max_size=3),
    ).map(lambda h: struct.pack("<Q", len(h)) + h.encode() + bytes(64))
    # Mostly files that decode, so the code after the decoder (shapes against the model, provenance,
    # planning) is what gets fuzzed; some with the wrong width, dtype or values.
    decodable = st.builds(
        lambda rows, width, dtype, scale: encode_tensor(torch.randn(rows, width) * scale, dtype),
        st.integers(1, 70),
        st.sampled_from([64, 64, 64, 32, 1]),
        st.sampled_from([pb.D_TYPE_F32, pb.D_TYPE_BF16, pb.D_TYPE_F16]),
        st.sampled_from([1.0, 1e-30, 1e5, float("inf")]),
    )
    return decodable | decodable | decodable | st.binary(max_size=300) | header


def call(stub, method: str, request) -> grpc.StatusCode:
    CASES[method] = CASES.get(method, 0) + 1
    try:
        list(getattr(stub, method)(request, timeout=60))
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


@FUZZ
@seed(SEED)
@given(source=ids, prompt=text, layers=ints, positions=ints, target=spec())
def test_fuzzed_explain_gets_only_documented_codes(stub, source, prompt, layers, positions, target):
    request = pb.ExplainRequest(
        source=source, prompt=prompt, layers=layers, positions=positions, target=target
    )
    assert call(stub, "Explain", request) in DOCUMENTED


@FUZZ
@seed(SEED)
@given(
    source=ids, data=payloads(), layers=ints, positions=ints, fingerprint=st.text(max_size=70), target=spec()
)
def test_fuzzed_activations_get_only_documented_codes(
    stub, source, data, layers, positions, fingerprint, target
):
    request = pb.ExplainActivationsRequest(
        source=source,
        safetensors=data,
        provenance=pb.Provenance(layers=layers, positions=positions, fingerprint=fingerprint),
        target=target,
    )
    assert call(stub, "ExplainActivations", request) in DOCUMENTED


@FUZZ
@seed(SEED)
@given(model=ids, prompt=text, layers=ints, positions=ints, dtype=st.integers(-3, 9))
def test_fuzzed_extraction_gets_only_documented_codes(stub, model, prompt, layers, positions, dtype):
    request = pb.ExtractHiddenStatesRequest(
        model=model, prompt=prompt, layers=layers, positions=positions, dtype=dtype
    )
    assert call(stub, "ExtractHiddenStates", request) in DOCUMENTED


def test_after_fuzzing_the_service_still_answers(stub):
    assert collect(stub.Explain(explain_request(layers=[1], positions=[-1], max_new_tokens=2), timeout=60))
    print(f"fuzz cases sent: {CASES}, seed {SEED}")
    assert all(n >= EXAMPLES for n in CASES.values()) and len(CASES) == 3, CASES


def replica_rss() -> dict[str, int]:
    return {
        name: serve.get_deployment_handle(name, app_name=APP_NAME)
        .stats.remote()
        .result(timeout_s=30)["rss_bytes"]
        for name in ("SourceModel", "TargetModel", "Explainer")
    }


def test_soak_500_explains_from_8_clients(stub, tiny_service):
    prompts = [
        "The river runs past the old mill",
        "milk and bread",
        "Paris is the capital",
        "a small red car",
    ]
    for p in prompts:  # warm-up
        collect(stub.Explain(explain_request(p, layers=[1, 2], positions=[-1], max_new_tokens=4), timeout=60))
    warm = replica_rss()
    processes_warm = tiny_service.process_memory()
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for r in range(500 // 8 + (1 if k < 500 % 8 else 0)):
            started = time.perf_counter()
            try:
                finished = collect(
                    stub.Explain(
                        explain_request(
                            prompts[(k + r) % 4], layers=[1, 2], positions=[-1], max_new_tokens=4
                        ),
                        timeout=60,
                    )
                )
                assert len(finished) == 2
            except (grpc.RpcError, AssertionError) as error:
                with lock:
                    failures.append(repr(error)[:200])
            with lock:
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    end = replica_rss()
    processes_end = tiny_service.process_memory()
    latencies.sort()
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * (len(latencies) - 1))]
    growth = {name: end[name] / warm[name] - 1 for name in warm}
    print(
        f"soak: {len(latencies)} Explains in {elapsed:.1f} s, {len(failures)} failures, "
        f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, replica memory growth "
        + ", ".join(f"{n} {g * 100:+.1f}%" for n, g in growth.items())
    )
    print("memory of every Ray process (after warm-up -> after the soak):")
    for name in sorted(set(processes_warm) | set(processes_end)):
        a, b = processes_warm.get(name, 0), processes_end.get(name, 0)
        print(f"  {name[:60]:60s} {a >> 20:6d} MiB -> {b >> 20:6d} MiB")
    assert len(latencies) == 500 and not failures, failures[:3]
    assert all(g <= 0.10 for g in growth.values()), growth
