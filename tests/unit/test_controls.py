"""The unpatched control and the signals derived from it, checked against the engine computed another way."""

from __future__ import annotations

import asyncio

import pytest
import torch

from patchscope.engine.generation import GenerationConfig, PatchedRow, patched_generate
from patchscope.engine.hooks import capture
from patchscope.engine.presets import PRESETS
from patchscope.engine.scoring import score_continuations
from patchscope.engine.streaming import GenerateRequest
from patchscope.engine.template import tokenize_template
from patchscope.explain import ActivationsRequest, ExplainRequest, LocalBackend, TargetSpec, explain

CONFIG = GenerationConfig(max_new_tokens=6)
PRESET = PRESETS["identity"]


def run(model, runtime, **spec):
    request = ExplainRequest(
        source=model.id,
        prompt="The lobster is red",
        layers=(1, 2),
        target=TargetSpec(model=model.id, generation=CONFIG, **spec),
    )
    return explain(LocalBackend.of(model, runtime), request).results


def test_the_control_is_a_plain_generation_of_the_template_with_no_patch(tiny, tiny_runtime):
    results = run(tiny, tiny_runtime)
    (plain,) = patched_generate(tiny_runtime, [PatchedRow(PRESET.template, PRESET.filler, ())], CONFIG)
    assert all(r.control.unpatched_explanation == plain.text for r in results)
    assert all(r.control.unpatched_answer == PRESET.answer(plain.text) for r in results)
    for r in results:
        assert 0.0 <= r.control.patch_effect <= 1.0
        assert r.control.same_as_unpatched == (r.answer.casefold() == r.control.unpatched_answer.casefold())


def test_controls_can_be_turned_off(llama, llama_runtime):
    assert all(r.control is None for r in run(llama, llama_runtime, controls=False))


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_patching_the_targets_own_state_has_no_effect(tiny, tiny_runtime, layer):
    """The target's own state at the placeholder, patched back in: TV 0, dependence 0, same answer."""
    tokens = tokenize_template(tiny.tokenizer, PRESET.template, PRESET.filler)
    ids = torch.tensor([tokens.ids])
    own = capture(tiny, ids, [layer], [tokens.placeholder])[layer][0]  # [d]
    request = ActivationsRequest(
        source=tiny.id,
        states=own[None].float(),
        layers=(layer,),
        target=TargetSpec(model=tiny.id, generation=CONFIG, layers=(layer,)),
    )
    (result,) = explain(LocalBackend.of(tiny, tiny_runtime), request).results
    c = result.control
    assert c.patch_effect == pytest.approx(0.0, abs=1e-4)
    assert c.same_as_unpatched and result.explanation == c.unpatched_explanation
    assert c.dependence == pytest.approx(0.0, abs=1e-3)


def test_teacher_forced_scores_equal_the_generations_own(tiny, tiny_runtime):
    """score_continuations on the control's own tokens gives the mean log-probability generation saw."""
    backend = LocalBackend.of(tiny, tiny_runtime)
    request = GenerateRequest(
        model=tiny.id,
        template=PRESET.template,
        filler=PRESET.filler,
        layers=[],
        vectors=[],
        config=CONFIG,
        control=True,
    )

    async def events():
        out = []
        async for step in backend.generate(request):
            out.extend(step)
        return out

    got = asyncio.run(events())
    tokens = [e.token_id for e in got if not e.stop]
    (finished,) = [e for e in got if e.finished]
    (scored,) = score_continuations(tiny_runtime, PRESET.template, PRESET.filler, [tokens])
    assert finished.patch_effect == 0.0
    assert scored == pytest.approx(finished.logprob, abs=1e-4)  # two forwards, one summation order apart
