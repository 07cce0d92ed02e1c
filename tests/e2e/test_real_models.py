"""End-to-end on the embedded real models (converted once from their PyPI packages)."""

import pytest
import torch

from patchscope.engine import (
    ExplainRequest,
    GenerationConfig,
    PatchedRow,
    RowPatch,
    explain,
    extract,
    load_model,
    patched_generate,
)
from patchscope.engine.models import embedding_fingerprint
from patchscope.engine.models.registry import ModelRegistry
from patchscope.engine.presets import PRESETS
from patchscope.engine.template import tokenize_prompt, tokenize_template

pytestmark = pytest.mark.realmodel

PROMPTS = {"Barack Obama": "obama", "a glass of milk": "milk", "New York City": "city"}


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def real(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_identity_preset_repeats_the_last_source_token_at_early_layers(real, prompt):
    result = explain(real, real, ExplainRequest(prompt=prompt, layers=list(range(1, 7))))
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


def test_prefix_cached_sweep_equals_uncached_on_all_layers(real):
    layers = list(range(real.layout.num_layers))
    states = extract(real, "Barack Obama", layers).states[:, 0]  # [L, d]
    identity = PRESETS["identity"]
    rows = [
        PatchedRow(identity.template, identity.filler, (RowPatch(layer, states[layer]),)) for layer in layers
    ]
    config = GenerationConfig(max_new_tokens=6)
    cached = patched_generate(real, rows, config)
    uncached = patched_generate(real, rows, config, use_prefix_cache=False)
    assert [r.token_ids for r in cached] == [r.token_ids for r in uncached]


def test_stored_fingerprint_equals_the_embedding_on_disk(real):
    directory = ModelRegistry().weights_dir(real.id)
    assert real.fingerprint == embedding_fingerprint(directory, real.layout.paths.embed + ".weight")


def test_the_lean_forward_explains_as_transformers_forward_does(real):
    """The CPU default (engine/models/lean.py) against transformers' forward: same sweep, word for word."""
    assert real.lean is not None
    stock = load_model(real.id, forward="transformers")
    request = ExplainRequest(
        prompt="The Eiffel Tower is in Paris", layers=list(range(real.layout.num_layers))
    )
    lean, reference = explain(real, real, request), explain(stock, stock, request)
    assert [r.explanation for r in lean.results] == [r.explanation for r in reference.results]
