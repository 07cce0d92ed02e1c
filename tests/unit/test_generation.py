"""Batched, prefix-cached patched generation equals the same sites run one by one without the cache."""

import pytest
import torch

from patchscope.engine import GenerationConfig, PatchedRow, RowPatch, extract, patched_generate
from patchscope.engine.models.layout import Layout
from patchscope.engine.presets import PRESETS
from patchscope.engine.template import tokenize_template

SOURCE = "The lobster is a species of crustacean from the eastern Atlantic Ocean"
IDENTITY = PRESETS["identity"]
DESCRIPTION = PRESETS["description"]
CONFIG = GenerationConfig(max_new_tokens=6)


def assert_same_generation(a, b, tol: float = 1e-4) -> None:
    """Token-for-token equality; where a tiny model's top-2 margin is within `tol`, equal logits decide."""
    assert a.scores is not None and b.scores is not None
    for step in range(min(len(a.token_ids), len(b.token_ids))):
        torch.testing.assert_close(a.scores[step], b.scores[step], rtol=tol, atol=tol)
        if a.token_ids[step] != b.token_ids[step]:
            top2 = a.scores[step].topk(2).values
            assert float(top2[0] - top2[1]) < 2 * tol, f"tokens differ at step {step} with a decisive margin"
            return  # after a tie the continuations may legitimately diverge
    assert a.token_ids == b.token_ids


def sweep_rows(model, preset=IDENTITY, template=None):
    layers = list(range(model.layout.num_layers))
    states = extract(model, SOURCE, layers, positions=[-1, 3]).states  # [L, 2, d]
    template = template or preset.template
    return [
        PatchedRow(template, preset.filler, (RowPatch(layer=layer, vector=states[layer, p]),))
        for layer in layers
        for p in range(2)
    ]


def test_batched_sweep_equals_sites_run_one_by_one(tiny, tiny_runtime):
    rows = sweep_rows(tiny)
    batched = patched_generate(tiny_runtime, rows, CONFIG, return_scores=True)
    for row, together in zip(rows, batched, strict=True):
        (alone,) = patched_generate(tiny_runtime, [row], CONFIG, use_prefix_cache=False, return_scores=True)
        assert_same_generation(together, alone)


@pytest.mark.parametrize("preset", [IDENTITY, DESCRIPTION], ids=lambda p: p.name)
def test_prefix_cached_generation_equals_uncached(tiny, tiny_runtime, preset):
    rows = sweep_rows(tiny, preset)
    cached = patched_generate(tiny_runtime, rows, CONFIG, return_scores=True)
    uncached = patched_generate(tiny_runtime, rows, CONFIG, use_prefix_cache=False, return_scores=True)
    for a, b in zip(cached, uncached, strict=True):
        assert_same_generation(a, b)


def test_prefix_cache_is_reused_across_calls(llama, llama_runtime):
    cache = llama_runtime.prefix_cache
    cache.clear()
    hits, misses = cache.hits, cache.misses
    rows = sweep_rows(llama)
    first = patched_generate(llama_runtime, rows, CONFIG)
    second = patched_generate(llama_runtime, rows, CONFIG)
    assert (cache.misses - misses, cache.hits - hits) == (1, 1)
    assert [r.token_ids for r in first] == [r.token_ids for r in second]


def test_patch_before_the_placeholder_shrinks_the_shared_prefix(tiny, tiny_runtime):
    """A patch inside the template's prefix must not be hidden by a cache computed without it."""
    tokens = tokenize_template(tiny.tokenizer, IDENTITY.template, IDENTITY.filler)
    vector = torch.randn(tiny.facts.hidden_size, generator=torch.Generator().manual_seed(3)) * 2
    early = tokens.placeholder - 4
    rows = [
        PatchedRow(IDENTITY.template, IDENTITY.filler, (RowPatch(layer=1, vector=vector, position=early),)),
        PatchedRow(IDENTITY.template, IDENTITY.filler, (RowPatch(layer=2, vector=vector),)),
    ]
    cached = patched_generate(tiny_runtime, rows, CONFIG, return_scores=True)
    uncached = patched_generate(tiny_runtime, rows, CONFIG, use_prefix_cache=False, return_scores=True)
    for a, b in zip(cached, uncached, strict=True):
        assert_same_generation(a, b)
    (unpatched,) = patched_generate(
        tiny_runtime, [PatchedRow(IDENTITY.template, IDENTITY.filler, ())], CONFIG, return_scores=True
    )
    assert not torch.allclose(cached[0].scores[0], unpatched.scores[0])


def test_rows_of_different_templates_and_layers_in_one_call(llama, llama_runtime):
    states = extract(llama, SOURCE, [0, 2], positions=[-1]).states
    rows = [
        PatchedRow(IDENTITY.template, IDENTITY.filler, (RowPatch(0, states[0, 0]),)),
        PatchedRow(DESCRIPTION.template, DESCRIPTION.filler, (RowPatch(2, states[1, 0]),)),
        PatchedRow("The capital of{} is", " x", (RowPatch(0, states[0, 0]), RowPatch(2, states[1, 0]))),
        PatchedRow(IDENTITY.template, IDENTITY.filler, (RowPatch(2, states[1, 0]),)),
    ]
    together = patched_generate(llama_runtime, rows, CONFIG, return_scores=True)
    for row, got in zip(rows, together, strict=True):
        (alone,) = patched_generate(llama_runtime, [row], CONFIG, use_prefix_cache=False, return_scores=True)
        assert_same_generation(got, alone)


def test_sampling_is_reproducible_with_a_seed(llama, llama_runtime):
    rows = sweep_rows(llama)[:4]
    config = GenerationConfig(max_new_tokens=8, temperature=1.5, top_p=0.9, seed=7)
    first = [r.token_ids for r in patched_generate(llama_runtime, rows, config)]
    assert first == [r.token_ids for r in patched_generate(llama_runtime, rows, config)]
    assert first != [
        r.token_ids for r in patched_generate(llama_runtime, rows, GenerationConfig(max_new_tokens=8))
    ]


def test_generation_stops_at_end_of_sequence(llama, llama_runtime, monkeypatch):
    """Force EOS at the first step by raising its logit in the head."""
    eos = llama.tokenizer.eos_token_id
    rows = sweep_rows(llama)[:2]
    head = Layout.unembed_normed
    monkeypatch.setattr(
        Layout, "unembed_normed", lambda self, h: head(self, h).index_fill(-1, torch.tensor([eos]), 1e4)
    )
    out = patched_generate(llama_runtime, rows, GenerationConfig(max_new_tokens=8))
    assert all(r.token_ids == [] and r.text == "" for r in out)


def test_template_ids_join_prefix_filler_and_suffix(tiny):
    tokens = tokenize_template(tiny.tokenizer, "The capital of{} is", " x")
    text = tiny.tokenizer.decode(list(tokens.ids), skip_special_tokens=True)
    assert text == "The capital of x is"
    assert tiny.tokenizer.decode([tokens.ids[tokens.placeholder]]).endswith("x")
    assert tokens.prefix_len <= tokens.placeholder


@torch.inference_mode()
def test_engine_head_equals_the_models_own_logits(tiny, tiny_runtime):
    """Decoding runs the base model (or the lean forward) and the head itself; it must match the causal-LM
    wrapper."""
    from patchscope.engine.generation import _forward, new_cache

    ids = torch.tensor([tokenize_template(tiny.tokenizer, IDENTITY.template, IDENTITY.filler).ids] * 2)
    want = tiny.model(ids).logits[:, -1]
    got = _forward(tiny_runtime, ids, new_cache(tiny_runtime))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
