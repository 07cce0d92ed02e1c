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


def _reference_logprobs(runtime, continuation):
    """Per-token log-probabilities of a continuation alone, log_softmax over the causal LM's own logits."""
    model = runtime.model
    tokens = tokenize_template(model.tokenizer, PRESET.template, PRESET.filler)
    ids = torch.tensor([[*tokens.ids, *continuation]])
    with torch.inference_mode():
        logits = model.model(ids).logits[0].float()  # [T + l, V]
    lp = torch.log_softmax(logits[len(tokens.ids) - 1 : -1], dim=-1)  # [l, V]
    return lp.gather(1, torch.tensor(continuation)[:, None])[:, 0].tolist()


def test_repeated_and_prefix_continuations_score_as_each_one_alone(tiny, tiny_runtime):
    """Scoring each distinct prefix once (repeats, prefixes of longer ones) changes no score."""
    v = tiny.tokenizer.vocab_size
    a, b = [5 % v, 9 % v, 3 % v, 7 % v], [5 % v, 9 % v, 11 % v]
    continuations = [a, a, a[:2], b, [], a[:1], b]
    got = score_continuations(tiny_runtime, PRESET.template, PRESET.filler, continuations)
    want = [sum(lp) / len(lp) for lp in (_reference_logprobs(tiny_runtime, c) for c in continuations if c)]
    assert got[4] is None
    assert [g for g in got if g is not None] == pytest.approx(want, abs=1e-4)


def test_prefixes_the_control_generated_are_read_from_its_own_logprobs(tiny, tiny_runtime):
    """`known` log-probabilities are used for every continuation's prefixes they cover, and only those."""
    v = tiny.tokenizer.vocab_size
    control, other = [4 % v, 8 % v, 2 % v], [4 % v, 8 % v, 6 % v, 1 % v]
    # No log-probability is positive: 9.0 shows which terms came from `known`.
    marked = {tuple(control[: t + 1]): 9.0 for t in range(len(control))}
    got = score_continuations(
        tiny_runtime, PRESET.template, PRESET.filler, [control, other, control[:2]], marked
    )
    tail = _reference_logprobs(tiny_runtime, other)[2:]
    assert got[0] == got[2] == 9.0
    assert got[1] == pytest.approx((9.0 + 9.0 + sum(tail)) / 4, abs=1e-4)
    prefixes = [tuple(control[: t + 1]) for t in range(3)]
    true = dict(zip(prefixes, _reference_logprobs(tiny_runtime, control), strict=True))
    honest = score_continuations(tiny_runtime, PRESET.template, PRESET.filler, [control, other], true)
    alone = score_continuations(tiny_runtime, PRESET.template, PRESET.filler, [control, other])
    assert honest == pytest.approx(alone, abs=1e-4)


def test_the_control_event_comes_last_with_every_rows_unpatched_score(tiny, tiny_runtime):
    """The target scores the rows itself: the control's finished event is the last and carries them."""
    tokens = tokenize_template(tiny.tokenizer, PRESET.template, PRESET.filler)
    ids = torch.tensor([tokens.ids])
    own = capture(tiny, ids, [1], [tokens.placeholder])[1][0]  # [d]
    vectors = [own.float(), torch.randn_like(own).float() * own.norm(), own.float()]
    request = GenerateRequest(
        model=tiny.id,
        template=PRESET.template,
        filler=PRESET.filler,
        layers=[1, 1, 1],
        vectors=vectors,
        config=CONFIG,
        control=True,
    )

    async def events():
        out = []
        async for step in LocalBackend.of(tiny, tiny_runtime).generate(request):
            out.append(step)
        return out

    steps = asyncio.run(events())
    last = steps[-1][-1]
    assert last.row == 3 and last.finished
    assert all(e.row != 3 or not e.finished for step in steps[:-1] for e in step)
    assert sum(e.finished for step in steps for e in step) == 4
    generated = [[e.token_id for step in steps for e in step if e.row == r and not e.stop] for r in range(3)]
    read_off = dict(last.unpatched_prefixes)  # every row's first token, read off the control's first step
    assert all((g[0],) in read_off for g in generated if g)
    assert last.unpatched_logprobs == pytest.approx(
        score_continuations(tiny_runtime, PRESET.template, PRESET.filler, generated), abs=1e-4
    )


LENS = PRESETS["logit-lens"]


def _lens_run(model, runtime, **spec):
    request = ExplainRequest(
        source=model.id,
        prompt="The lobster is red",
        layers=(1, model.layout.num_layers - 1),
        target=TargetSpec(model=model.id, preset="logit-lens", top_k=3, **spec),
    )
    return explain(LocalBackend.of(model, runtime), request).results


def test_the_logit_lens_control_is_the_unpatched_reading_at_the_site(tiny, tiny_runtime):
    """The lens's control reads the target's own state at the placeholder; at the last block that is the
    target's next-token distribution of the template with no patch."""
    results = _lens_run(tiny, tiny_runtime)
    tokens = tokenize_template(tiny.tokenizer, LENS.template, LENS.filler)
    ids = torch.tensor([tokens.ids])
    for r in results:
        own = capture(tiny, ids, [r.site.target_layer], [tokens.placeholder])[r.site.target_layer][0]
        probs = torch.softmax(tiny.layout.logits(own[None]).float(), dim=-1)[0]
        c = r.control
        assert c.unpatched_explanation == tiny.tokenizer.decode([int(probs.argmax())])
        assert [p for _, p in c.unpatched_top_k] == pytest.approx(probs.topk(3).values.tolist(), rel=1e-5)
        assert c.unpatched_answer == LENS.answer(c.unpatched_explanation)
        assert c.same_as_unpatched == (r.answer.casefold() == c.unpatched_answer.casefold())
        assert 0.0 <= c.patch_effect <= 1.0
        assert c.dependence == pytest.approx(c.explanation_logprob - c.unpatched_logprob)
    with torch.inference_mode():
        next_token = tiny.model(ids).logits[0, -1].float().argmax()
    assert results[-1].control.unpatched_explanation == tiny.tokenizer.decode([int(next_token)])


def test_the_lens_of_the_targets_own_state_has_no_effect(tiny, tiny_runtime):
    tokens = tokenize_template(tiny.tokenizer, LENS.template, LENS.filler)
    own = capture(tiny, torch.tensor([tokens.ids]), [2], [tokens.placeholder])[2][0]  # [d]
    request = ActivationsRequest(
        source=tiny.id,
        states=own[None].float(),
        layers=(2,),
        target=TargetSpec(model=tiny.id, preset="logit-lens", layers=(2,)),
    )
    (result,) = explain(LocalBackend.of(tiny, tiny_runtime), request).results
    c = result.control
    assert c.patch_effect == pytest.approx(0.0, abs=1e-6)
    assert c.dependence == pytest.approx(0.0, abs=1e-5)
    assert c.same_as_unpatched and result.explanation == c.unpatched_explanation


def test_logit_lens_controls_can_be_turned_off(llama, llama_runtime):
    assert all(r.control is None for r in _lens_run(llama, llama_runtime, controls=False))
