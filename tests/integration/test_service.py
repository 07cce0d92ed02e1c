"""Every RPC end to end through a real local Ray Serve and the real gRPC port, on tiny models."""

from __future__ import annotations

import pytest

from patchscope.wire import pb
from patchscope_client.version import API_VERSION

pytestmark = pytest.mark.ray


def test_list_models_reports_hosted_models_roles_and_api_version(stub):
    response, call = stub.ListModels.with_call(pb.ListModelsRequest(), timeout=60)
    roles = {m.id: (m.source, m.target) for m in response.models}
    assert roles == {"tiny-llama": (True, True), "tiny-qwen2": (False, True)}
    assert response.api_version == API_VERSION
    assert dict(call.trailing_metadata())["patchscope-api-version"] == API_VERSION
    assert all(m.ready and m.num_layers == 4 and m.hidden_size == 64 for m in response.models)


# ---- helpers -----------------------------------------------------------------------------------------


def explain_request(
    prompt="The river runs past the old mill", target="tiny-llama", **kw
) -> pb.ExplainRequest:
    spec = {
        "generation": pb.GenerationOptions(max_new_tokens=kw.pop("max_new_tokens", 6)),
        **kw.pop("spec", {}),
    }
    spec = pb.TargetSpec(model=target, **spec)
    return pb.ExplainRequest(
        source=kw.pop("source", "tiny-llama"),
        prompt=prompt,
        layers=kw.pop("layers", [1, 2, 3]),
        positions=kw.pop("positions", [-1, 2]),
        target=spec,
        **kw,
    )


def collect(events) -> dict[int, pb.ExplainEvent]:
    """Finished events by site index, after checking each site's events arrive in order."""
    seen: dict[int, list[str]] = {}
    finished = {}
    for event in events:
        kind = event.WhichOneof("event")
        seen.setdefault(event.site.index, []).append(kind)
        if kind == "finished":
            finished[event.site.index] = event
    for kinds in seen.values():
        assert kinds[0] == "started" and kinds[-1] == "finished" and set(kinds[1:-1]) <= {"token"}, kinds
    return finished


def engine_results(tiny_models, source, target, request: pb.ExplainRequest, registry=None):
    """The same request through the in-process pipeline (the service's must equal it)."""
    from patchscope.engine.runtime import TargetRuntime
    from patchscope.explain import LocalBackend, explain
    from patchscope.explain.plan import no_mappings
    from patchscope.mapping.resolve import registry_resolver
    from patchscope.wire import explain_from_proto

    backend = LocalBackend.of(tiny_models[source], TargetRuntime.build(tiny_models[target]))
    resolve = no_mappings if registry is None else registry_resolver(registry)
    return explain(backend, explain_from_proto(request), resolve).results


# ---- unary -------------------------------------------------------------------------------------------


def test_list_mappings_rescans_the_registry_and_reports_metrics(stub, mapping_registry):
    response = stub.ListMappings(pb.ListMappingsRequest(source="tiny-llama"), timeout=60)
    assert {(m.source_layer, m.target_layer) for m in response.mappings} == {(1, 1), (2, 2), (3, 3)}
    assert all(m.method == "affine" and m.num_pairs > 100 and -1 < m.r2 <= 1 for m in response.mappings)
    (mapping_registry.root / "broken.mapping.safetensors").write_bytes(b"not a mapping")
    try:
        again = stub.ListMappings(pb.ListMappingsRequest(), timeout=60)
        assert any("broken" in name for name in again.unreadable)
        assert len(again.mappings) == len(response.mappings)
    finally:
        (mapping_registry.root / "broken.mapping.safetensors").unlink()


# ---- ExtractHiddenStates ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [pb.D_TYPE_UNSPECIFIED, pb.D_TYPE_BF16])
def test_extract_hidden_states_equals_the_engine(stub, tiny_models, dtype):
    import safetensors.torch
    import torch

    from patchscope.engine.hooks import extract

    request = pb.ExtractHiddenStatesRequest(
        model="tiny-llama",
        prompt="The river runs past the old mill",
        layers=[0, 3],
        positions=[1, -1],
        dtype=dtype,
    )
    messages = list(stub.ExtractHiddenStates(request, timeout=60))
    expected = extract(tiny_models["llama"], request.prompt, [0, 3], [1, -1])
    assert [m.layer for m in messages] == [0, 3]
    for m, states in zip(messages, expected.states, strict=True):
        assert m.chunk_count == 1 and list(m.shape) == [2, 64] and list(m.positions) == expected.positions
        assert list(m.token_ids) == expected.token_ids and list(m.tokens) == expected.tokens
        got = safetensors.torch.load(m.safetensors)["states"]
        if dtype == pb.D_TYPE_BF16:
            assert got.dtype == torch.bfloat16 and m.dtype == pb.D_TYPE_BF16
            torch.testing.assert_close(got.float(), states, rtol=1e-2, atol=1e-2)
        else:
            assert got.dtype == torch.float32 and m.dtype == pb.D_TYPE_F32
            assert torch.equal(got, states)


# ---- Explain ----------------------------------------------------------------------------------------


def test_explain_same_model_streams_the_engines_explanations(stub, tiny_models):
    request = explain_request()
    finished = collect(stub.Explain(request, timeout=120))
    expected = engine_results(tiny_models, "llama", "llama", request)
    assert len(finished) == len(expected) == 6
    for index, result in enumerate(expected):
        event = finished[index]
        assert (event.site.source_layer, event.site.target_layer, event.site.position) == (
            result.site.source_layer,
            result.site.target_layer,
            result.site.position,
        )
        assert event.finished.explanation == result.explanation
        assert event.finished.answer == result.answer
        assert event.site.source_token == result.source_token
        repro = event.finished.reproduction
        assert repro.source_model == "tiny-llama" and repro.mapping_id == "" and repro.dtype == "float32"
        assert repro.generation.max_new_tokens == 6 and repro.api_version == API_VERSION


def test_explain_cross_model_goes_through_the_registered_mapping(stub, tiny_models, mapping_registry):
    request = explain_request(target="tiny-qwen2")
    events = list(stub.Explain(request, timeout=120))
    started = [e for e in events if e.WhichOneof("event") == "started"]
    assert {e.started.mapping_id for e in started} == {
        f"tiny-llama.tiny-qwen2.{a}-{a}.affine" for a in (1, 2, 3)
    }
    assert all(e.started.HasField("mapping_r2") and e.started.mapped_norm > 0 for e in started)
    assert all(e.started.target_layer_norm > 0 for e in started)
    expected = engine_results(tiny_models, "llama", "qwen2", request, mapping_registry)
    finished = collect(events)
    assert [finished[i].finished.explanation for i in range(6)] == [r.explanation for r in expected]
    assert [finished[i].finished.reproduction.mapping_id for i in range(6)] == [
        r.mapping_id for r in expected
    ]


def test_explain_streams_incrementally(stub):
    import time

    request = explain_request(max_new_tokens=48, layers=[0, 1, 2, 3], positions=[1, 2, 3, -1])
    received = []
    for event in stub.Explain(request, timeout=120):
        received.append((time.time(), event))
    first_token = next(t for t, e in received if e.WhichOneof("event") == "token")
    last_emitted = max(e.emitted_at for _, e in received)
    assert first_token < last_emitted, "the first token arrived only after the server emitted the last event"
    assert len({e.request_id for _, e in received}) == 1


def test_logit_lens_preset_answers_with_top_k(stub, tiny_models):
    request = explain_request(spec={"preset": "logit-lens", "top_k": 3}, positions=[-1])
    finished = collect(stub.Explain(request, timeout=60))
    expected = engine_results(tiny_models, "llama", "llama", request)
    for index, result in enumerate(expected):
        assert finished[index].finished.explanation == result.explanation
        assert len(finished[index].finished.top_k) == 3


# ---- ExplainActivations ----------------------------------------------------------------------------------


def test_explain_activations_of_extracted_states_equals_explain(stub, tiny_service):
    import safetensors.torch
    import torch

    prompt, layers, positions = "The river runs past the old mill", [1, 3], [2, -1]
    messages = list(
        stub.ExtractHiddenStates(
            pb.ExtractHiddenStatesRequest(
                model="tiny-llama", prompt=prompt, layers=layers, positions=positions
            ),
            timeout=60,
        )
    )
    rows = torch.cat([safetensors.torch.load(m.safetensors)["states"] for m in messages])  # layer-major
    fingerprint = messages[0].fingerprint
    provenance = pb.Provenance(
        model="my-production-llama",
        fingerprint=fingerprint,
        layers=[m.layer for m in messages for _ in m.positions],
        positions=[p for m in messages for p in m.positions],
    )
    request = pb.ExplainActivationsRequest(
        source="tiny-llama",
        safetensors=safetensors.torch.save({"states": rows}),
        provenance=provenance,
        target=pb.TargetSpec(model="tiny-llama", generation=pb.GenerationOptions(max_new_tokens=6)),
    )
    from_activations = collect(stub.ExplainActivations(request, timeout=120))
    from_prompt = collect(
        stub.Explain(explain_request(prompt, layers=layers, positions=positions), timeout=120)
    )
    assert [from_activations[i].finished.explanation for i in range(4)] == [
        from_prompt[i].finished.explanation for i in range(4)
    ]
    assert not any(e.finished.reproduction.provenance_mismatch for e in from_activations.values())

    request.provenance.fingerprint = "0" * 64  # a fine-tuned production model: explained, and flagged
    flagged = collect(stub.ExplainActivations(request, timeout=120))
    assert all(e.finished.reproduction.provenance_mismatch for e in flagged.values())
