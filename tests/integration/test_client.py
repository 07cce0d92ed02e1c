"""The light client against the real service (tiny models): every method, sync and async, retries,
deadlines, cancellation, the version handshake and capturing a model's activations in process."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import grpc
import numpy as np
import pytest

from patchscope.wire import pb
from patchscope_client import AsyncPatchscopeClient, CallError, Finished, IncompatibleServer, PatchscopeClient
from patchscope_client import client as client_module
from patchscope_client.capture import explain_model_activations, fingerprint
from patchscope_client.version import API_VERSION
from tests.integration.test_service import collect as collect_proto
from tests.integration.test_service import explain_request
from tests.integration.test_streams import target_stats

pytestmark = pytest.mark.ray
PROMPT = "The river runs past the old mill"


@pytest.fixture(scope="module")
def client(tiny_service):
    with PatchscopeClient(tiny_service.address, timeout=60) as c:
        yield c


def reference(stub, **kw) -> list[str]:
    finished = collect_proto(stub.Explain(explain_request(PROMPT, **kw), timeout=60))
    return [finished[i].finished.explanation for i in sorted(finished)]


def test_models_and_mappings(client):
    models = {m.id: m for m in client.models()}
    assert models["tiny-llama"].source and models["tiny-qwen2"].target and not models["tiny-qwen2"].source
    mappings = client.mappings(source="tiny-llama")
    assert {(m.source_layer, m.target_layer) for m in mappings} == {(1, 1), (2, 2), (3, 3)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_extract_returns_float32_arrays_widened_from_any_wire_dtype(client, stub, dtype):
    import safetensors.torch

    result = client.extract("tiny-llama", PROMPT, [0, 3], [1, -1], dtype=dtype)
    (raw,) = [
        m
        for m in stub.ExtractHiddenStates(
            pb.ExtractHiddenStatesRequest(model="tiny-llama", prompt=PROMPT, layers=[0], positions=[1, -1]),
            timeout=60,
        )
    ]
    exact = safetensors.torch.load(raw.safetensors)["states"].numpy()
    assert [layer.layer for layer in result.layers] == [0, 3]
    states = result.layers[0].states
    assert states.dtype == np.float32 and states.shape == (2, 64)
    tolerance = {"float32": 0, "bfloat16": 1e-2, "float16": 1e-3}[dtype]
    np.testing.assert_allclose(states, exact, rtol=tolerance, atol=tolerance)
    assert result.tokens[result.layers[0].positions[0]] == result.tokens[1]


def test_explain_streams_typed_events_and_collects_the_same_table(client, stub):
    events = list(
        client.explain("tiny-llama", PROMPT, [1, 2], target="tiny-llama", positions=[-1, 2], max_new_tokens=6)
    )
    finished = [e for e in events if isinstance(e, Finished)]
    assert [e.explanation for e in sorted(finished, key=lambda e: e.site.index)] == reference(
        stub, layers=[1, 2], positions=[-1, 2]
    )
    table = client.explain_table(
        "tiny-llama", PROMPT, [1, 2], target="tiny-llama", positions=[-1, 2], max_new_tokens=6
    )
    assert [r.explanation for r in table.rows] == [
        e.explanation for e in sorted(finished, key=lambda e: e.site.index)
    ]
    assert set(table.to_json()[0]) == {
        "source_layer",
        "target_layer",
        "position",
        "source_token",
        "explanation",
        "answer",
        "mapping_id",
        "mapping_r2",
        "unpatched_answer",
        "same_as_unpatched",
        "patch_effect",
        "dependence",
        "confidence",
        "mean_state_answer",
        "same_as_mean_state",
    }


def test_every_finished_site_carries_its_control_and_controls_false_removes_it(tiny_service, client, stub):
    kw = {"positions": [-1, 2], "max_new_tokens": 6}
    raw = collect_proto(stub.Explain(explain_request(PROMPT, layers=[1, 2], **kw), timeout=60))
    on = client.explain_table("tiny-llama", PROMPT, [1, 2], target="tiny-llama", **kw)
    assert len(on.rows) == 4
    for row in on.rows:
        c, wire = row.control, raw[row.site.index].finished.control
        assert c is not None, "a 1.1 server sends the control by default"
        assert (c.unpatched_explanation, c.unpatched_answer, c.same_as_unpatched) == (
            wire.unpatched_explanation,
            wire.unpatched_answer,
            wire.same_as_unpatched,
        )
        assert c.same_as_unpatched == (row.answer.lower() == c.unpatched_answer.lower())
        assert c.patch_effect is not None and 0.0 <= c.patch_effect <= 1.0
        assert c.dependence == pytest.approx(c.explanation_logprob - c.unpatched_logprob, abs=1e-6)
        assert c.confidence is None and c.calibrator_id == ""  # no calibrator registered here
    assert len({r.control.unpatched_explanation for r in on.rows}) == 1  # one control row for all sites
    assert on.to_json()[0]["unpatched_answer"] == on.rows[0].control.unpatched_answer

    off = client.explain_table("tiny-llama", PROMPT, [1, 2], target="tiny-llama", controls=False, **kw)
    assert [r.control for r in off.rows] == [None] * 4
    assert [r.explanation for r in off.rows] == [r.explanation for r in on.rows]
    assert {k: off.to_json()[0][k] for k in ("same_as_unpatched", "patch_effect")} == {
        "same_as_unpatched": None,
        "patch_effect": None,
    }

    async def aio_off():
        async with AsyncPatchscopeClient(tiny_service.address, timeout=60) as aclient:
            return await aclient.explain_table(
                "tiny-llama", PROMPT, [1, 2], target="tiny-llama", controls=False, **kw
            )

    assert [r.control for r in asyncio.run(aio_off()).rows] == [None] * 4


def test_the_mean_state_control_and_the_lens_control_reach_the_client(client):
    """Explain with mean_state_control: each site names its layer's mean-state answer; the logit lens's
    unpatched top-k travels on the wire (API 1.3)."""
    kw = {"positions": [-1, 2], "max_new_tokens": 6}
    table = client.explain_table(
        "tiny-llama", PROMPT, [1, 2], target="tiny-llama", mean_state_control=True, **kw
    )
    for row in table.rows:
        c = row.control
        assert isinstance(c.mean_state_explanation, str) and c.mean_state_answer is not None
        assert c.same_as_mean_state == (row.answer.lower() == c.mean_state_answer.lower())
    by_layer = {r.site.target_layer: r.control.mean_state_explanation for r in table.rows}
    assert all(r.control.mean_state_explanation == by_layer[r.site.target_layer] for r in table.rows)
    plain = client.explain_table("tiny-llama", PROMPT, [1, 2], target="tiny-llama", **kw)
    assert [r.explanation for r in plain.rows] == [r.explanation for r in table.rows]
    assert all(r.control.mean_state_answer is None for r in plain.rows)
    lens = client.explain_table(
        "tiny-llama", PROMPT, [1, 2], target="tiny-llama", preset="logit-lens", top_k=3
    )
    assert all(len(r.control.unpatched_top_k) == 3 for r in lens.rows)
    assert all(r.control.unpatched_top_k[0][0] == r.control.unpatched_explanation for r in lens.rows)
    with pytest.raises(CallError, match="mean_state_control") as info:
        client.explain_table(
            "tiny-llama", PROMPT, [1], target="tiny-llama", controls=False, mean_state_control=True
        )
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_explain_activations_of_extracted_states(client):
    result = client.extract("tiny-llama", PROMPT, [1, 3], [2, -1])
    states = np.concatenate([layer.states for layer in result.layers])
    layers = [layer.layer for layer in result.layers for _ in layer.positions]
    events = client.explain_activations(
        states,
        source="tiny-llama",
        layers=layers,
        target="tiny-llama",
        fingerprint=result.fingerprint,
        max_new_tokens=6,
    )
    got = [
        e.explanation
        for e in sorted((e for e in events if isinstance(e, Finished)), key=lambda e: e.site.index)
    ]
    expected = client.explain_table(
        "tiny-llama", PROMPT, [1, 3], target="tiny-llama", positions=[2, -1], max_new_tokens=6
    )
    assert got == [r.explanation for r in expected.rows]


def test_async_client_has_the_same_methods(tiny_service, client):
    async def main():
        async with AsyncPatchscopeClient(tiny_service.address, timeout=60) as aclient:
            models = await aclient.models()
            mappings = await aclient.mappings()
            extraction = await aclient.extract("tiny-llama", PROMPT, [2])
            table = await aclient.explain_table(
                "tiny-llama", PROMPT, [1, 2], target="tiny-qwen2", max_new_tokens=6
            )
            events = [
                e
                async for e in aclient.explain_activations(
                    extraction.layers[0].states,
                    source="tiny-llama",
                    layers=[2],
                    target="tiny-llama",
                    max_new_tokens=6,
                )
            ]
            return models, mappings, extraction, table, events

    models, mappings, extraction, table, events = asyncio.run(main())
    assert {m.id for m in models} == {m.id for m in client.models()}
    assert len(mappings) == 3 and extraction.layers[0].states.shape == (1, 64)
    sync = client.explain_table("tiny-llama", PROMPT, [1, 2], target="tiny-qwen2", max_new_tokens=6)
    assert [r.explanation for r in table.rows] == [r.explanation for r in sync.rows]
    assert all(r.mapping_id for r in table.rows)
    assert (
        isinstance(events[-1], Finished) and events[-1].reproduction["provenance_mismatch"]
    )  # no fingerprint


def test_a_deadline_after_the_first_event_ends_with_deadline_exceeded(client):
    events = client.explain(
        "tiny-llama",
        PROMPT,
        [0, 1, 2, 3],
        target="tiny-llama",
        positions=[1, 2, 3, -1],
        max_new_tokens=500,  # far more than 0.8 s of decoding on any machine: the deadline comes first
        timeout=0.8,
    )
    first = next(events)
    assert first.site.index >= 0
    with pytest.raises(CallError) as error:
        for _ in events:
            pass
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.explain_table("tiny-llama", PROMPT, [1], target="tiny-llama", max_new_tokens=2).rows


def test_leaving_the_loop_cancels_the_call_on_the_server(client):
    before = target_stats()["rows_dropped"]
    for event in client.explain(
        "tiny-llama", PROMPT, [0, 1, 2, 3], target="tiny-llama", positions=[1, -1], max_new_tokens=500
    ):
        if event.__class__.__name__ == "Token":
            break
    deadline = time.monotonic() + 30
    while target_stats()["rows_dropped"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert target_stats()["rows_dropped"] > before


def test_an_incompatible_server_is_one_clear_sentence(tiny_service, monkeypatch):
    monkeypatch.setattr(client_module, "API_VERSION", "1.7")
    with PatchscopeClient(tiny_service.address) as newer, pytest.raises(IncompatibleServer) as error:
        newer.models()
    assert str(error.value) == (
        f"the patchscope server speaks API {API_VERSION}, but this client needs 1.x with minor >= 7: "
        "install a patchscope-client matching the server"
    )


def relay(listen: socket.socket, upstream: str) -> None:
    """Forward every connection on `listen` to `upstream` (a stand-in for a restarted front end)."""
    host, port = upstream.rsplit(":", 1)

    def pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            b.close()

    while True:
        try:
            conn, _ = listen.accept()
        except OSError:
            return
        up = socket.create_connection((host, int(port)))
        threading.Thread(target=pipe, args=(conn, up), daemon=True).start()
        threading.Thread(target=pipe, args=(up, conn), daemon=True).start()


def test_idempotent_calls_retry_until_a_restarted_server_answers(tiny_service):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens: calls get UNAVAILABLE until the relay comes up

    listen = socket.socket()
    listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def come_up() -> None:
        time.sleep(1.0)
        listen.bind(("127.0.0.1", port))
        listen.listen()
        relay(listen, tiny_service.address)

    threading.Thread(target=come_up, daemon=True).start()
    try:
        with PatchscopeClient(f"127.0.0.1:{port}", retries=6, backoff_s=0.2, timeout=30) as flaky:
            started = time.monotonic()
            assert {m.id for m in flaky.models()} == {"tiny-llama", "tiny-qwen2"}
            assert time.monotonic() - started >= 0.9, "the first attempts must have failed and been retried"
    finally:
        listen.close()


def test_capture_explains_a_local_model_s_activations(client, tiny_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    events = list(
        explain_model_activations(
            client,
            model,
            tokenizer,
            PROMPT,
            [1, 3],
            [2, -1],
            source="tiny-llama",
            target="tiny-llama",
            max_new_tokens=6,
        )
    )
    finished = sorted((e for e in events if isinstance(e, Finished)), key=lambda e: e.site.index)
    expected = client.explain_table(
        "tiny-llama", PROMPT, [1, 3], target="tiny-llama", positions=[2, -1], max_new_tokens=6
    )
    assert [e.explanation for e in finished] == [r.explanation for r in expected.rows]
    assert not any(e.reproduction["provenance_mismatch"] for e in finished), "same weights, same fingerprint"
    assert fingerprint(model) in {m.fingerprint for m in client.models()}
