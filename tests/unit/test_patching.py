"""A patch is checked against a forward pass computed another way: the unpatched one."""

import pytest
import torch

from patchscope.engine import Patch, extract, patching
from patchscope.engine.template import tokenize_prompt

PROMPT = "It is closely related to the American lobster and may grow to a length of 60 cm"


@torch.inference_mode()
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_patching_own_state_back_reproduces_unpatched_logits(tiny, where):
    ids = torch.tensor([tokenize_prompt(tiny.tokenizer, PROMPT)])  # [1, T]
    layer = {"first": 0, "middle": tiny.layout.num_layers // 2, "last": tiny.layout.num_layers - 1}[where]
    position = 4
    state = extract(tiny, PROMPT, [layer], [position]).states[0, 0]
    unpatched = tiny.model(ids).logits
    with patching(tiny.layout, [Patch(row=0, position=position, layer=layer, vector=state)]):
        patched = tiny.model(ids).logits
    torch.testing.assert_close(patched, unpatched, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_foreign_vector_changes_logits_at_and_after_site_only(tiny):
    ids = torch.tensor([tokenize_prompt(tiny.tokenizer, PROMPT)])
    position, layer = 5, 1
    vector = torch.randn(tiny.facts.hidden_size, generator=torch.Generator().manual_seed(1)) * 3
    unpatched = tiny.model(ids).logits[0]  # [T, V]
    with patching(tiny.layout, [Patch(row=0, position=position, layer=layer, vector=vector)]):
        patched = tiny.model(ids).logits[0]
    assert torch.equal(patched[:position], unpatched[:position]), (
        "positions before the site must be bit-identical"
    )
    changed = (patched[position:] - unpatched[position:]).abs().amax(dim=-1)  # [T - position]
    # With sliding-window attention (tiny Gemma: 8 tokens, all layers sliding) the patch reaches only so far.
    reach = getattr(tiny.model.config, "sliding_window", None) or len(changed)
    assert bool((changed[:reach] > 1e-4).all()), (
        "the site and every later position in reach must see the patch"
    )


@torch.inference_mode()
def test_hooks_are_removed_even_when_the_forward_fails(llama):
    ids = torch.tensor([[0, 1, 2]])
    vector = torch.zeros(llama.facts.hidden_size)
    before = [len(block._forward_hooks) for block in llama.layout.blocks]  # transformers may keep its own
    with (
        pytest.raises(IndexError),
        patching(llama.layout, [Patch(row=0, position=10, layer=0, vector=vector)]),
    ):
        llama.model(ids)
    assert [len(block._forward_hooks) for block in llama.layout.blocks] == before


@torch.inference_mode()
def test_patches_apply_to_their_own_batch_row(llama):
    ids = torch.tensor([tokenize_prompt(llama.tokenizer, PROMPT)] * 3)  # [3, T]
    vector = torch.full((llama.facts.hidden_size,), 2.0)
    base = llama.model(ids).logits
    with patching(llama.layout, [Patch(row=1, position=3, layer=2, vector=vector)]):
        patched = llama.model(ids).logits
    assert torch.equal(patched[0], base[0]) and torch.equal(patched[2], base[2])
    assert not torch.allclose(patched[1, 3:], base[1, 3:])
