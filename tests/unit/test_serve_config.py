"""Serve configs as shipped: they parse with Ray's schema, every import path imports, settings validate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve._private.utils import import_attr
from ray.serve.schema import ServeDeploySchema

from patchscope.serve.auth import TokenCheck
from patchscope.serve.config import ServiceConfig
from patchscope.serve.status import PermissionDenied, Unauthenticated, status_of

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "deploy" / "config").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_serve_config_parses_and_every_import_path_imports(path):
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    for function in schema.grpc_options.grpc_servicer_functions:
        assert callable(import_attr(function))
    (app,) = schema.applications
    assert callable(import_attr(app.import_path.replace(":", ".")))
    assert {d.name for d in app.deployments} == {"SourceModel", "TargetModel", "Explainer"}
    if path.name != "local.yaml":  # only the local config may turn authentication off
        with pytest.raises(ValidationError, match="tokens"):  # its tokens file is a cluster secret
            ServiceConfig.model_validate({**app.args, "auth": {"required": True}})
        assert app.args["auth"]["required"] is True
    else:
        config = ServiceConfig.model_validate(app.args)
        assert config.sources == ["smollm2-135m"] and config.targets == ["smollm2-135m", "gemma3-270m"]
        assert config.auth.required is False


def test_gpu_config_puts_source_and_target_on_separate_gpus():
    schema = ServeDeploySchema.model_validate(yaml.safe_load((CONFIGS[0].parent / "gpu.yaml").read_text()))
    gpus = {d.name: d.ray_actor_options.num_gpus or 0 for d in schema.applications[0].deployments}
    assert gpus["SourceModel"] == 1 and gpus["TargetModel"] == 1 and gpus.get("Explainer", 0) == 0


def test_authentication_is_on_unless_a_config_turns_it_off():
    with pytest.raises(ValidationError, match=r"auth\.required is true but neither"):
        ServiceConfig.model_validate({"sources": ["a"], "targets": ["a"]})
    with pytest.raises(ValidationError, match="extra"):
        ServiceConfig.model_validate(
            {"sources": ["a"], "targets": ["a"], "auth": {"required": False}, "typo": 1}
        )


def test_bearer_tokens_are_checked_and_failures_say_nothing_specific(tmp_path, monkeypatch):
    tokens = tmp_path / "tokens"
    tokens.write_text("# team tokens\nalpha-123\n\nbeta-456\n")
    monkeypatch.setenv("EXTRA_TOKENS", "gamma-789")
    auth = ServiceConfig.model_validate(
        {
            "sources": ["a"],
            "targets": ["a"],
            "auth": {"tokens_file": str(tokens), "tokens_env": "EXTRA_TOKENS"},
        }
    ).auth
    check = TokenCheck(auth.tokens(), auth.required)
    for token in ("alpha-123", "beta-456", "gamma-789"):
        check.check([("authorization", f"Bearer {token}")])
    for metadata in ([], [("authorization", "Bearer nope")], [("authorization", "alpha-123")], [("x", "y")]):
        with pytest.raises(Unauthenticated) as error:
            check.check(metadata)
        code, message = status_of(error.value)
        assert code.name == "UNAUTHENTICATED" and "alpha" not in message
    TokenCheck([], required=False).check([])  # explicitly off: anyone


def test_a_key_limited_to_some_methods_is_denied_the_others():
    check = TokenCheck(["full-key", "prod-key ExplainActivations,ListModels"], required=True)
    assert check.check([("authorization", "Bearer full-key")], "Explain").startswith("key-")
    assert check.check([("authorization", "Bearer prod-key")], "ExplainActivations")
    with pytest.raises(PermissionDenied) as error:
        check.check([("authorization", "Bearer prod-key")], "Explain")
    assert status_of(error.value)[0].name == "PERMISSION_DENIED" and "prod" not in str(error.value)
