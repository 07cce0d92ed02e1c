"""The lean forward: transformers' arithmetic for each supported family, patches included, chosen only where
it applies."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.cache_utils import DynamicCache

from patchscope.engine import GenerationConfig, PatchedRow, RowPatch, extract, patched_generate
from patchscope.engine.hooks import patching
from patchscope.engine.kv_cache import cache_kwarg
from patchscope.engine.models import LoadedModel, load_directory
from patchscope.engine.models.layout import lean_families
from patchscope.engine.models.lean import resolve_forward
from patchscope.engine.models.lean_cache import GROW, LeanCache, SharedRows
from patchscope.engine.options import EngineOptions
from patchscope.engine.patch import Patch
from patchscope.engine.presets import PRESETS
from patchscope.engine.runtime import TargetRuntime


@pytest.fixture(scope="module", params=lean_families())
def pair(request, tiny_dirs) -> tuple[TargetRuntime, TargetRuntime]:
    """One tiny model (ATen kernels) with two runtimes: the lean forward and transformers' forward."""
    arch = request.param
    model = load_directory(f"tiny-{arch}", tiny_dirs[arch], options=EngineOptions(gemm="aten"))
    lean = TargetRuntime.build(model, EngineOptions(forward="lean"))
    stock = TargetRuntime.build(model, EngineOptions(forward="transformers"))
    assert lean.lean is not None and stock.lean is None
    return lean, stock


def _stock_forward(m: LoadedModel, ids: torch.Tensor, kv: DynamicCache, patches=()) -> torch.Tensor:
    base = m.model.base_model
    with patching(m.layout, patches, offset=kv.get_seq_length()):
        out = base(ids, use_cache=True, **{cache_kwarg(type(base)): kv}).last_hidden_state
    return out[:, -1]


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 5),
    prefix=st.integers(0, 10),  # past the tiny Gemma's sliding window of 8 with the new tokens
    new=st.integers(1, 4),
    steps=st.integers(0, 3),
    data=st.data(),
)
@torch.inference_mode()
def test_lean_forward_equals_transformers_with_patches_shared_rows_and_decoding(
    pair, batch: int, prefix: int, new: int, steps: int, data
) -> None:
    """A prefix pass, a patched prompt pass of identical rows (computed once until patched), decode steps
    and a dropped row: every step's final-normed state equals transformers' forward with patch hooks,
    sliding windows included."""
    lean, stock = pair[0], pair[1].model
    layers, hidden = stock.layout.num_layers, stock.model.config.hidden_size
    ids = torch.randint(3, stock.model.config.vocab_size, (1, prefix + new))
    patches = [
        Patch(
            row=data.draw(st.integers(0, batch - 1)),
            position=prefix + data.draw(st.integers(0, new - 1)),
            layer=data.draw(st.integers(0, layers - 1)),
            vector=torch.randn(hidden),
        )
        for _ in range(data.draw(st.integers(0, 2 * batch)))
    ]
    lean_kv, stock_kv = LeanCache(), DynamicCache(config=stock.model.config)
    if prefix:
        lean.lean.forward(ids[:, :prefix], lean_kv)
        _stock_forward(stock, ids[:, :prefix], stock_kv)
        lean_kv.batch_repeat_interleave(batch)
        stock_kv.batch_repeat_interleave(batch)
    rows = ids[:, prefix:].expand(batch, -1)
    got = lean.lean.forward(rows, lean_kv, patches, identical_rows=True)
    want = _stock_forward(stock, rows, stock_kv, patches)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for step in range(steps):
        if step == 1 and batch > 1:  # a finished row leaves the batch
            keep = torch.arange(1, batch)
            lean_kv.batch_select_indices(keep)
            stock_kv.batch_select_indices(keep)
            batch -= 1
        token = torch.randint(3, stock.model.config.vocab_size, (batch, 1))
        torch.testing.assert_close(
            lean.lean.forward(token, lean_kv), _stock_forward(stock, token, stock_kv), rtol=1e-4, atol=1e-4
        )
    assert lean_kv.get_seq_length() == stock_kv.get_seq_length()


@torch.inference_mode()
def test_the_cache_grows_past_its_reserve_and_explanations_match(pair) -> None:
    """More new tokens than one reserve holds; the sweep's explanations equal transformers' word for word."""
    lean, stock = pair
    model, identity = lean.model, PRESETS["identity"]
    layers = list(range(model.layout.num_layers))
    states = extract(model, "The capital of France is", layers).states[:, 0]  # [L, d]
    rows = [PatchedRow(identity.template, identity.filler, (RowPatch(ly, states[ly]),)) for ly in layers]
    config = GenerationConfig(max_new_tokens=GROW + 8)
    a, b = patched_generate(lean, rows, config), patched_generate(stock, rows, config)
    assert [r.text for r in a] == [r.text for r in b]


def test_a_patch_splits_its_row_off_once() -> None:
    rows = SharedRows([0, 0, 0], torch.device("cpu"))
    assert rows.split(1, 1) and rows.follows == [0, 1, 0]
    assert not rows.split(1, 2)  # already its own: later patches of the row write in place
    assert rows.split(0, 2) and not rows.split(2, 3)  # the last member keeps the shared row
    assert rows.index.tolist() == [2, 1, 0] and rows.members.tolist() == [2, 1, 0]


def test_auto_picks_the_lean_forward_for_supported_families_only(tiny_models, tiny_runtimes) -> None:
    assert set(lean_families()) == {"llama", "mistral", "qwen2", "qwen3", "gemma3_text"}
    for arch in lean_families():
        assert resolve_forward("auto", tiny_models[arch].model) == "lean"
        assert tiny_runtimes[arch].lean is not None
    for arch in ("gpt2", "gpt_neox"):
        assert resolve_forward("auto", tiny_models[arch].model) == "transformers"
        assert tiny_runtimes[arch].lean is None
    with pytest.raises(ValueError, match="forward 'lean' is unavailable for this model: model_type 'gpt2'"):
        resolve_forward("lean", tiny_models["gpt2"].model)
    with pytest.raises(ValueError, match="forward must be one of"):
        resolve_forward("fast", tiny_models["llama"].model)  # type: ignore[arg-type]
