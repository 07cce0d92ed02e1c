"""End-to-end on the embedded real models (converted once from their PyPI packages)."""

import pytest
import torch

from patchscope.engine import GenerationConfig, PatchedRow, RowPatch, extract, patched_generate
from patchscope.engine.models import LoadedModel, embedding_fingerprint
from patchscope.engine.models.registry import ModelRegistry
from patchscope.engine.options import EngineOptions
from patchscope.engine.presets import PRESETS
from patchscope.engine.runtime import TargetRuntime
from patchscope.engine.template import tokenize_prompt, tokenize_template
from patchscope.explain import ExplainRequest, LocalBackend, TargetSpec, explain

pytestmark = pytest.mark.realmodel

PROMPTS = {"Barack Obama": "obama", "a glass of milk": "milk", "New York City": "city"}


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def real(request) -> LoadedModel:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def runtime(real) -> TargetRuntime:
    """`real` as a target with the default engine options."""
    return TargetRuntime.build(real)


def same_model_sweep(model: LoadedModel, runtime: TargetRuntime, prompt: str, layers: list[int]):
    target = TargetSpec(model.id)
    request = ExplainRequest(source=model.id, prompt=prompt, layers=tuple(layers), target=target)
    return explain(LocalBackend.of(model, runtime), request)


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_identity_preset_repeats_the_last_source_token_at_early_layers(real, runtime, prompt):
    result = same_model_sweep(real, runtime, prompt, list(range(1, 7)))
    answers = [r.answer.lower() for r in result.results]
    assert answers == [PROMPTS[prompt]] * 6, [r.explanation for r in result.results]


def test_template_pieces_join_to_the_tokenisation_of_the_whole_text(real):
    tokens = tokenize_template(real.tokenizer, "The capital of{} is", " x")
    assert list(tokens.ids) == tokenize_prompt(real.tokenizer, "The capital of x is")
    assert real.tokenizer.decode([tokens.ids[tokens.placeholder]]).strip() == "x"


@torch.inference_mode()
def test_extract_equals_output_hidden_states(real):
    prompt = "The European lobster lives in the eastern Atlantic Ocean"
    ids = torch.tensor([tokenize_prompt(real.tokenizer, prompt)])
    reference = real.model(ids, output_hidden_states=True).hidden_states
    L = real.layout.num_layers
    got = extract(real, prompt, [1, L // 2, L - 2, L - 1], positions=[2, -1])
    for i, layer in enumerate(got.layers):
        want = reference[layer + 1][0, [2, ids.shape[1] - 1]]
        have = real.layout.final_norm(got.states[i]) if layer == L - 1 else got.states[i]
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)


def test_prefix_cached_sweep_equals_uncached_on_all_layers(real, runtime):
    layers = list(range(real.layout.num_layers))
    states = extract(real, "Barack Obama", layers).states[:, 0]  # [L, d]
    identity = PRESETS["identity"]
    rows = [
        PatchedRow(identity.template, identity.filler, (RowPatch(layer, states[layer]),)) for layer in layers
    ]
    config = GenerationConfig(max_new_tokens=6)
    cached = patched_generate(runtime, rows, config)
    uncached = patched_generate(runtime, rows, config, use_prefix_cache=False)
    assert [r.token_ids for r in cached] == [r.token_ids for r in uncached]


def test_stored_fingerprint_equals_the_embedding_on_disk(real):
    directory = ModelRegistry().weights_dir(real.id)
    assert real.fingerprint == embedding_fingerprint(directory, real.layout.paths.embed + ".weight")


def test_the_lean_forward_explains_as_transformers_forward_does(real, runtime):
    """The CPU default (engine/models/lean.py) against transformers' forward: same sweep, word for word."""
    assert runtime.lean is not None
    stock = TargetRuntime.build(real, EngineOptions(forward="transformers"))
    prompt, layers = "The Eiffel Tower is in Paris", list(range(real.layout.num_layers))
    lean = same_model_sweep(real, runtime, prompt, layers)
    reference = same_model_sweep(real, stock, prompt, layers)
    assert [r.explanation for r in lean.results] == [r.explanation for r in reference.results]
