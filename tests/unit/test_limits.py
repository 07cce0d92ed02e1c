"""Planning refuses every request field past its limit, before any model runs, naming field, limit and value.

Pure: fake model facts and no models. Each case was accepted (or an INTERNAL error further on) before the
limit existed.
"""

from __future__ import annotations

import pytest
import torch

from patchscope.engine.errors import InvalidArgument
from patchscope.engine.generation import GenerationConfig
from patchscope.engine.validation import ModelFacts
from patchscope.explain.limits import Limits
from patchscope.explain.plan import ModelInfo, no_mappings, plan_activations, plan_explain, plan_extract
from patchscope.explain.request import ActivationsRequest, ExplainRequest, TargetSpec

SOURCE = ModelInfo("src", "fp-src", ModelFacts("src", num_layers=4, hidden_size=8, vocab_size=100))
LIMITS = Limits(max_sites=16, max_layers=8, max_template_chars=100, max_template_bytes=60)
TOKENS = ["<s>", "hello", " world"]


def explain(**target) -> ExplainRequest:
    layers = target.pop("layers_", (1,))
    positions = target.pop("positions_", (-1,))
    return ExplainRequest("src", "hello world", layers, TargetSpec("src", **target), positions)


def plan(request: ExplainRequest):
    return plan_explain(request, SOURCE, SOURCE, TOKENS, LIMITS, no_mappings)


def refused(call, field: str, *words: str) -> str:
    with pytest.raises(InvalidArgument) as error:
        call()
    assert error.value.field == field, str(error.value)
    assert error.value.limit is not None and error.value.value is not None, str(error.value)
    for word in words:
        assert word in str(error.value)
    return str(error.value)


def test_an_ordinary_request_is_planned():
    assert len(plan(explain(layers_=(1, 2), positions_=(1, -1))).sites) == 4


@pytest.mark.parametrize("temperature", [1e-40, 1e-3, -0.0001, float("nan"), float("inf"), 101.0])
def test_temperatures_that_would_make_nan_probabilities_are_refused(temperature):
    generation = GenerationConfig(temperature=temperature)
    refused(lambda: plan(explain(generation=generation)), "target.generation.temperature", "0 (greedy)")


@pytest.mark.parametrize("temperature", [0.0, 0.01, 0.7, 100.0])
def test_greedy_and_ordinary_temperatures_are_accepted(temperature):
    plan(explain(generation=GenerationConfig(temperature=temperature)))


def test_a_template_of_many_multibyte_characters_is_refused_by_its_bytes():
    template = "é" * 40 + " {}"  # 43 characters (< 100) but 83 UTF-8 bytes (> 60): more tokens than allowed
    message = refused(lambda: plan(explain(template=template)), "target.template", "too many tokens")
    assert "60 UTF-8 bytes" in message and "83" in message


def test_the_50000_character_template_of_the_issue_is_refused_by_its_characters():
    refused(lambda: plan(explain(template="word " * 10_000 + "{}")), "target.template", "characters")


@pytest.mark.parametrize(
    ("mapping", "words"),
    [
        ("m" * 201, ("200 bytes", "201")),
        ("é" * 101, ("200 bytes", "202")),
        ("a\x00b", ("printable",)),
        ("../x", ("path separators",)),
        ("a\\b", ("path separators",)),
    ],
)
def test_mapping_ids_that_cannot_name_a_registry_file_are_refused(mapping, words):
    refused(lambda: plan(explain(mapping=mapping)), "target.mapping", *words)


def test_lists_are_counted_before_their_entries_are_resolved():
    refused(lambda: plan(explain(layers_=(0,) * 9)), "layers", "<= 8")
    refused(lambda: plan(explain(positions_=(0,) * 17)), "positions", "<= 16")
    refused(lambda: plan(explain(layers=(0,) * 9)), "target.layers", "<= 8")


def extract(layers, positions=(-1,), tokens=TOKENS):
    return lambda: plan_extract(SOURCE, "hello world", layers, positions, tokens, LIMITS)


def test_an_extraction_names_each_layer_once():
    assert extract([0, 1, 2])() == ([0, 1, 2], [2])
    refused(extract([0, 0]), "layers", "more than once", "distinct")
    refused(extract([3, -1]), "layers", "more than once")  # -1 is layer 3 of 4


def test_the_2000_copies_of_layer_0_of_the_issue_are_refused_by_count():
    refused(extract([0] * 2000, list(range(3))), "layers", "too many layers", "2000")


def test_an_extraction_counts_its_positions_against_the_prompt_token_limit():
    limits = Limits(max_prompt_tokens=4)
    with pytest.raises(InvalidArgument, match=r"positions: too many positions; allowed: <= 4; got: 5"):
        plan_extract(SOURCE, "hello world", [1], [0] * 5, TOKENS, limits)


def activations(n=2, tokens=(), layers=(1,), positions=()) -> ActivationsRequest:
    return ActivationsRequest("src", torch.zeros(n, 8), TargetSpec("src"), layers, positions, tokens)


def plan_states(request: ActivationsRequest, limits: Limits = LIMITS):
    return lambda: plan_activations(request, SOURCE, SOURCE, limits, no_mappings)


def test_provenance_lists_are_counted_before_they_are_matched_to_rows():
    refused(plan_states(activations(tokens=("a",) * 17)), "provenance.tokens", "<= 16")
    refused(plan_states(activations(layers=(1,) * 17)), "provenance.layers", "<= 16")
    refused(plan_states(activations(positions=(1,) * 17)), "provenance.positions", "<= 16")


def test_provenance_tokens_are_bounded_in_bytes_altogether():
    limits = Limits(max_token_chars=100, max_provenance_bytes=150)
    assert plan_states(activations(tokens=("a" * 70, "b" * 70)), limits)().source_tokens
    message = refused(plan_states(activations(tokens=("é" * 50, "b" * 70)), limits), "provenance.tokens")
    assert "150 UTF-8 bytes" in message and "170" in message
