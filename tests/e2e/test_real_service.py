"""The service from deploy/config/local.yaml as it ships, on the real default pair, over real gRPC."""

from __future__ import annotations

import grpc
import pytest
from tests.conftest import data_dir
from tests.integration.conftest import service_config
from tests.integration.test_service import collect

from patchscope.engine.runtime import TargetRuntime
from patchscope.explain import LocalBackend, explain
from patchscope.mapping.pipeline import fit_mappings
from patchscope.mapping.registry import MappingRegistry
from patchscope.mapping.resolve import registry_resolver
from patchscope.serve.local import free_port, start
from patchscope.wire import explain_from_proto, pb, pb_grpc

pytestmark = [pytest.mark.realmodel, pytest.mark.ray]


@pytest.fixture(scope="module")
def registry(smollm2, gemma3, tmp_path_factory) -> MappingRegistry:
    registry = MappingRegistry(tmp_path_factory.mktemp("real-mappings"))
    corpus = data_dir() / "wikitext-2" / "valid.txt"
    fit_mappings(smollm2, gemma3, [(2, 1), (6, 4)], "affine", corpus, registry, max_words=3000)
    return registry


@pytest.fixture(scope="module")
def stub(registry):
    service = start(
        service_config({"registry": str(registry.root)}),
        grpc_port=free_port(),
        http_port=free_port(),
        num_cpus=2,
        timeout_s=400,
    )
    try:
        with grpc.insecure_channel(service.address) as channel:
            yield pb_grpc.PatchscopeStub(channel)
    finally:
        service.stop()


def test_explain_on_the_default_pair_equals_the_in_process_engine(stub, smollm2, gemma3, registry):
    request = pb.ExplainRequest(
        source="smollm2-135m",
        prompt="Barack Obama",
        layers=[2, 6],
        target=pb.TargetSpec(model="gemma3-270m", generation=pb.GenerationOptions(max_new_tokens=8)),
    )
    finished = collect(stub.Explain(request, timeout=300))
    backend = LocalBackend.of(smollm2, TargetRuntime.build(gemma3))
    expected = explain(backend, explain_from_proto(request), registry_resolver(registry)).results
    assert [finished[i].finished.explanation for i in range(2)] == [r.explanation for r in expected]
    assert finished[0].finished.answer.lower() == "obama", finished[0].finished.explanation
    repro = finished[0].finished.reproduction
    assert repro.target_fingerprint == gemma3.fingerprint and repro.mapping_id.endswith("2-1.affine")


def test_same_model_explain_on_smollm2_repeats_the_token(stub):
    request = pb.ExplainRequest(
        source="smollm2-135m",
        prompt="a glass of milk",
        layers=[3],
        target=pb.TargetSpec(model="smollm2-135m", generation=pb.GenerationOptions(max_new_tokens=6)),
    )
    (event,) = collect(stub.Explain(request, timeout=300)).values()
    assert event.finished.answer.lower() == "milk", event.finished.explanation
