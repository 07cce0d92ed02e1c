"""The mean-state control: each target layer's mean state patched in a row of its own, beside the sites."""

from __future__ import annotations

import pytest
import torch

from patchscope.engine.errors import InvalidArgument
from patchscope.engine.generation import GenerationConfig, PatchedRow, RowPatch, patched_generate
from patchscope.engine.hooks import capture
from patchscope.engine.layer_stats import WARMUP_TEXT, layer_stats
from patchscope.engine.lens import logit_lens
from patchscope.engine.presets import PRESETS
from patchscope.engine.template import tokenize_prompt
from patchscope.explain import ExplainRequest, LocalBackend, TargetSpec, explain

CONFIG = GenerationConfig(max_new_tokens=6)


def run(model, runtime, layers=(1, 2, 3), **spec):
    request = ExplainRequest(
        source=model.id,
        prompt="The lobster is red",
        layers=layers,
        positions=(-1, -2),
        target=TargetSpec(model=model.id, generation=CONFIG, mean_state_control=True, **spec),
    )
    return explain(LocalBackend.of(model, runtime), request).results


def test_the_mean_state_is_the_mean_of_the_layers_states_over_the_warm_up_text(tiny):
    ids = tokenize_prompt(tiny.tokenizer, WARMUP_TEXT)
    layers = list(range(tiny.facts.num_layers))
    captured = capture(tiny, torch.tensor([ids]), layers, list(range(1, len(ids))))
    stats = layer_stats(tiny)
    for layer in layers:
        assert torch.allclose(stats.means[layer], captured[layer].float().mean(dim=0), atol=1e-6)
        assert stats.norms[layer] == pytest.approx(float(captured[layer].float().norm(dim=-1).mean()))


@pytest.mark.parametrize("preset", ["identity", "attribute"])
def test_each_site_reports_what_its_layers_mean_state_generates(tiny, tiny_runtime, preset):
    """Equal to a plain patched generation of the template with that layer's mean state at the placeholder."""
    results = run(tiny, tiny_runtime, preset=preset)
    means = layer_stats(tiny).means
    p = PRESETS[preset]
    for r in results:
        row = PatchedRow(
            p.template, p.filler, (RowPatch(layer=r.site.target_layer, vector=means[r.site.target_layer]),)
        )
        (alone,) = patched_generate(tiny_runtime, [row], CONFIG)
        c = r.control
        assert c.mean_state_explanation == alone.text
        assert c.mean_state_answer == p.answer(alone.text)
        assert c.same_as_mean_state == (r.answer.strip().casefold() == c.mean_state_answer.strip().casefold())


def test_the_mean_state_rows_leave_the_sites_and_their_controls_unchanged(tiny, tiny_runtime):
    with_mean = run(tiny, tiny_runtime)
    request = ExplainRequest(
        source=tiny.id,
        prompt="The lobster is red",
        layers=(1, 2, 3),
        positions=(-1, -2),
        target=TargetSpec(model=tiny.id, generation=CONFIG),
    )
    without = explain(LocalBackend.of(tiny, tiny_runtime), request).results
    for a, b in zip(with_mean, without, strict=True):
        assert a.explanation == b.explanation
        assert a.control.unpatched_explanation == b.control.unpatched_explanation
        assert a.control.patch_effect == pytest.approx(b.control.patch_effect, abs=1e-5)
        assert a.control.dependence == pytest.approx(b.control.dependence, abs=1e-4)
        assert b.control.mean_state_answer is None and b.control.same_as_mean_state is None
    assert "mean_state_answer" in with_mean[0].to_json() and "same_as_mean_state" in without[0].to_json()


def test_the_logit_lens_reads_each_layers_mean_state(tiny, tiny_runtime):
    results = run(tiny, tiny_runtime, preset="logit-lens", top_k=3)
    means = layer_stats(tiny).means
    for r in results:
        expected, _ = logit_lens(tiny, means[r.site.target_layer], 3)
        assert r.control.mean_state_explanation == expected


def test_the_mean_state_control_needs_the_controls(tiny, tiny_runtime):
    with pytest.raises(InvalidArgument, match=r"target\.mean_state_control"):
        run(tiny, tiny_runtime, controls=False)
