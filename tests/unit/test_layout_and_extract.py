"""Hook-point discovery and extraction, checked against transformers' own `output_hidden_states`."""

import pytest
import torch

from patchscope.engine import extract
from patchscope.engine.errors import UnsupportedArchitecture
from patchscope.engine.models.layout import hook_points
from patchscope.engine.template import tokenize_prompt

PROMPT = "The European lobster is a species of lobster from the eastern Atlantic Ocean"


def test_discovery_finds_every_block_norm_and_unembedding(tiny):
    layout = tiny.layout
    assert layout.num_layers == tiny.model.config.num_hidden_layers
    assert isinstance(layout.final_norm, torch.nn.Module)
    assert layout.unembed.weight.shape == (tiny.model.config.vocab_size, tiny.model.config.hidden_size)


def test_unknown_architecture_error_lists_supported_ones():
    with pytest.raises(UnsupportedArchitecture, match=r"llama.*qwen3"):
        hook_points("mamba")


@torch.inference_mode()
def test_extract_equals_output_hidden_states_at_documented_offset(tiny):
    ids = torch.tensor([tokenize_prompt(tiny.tokenizer, PROMPT)])
    reference = tiny.model(ids, output_hidden_states=True).hidden_states  # L+1 entries, last one normed
    L = tiny.layout.num_layers
    got = extract(tiny, PROMPT, layers=list(range(L)), positions=[1, 5, -1])
    for i, layer in enumerate(got.layers):
        want = reference[layer + 1][0, [1, 5, ids.shape[1] - 1]]
        if layer == L - 1:  # transformers returns the normed state for the last block
            torch.testing.assert_close(tiny.layout.final_norm(got.states[i]), want, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(got.states[i], want, rtol=1e-5, atol=1e-5)


def test_extract_defaults_to_last_token_and_resolves_negative_positions(llama):
    got = extract(llama, PROMPT, layers=[-1, 0])
    assert got.positions == [len(got.token_ids) - 1]
    assert got.layers == [llama.layout.num_layers - 1, 0]
    assert got.states.shape == (2, 1, llama.facts.hidden_size)
    assert got.states.dtype == torch.float32 and got.states.device.type == "cpu"
    assert "".join(got.tokens).endswith("Atlantic Ocean")


def test_extract_of_early_layers_only_matches_full_extraction(llama):
    """Capturing stops the forward after the highest requested layer; the states must not change."""
    early = extract(llama, PROMPT, layers=[0, 1], positions=[2])
    full = extract(llama, PROMPT, layers=[0, 1, 3], positions=[2])
    assert torch.equal(early.states, full.states[:2])
