"""Smoke versions of `patchscope eval` on tiny random models: the output format, invariants that hold by
construction, and metrics recomputed from the generations the results store."""

from __future__ import annotations

import json

import pytest
import torch
from tests.conftest import data_dir

from patchscope.eval import attributes, multihop, next_token
from patchscope.eval.common import (
    Relation,
    Sample,
    contains,
    placeholder_template,
    plain_texts,
    read_relations,
)
from patchscope.eval.report import write_report
from patchscope.mapping.pipeline import fit_mappings
from patchscope.mapping.registry import MappingRegistry

CORPUS = data_dir() / "wikitext-2" / "valid.txt"


@pytest.fixture(scope="module")
def same_model_result(llama) -> dict:
    return next_token.run(llama, llama, CORPUS, positions=40, fit_positions=240, per_text=4)


def test_next_token_reports_every_layer_and_reads_the_last_layer_exactly(same_model_result, llama):
    result = same_model_result
    last = llama.facts.num_layers - 1
    assert result["positions"] == 40 and [e["layer"] for e in result["layers"]] == list(range(last + 1))
    assert [(p["source_layer"], p["target_layer"]) for p in result["pairs"]] == [
        (k, k) for k in range(last + 1)
    ]
    # The last block's output through the head is the model's own prediction: both readers must agree with it.
    assert result["layers"][-1]["logit_lens"]["precision_at_1"] == 1.0
    assert result["pairs"][-1]["patchscope"]["precision_at_1"] == 1.0
    for entry in result["pairs"]:
        assert (
            0.0 <= entry["patchscope"]["pattern_rate"] <= 1.0 and entry["patchscope"]["surprisal_bits"] >= 0
        )
    json.dumps(result)  # JSON-ready


def test_cross_model_next_token_goes_through_the_registered_mappings(tiny_models, tmp_path):
    source, target = tiny_models["llama"], tiny_models["qwen2"]
    registry = MappingRegistry(tmp_path / "maps")
    fit_mappings(source, target, [(1, 1), (3, 2)], "affine", CORPUS, registry, max_words=1500)
    result = next_token.run(source, target, CORPUS, positions=24, fit_positions=200, registry=registry)
    assert not result["same_model"]
    assert [(p["source_layer"], p["target_layer"]) for p in result["pairs"]] == [(1, 1), (3, 2)]
    assert all(isinstance(p["mapping_r2"], float) and p["mapping_id"] for p in result["pairs"])
    next_token.plot_pairs(result, tmp_path / "cross.png")
    assert (tmp_path / "cross.png").stat().st_size > 0


def test_cross_model_without_mappings_says_which_command_makes_them(tiny_models, tmp_path):
    with pytest.raises(FileNotFoundError, match="fit-mapping"):
        next_token.run(
            tiny_models["llama"],
            tiny_models["qwen2"],
            CORPUS,
            positions=8,
            fit_positions=80,
            registry=MappingRegistry(tmp_path / "empty"),
        )


def known_relation(model, name: str, template: str, subjects: list[str]) -> Relation:
    """A relation whose objects are what the model itself says: every sample is known in plain text."""
    texts = plain_texts(model, [template.format(s) for s in subjects], 8)
    samples = [Sample(s, t.split()[0]) for s, t in zip(subjects, texts, strict=True) if t.split()]
    assert samples, "the tiny model generated only whitespace"
    return Relation(name, "test", template, tuple(samples))


def test_attribute_accuracy_is_computed_from_the_stored_generations(llama, tmp_path):
    relation = known_relation(
        llama, "tiny_relation", "The capital of {} is", ["France", "the river", "Paris"]
    )
    result = attributes.run(llama, [relation], layers=[0, 2, 3], max_samples=None)
    (entry,) = result["relations"]
    assert entry["known"] == entry["tried"] == len(relation.samples) == result["evaluated"]
    for layer in ("0", "2", "3"):
        recomputed = (
            sum(contains(s["patchscope"][layer], s["object"]) for s in entry["samples"]) / entry["known"]
        )
        assert entry["accuracy"][layer] == recomputed
    assert result["any_layer_oracle"] >= result["best_layer_accuracy"]
    attributes.plot(result, tmp_path / "attributes.png")


def test_the_probe_separates_separable_states_and_never_guesses_an_unseen_object():
    states = torch.cat([torch.randn(10, 8) + 5 * torch.eye(8)[0], torch.randn(10, 8) - 5 * torch.eye(8)[0]])
    labels = ["a"] * 10 + ["b"] * 10
    assert attributes.probe_accuracy(states, labels) == 1.0
    assert attributes.probe_accuracy(torch.randn(6, 8), ["u", "v", "w", "x", "y", "z"]) == 0.0


def test_lre_templates_put_the_placeholder_in_one_word_and_files_decode_escapes():
    assert placeholder_template("The capital city of {} is") == ("The capital city of{} is", " x")
    assert placeholder_template("{} plays the") == ("{} plays the", "x")
    (capitals,) = read_relations(data_dir() / "lre", ["country_capital_city"])
    assert any(s.object == "Brasília" for s in capitals.samples)
    with pytest.raises(FileNotFoundError, match="no_such_relation"):
        read_relations(data_dir() / "lre", ["no_such_relation"])


def test_two_hop_queries_join_relations_through_the_bridge_entity(llama, tmp_path):
    first = known_relation(llama, "landmark_in_country", "{} is in the country of", ["Big Ben", "the tower"])
    bridges = sorted({s.object for s in first.samples})
    second = known_relation(llama, "country_capital_city", "The capital city of {} is", bridges)
    joined = multihop.join([first, second])
    (composition,) = [c for c in joined if c.second == "country_capital_city"]
    assert {q.subject for q in joined[composition]} == {s.subject for s in first.samples}
    assert multihop.first_answer(" France, a country.\nMore") == "France"

    result = multihop.run(llama, [first, second], layer_step=2, max_samples=None)
    assert result["found"]["landmark_in_country -> country_capital_city"] == len(first.samples)
    n = result["evaluated"]
    assert n == result["tried"] == len(first.samples)  # both hops are the model's own answers
    recomputed = sum(contains(q["vanilla"], q["answer"]) for q in result["queries"]) / n
    assert result["vanilla"] == recomputed
    assert result["patchscope_oracle"] >= result["patchscope_best_pair_accuracy"]
    assert 0.0 <= result["unpatched_template"] <= 1.0
    assert multihop.literal("The capital city of {} is") == "The capital city of x is"
    assert set(result["pair_accuracy"]) == {f"{a}:{b}" for a in (0, 2) for b in (0, 2)}
    multihop.plot(result, tmp_path / "multihop.png")


def test_the_report_renders_saved_results_and_names_the_commands_of_missing_ones(same_model_result, tmp_path):
    folder = tmp_path / "docs" / "results"
    folder.mkdir(parents=True)
    name = "next_token.smollm2-135m.smollm2-135m"
    (folder / f"{name}.json").write_text(json.dumps(same_model_result))
    next_token.plot(same_model_result, folder / f"{name}.png")
    page = write_report(folder, tmp_path / "docs" / "results.md").read_text()
    assert f"| 0 | {same_model_result['pairs'][0]['patchscope']['precision_at_1']:.3f} |" in page
    assert "](results/next_token.smollm2-135m.smollm2-135m.png)" in page
    assert "_Not run yet: `patchscope eval attributes --model smollm2-135m`._" in page


def test_the_eval_commands_parse():
    from patchscope.cli import build_parser

    args = build_parser().parse_args(["eval", "next-token", "--positions", "5", "--json"])
    assert args.positions == 5 and args.target is None and args.func.__name__ == "cmd_next_token"
    args = build_parser().parse_args(["eval", "multi-hop", "--layer-step", "2"])
    assert args.layer_step == 2
