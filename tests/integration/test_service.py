"""Every RPC end to end through a real local Ray Serve and the real gRPC port, on tiny models."""

from __future__ import annotations

import pytest

from patchscope.wire import pb

pytestmark = pytest.mark.ray


def test_list_models_reports_hosted_models_roles_and_api_version(stub):
    response, call = stub.ListModels.with_call(pb.ListModelsRequest(), timeout=60)
    roles = {m.id: (m.source, m.target) for m in response.models}
    assert roles == {"tiny-llama": (True, True), "tiny-qwen2": (False, True)}
    assert response.api_version == "1.0"
    assert dict(call.trailing_metadata())["patchscope-api-version"] == "1.0"
    assert all(m.ready and m.num_layers == 4 and m.hidden_size == 64 for m in response.models)
