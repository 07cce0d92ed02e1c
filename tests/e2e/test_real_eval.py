"""The experiments on a real model, small enough for `make test`: the protocol's invariants hold there."""

from __future__ import annotations

import pytest
from tests.conftest import data_dir

from patchscope.engine.template import tokenize_prompt
from patchscope.eval import attributes, description
from patchscope.eval.common import mentions, plain_texts, read_relations
from patchscope.eval.plain import batched_plain_texts

pytestmark = pytest.mark.realmodel


def test_attributes_on_smollm2_read_a_state_off_position_zero_and_keep_their_controls(smollm2):
    (relation,) = read_relations(data_dir() / "lre", ["country_capital_city"])
    # SmolLM2 adds no BOS: a bare one-token subject would sit at position 0, the attention sink.
    assert len(tokenize_prompt(smollm2.tokenizer, attributes.SOURCE_CONTEXT.format("France"))) >= 2
    result = attributes.run(smollm2, [relation], layers=[6, 14], max_samples=8, probe_samples=16)
    (entry,) = result["relations"]
    assert entry["known"] >= 3, "SmolLM2 names few capitals in plain text"
    summary = result["all"]
    for s in entry["samples"]:
        assert mentions(s["plain"], s["object"])  # only samples the model knows are scored
        assert s["control"] == entry["samples"][0]["control"]  # one no-patch control per template
    # Baselines that can fail: the majority class cannot name eight different capitals.
    assert summary["majority_class"]["p"] < 0.5
    assert 0.0 <= summary["paper_mean_over_l_of_any_l_star"]["mean"] <= summary["any_pair_oracle"]["p"]


def test_batched_plain_prompts_decode_as_the_engine_does_on_smollm2(smollm2):
    prompts = [
        "The Eiffel Tower is in the country of",
        "Paris",
        "Let's think step by step. The capital of Italy is",
    ]
    assert batched_plain_texts(smollm2, prompts, 10) == plain_texts(smollm2, prompts, 10)


def test_the_popularity_proxy_finds_a_famous_name_less_surprising_than_a_made_up_one(smollm2):
    famous, made_up = description.name_surprisal(smollm2, ["Barack Obama", "Qwzrtelb Fmoxuvin"])
    assert famous < made_up
