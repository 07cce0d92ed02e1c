"""The token-step budget and stop sequences are checked in planning, before any model runs."""

from __future__ import annotations

import pytest

from patchscope.engine.errors import InvalidArgument
from patchscope.engine.generation import GenerationConfig
from patchscope.engine.validation import ModelFacts
from patchscope.explain.limits import Limits
from patchscope.explain.plan import ModelInfo, no_mappings, plan_activations, plan_explain
from patchscope.explain.request import ActivationsRequest, ExplainRequest, TargetSpec

SOURCE = ModelInfo("src", "fp-src", ModelFacts("src", num_layers=4, hidden_size=8, vocab_size=100))
TOKENS = ["<s>", "hello", " world"]
TEMPLATE = "x" * 40 + " {}"  # 43 bytes: at most 43 + 1 (filler "?") + 2 = 46 tokens (template_token_bound)


def plan(limits: Limits, positions=(1, 2), **target):
    request = ExplainRequest("src", "hello world", (1, 2), TargetSpec("src", **target), positions)
    return plan_explain(request, SOURCE, SOURCE, TOKENS, limits, no_mappings)


def test_a_request_over_the_token_step_budget_is_refused_naming_it():
    generation = GenerationConfig(max_new_tokens=5)
    steps = 5 * (46 + 5)  # 4 sites + the control row, (template + new) tokens each
    plan(Limits(max_token_steps=steps), template=TEMPLATE, generation=generation)
    with pytest.raises(InvalidArgument) as error:
        plan(Limits(max_token_steps=steps - 1), template=TEMPLATE, generation=generation)
    assert error.value.field == "target" and "token-steps" in str(error.value)
    assert error.value.value == steps
    # Without the control row the same request fits again.
    plan(Limits(max_token_steps=steps - 1), template=TEMPLATE, generation=generation, controls=False)


def test_the_budget_applies_to_activations_too():
    import torch

    request = ActivationsRequest(
        source="src",
        fingerprint="fp-src",
        states=torch.zeros(6, 8),
        layers=(1,),
        target=TargetSpec("src", template=TEMPLATE),
    )
    with pytest.raises(InvalidArgument, match="token-steps"):
        plan_activations(request, SOURCE, SOURCE, Limits(max_token_steps=100), no_mappings)


@pytest.mark.parametrize(
    ("stop", "field"),
    [
        (("",), "target.generation.stop[0]"),
        (("a", "b" * 65), "target.generation.stop[1]"),
        (tuple("abcdefghi"), "target.generation.stop"),
    ],
)
def test_bad_stop_sequences_are_refused_by_field(stop, field):
    with pytest.raises(InvalidArgument) as error:
        plan(Limits(), generation=GenerationConfig(stop=stop))
    assert error.value.field == field


def test_ordinary_stop_sequences_are_planned():
    assert plan(Limits(), generation=GenerationConfig(stop=("\n", " ->"))).generation.stop == ("\n", " ->")
