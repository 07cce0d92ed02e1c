"""Smoke versions of `patchscope eval` on tiny random models: the output format, invariants that hold by
construction, and metrics recomputed from the generations the results store."""

from __future__ import annotations

import json

import pytest
import torch
from tests.conftest import data_dir

from patchscope.engine.generation import PatchedRow, RowPatch
from patchscope.engine.layer_stats import layer_stats
from patchscope.engine.presets import get_preset
from patchscope.eval import attributes, description, multihop, next_token, next_token_plots
from patchscope.eval.common import (
    Relation,
    Sample,
    hits_string,
    logistic_probe,
    majority_baseline,
    mean_state_texts,
    mentions,
    patched_texts,
    placeholder_template,
    plain_texts,
    proportion,
    read_relations,
    rouge_l,
    sign_test,
    wilson,
)
from patchscope.eval.next_token_readers import same_token
from patchscope.eval.plain import batched_plain_texts
from patchscope.eval.report import write_report
from patchscope.eval.report_format import _share
from patchscope.eval.report_next_token import _mean_state_cell, _next_token_against_mean_state
from patchscope.eval.report_sections import _against_mean_state, multi_hop_section
from patchscope.eval.timed import record
from patchscope.mapping.corpus import read_documents, split_documents
from patchscope.mapping.pipeline import fit_mappings
from patchscope.mapping.registry import MappingRegistry
from patchscope.mapping.resolve import resolve_mappings

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
    assert result["layers"][-1]["logit_lens"]["surprisal_nats"] >= 0
    for entry in result["pairs"]:
        ps = entry["patchscope"]
        assert 0.0 <= ps["pattern_rate"] <= 1.0 and ps["reference_surprisal_bits"] >= 0
        # Every figure is recomputable from the stored per-position outcomes, with its n and interval.
        assert ps["p_at_1"]["k"] == ps["hits"].count("1") and ps["p_at_1"]["n"] == result["positions"]
        assert ps["p_at_1"]["ci"] == [round(v, 4) for v in wilson(ps["hits"].count("1"), result["positions"])]
        control = result["identity_control"].strip()
        assert ps["same_as_unpatched"]["k"] == sum(t.strip() == control for t in ps["top1"])
    json.dumps(result)  # JSON-ready


def test_next_token_scores_the_mean_state_answer_of_each_target_layer_against_every_reference(
    same_model_result, llama
):
    result = same_model_result
    preset = get_preset("identity")
    layers = [p["target_layer"] for p in result["pairs"]]
    expected = mean_state_texts(llama, preset.template, preset.filler, layers, 1)
    assert result["mean_state"] == {str(b): t for b, t in expected.items()}
    for entry in result["pairs"]:
        answer = expected[entry["target_layer"]]
        control = entry["mean_state_control"]
        hits = [same_token(answer, r) for r in result["references"]]
        assert control["answer"] == answer and control["hits"] == hits_string(hits)
        assert control["p_at_1"]["k"] == sum(hits) and control["p_at_1"]["n"] == result["positions"]
        same = entry["patchscope"]["same_as_mean_state"]
        assert same["k"] == sum(same_token(t, answer) for t in entry["patchscope"]["top1"])
    combined = next_token.combine([result, result])["summary"]["pairs"][0]
    first = result["pairs"][0]
    assert combined["mean_state_control"]["mean"] == first["mean_state_control"]["precision_at_1"]
    assert combined["mean_state_control"]["pooled"]["n"] == 2 * result["positions"]
    assert combined["same_as_mean_state"]["k"] == 2 * first["patchscope"]["same_as_mean_state"]["k"]


def test_cross_model_next_token_goes_through_the_registered_mappings(tiny_models, tmp_path):
    source, target = tiny_models["llama"], tiny_models["qwen2"]
    registry = MappingRegistry(tmp_path / "maps")
    fit_mappings(source, target, [(1, 1), (3, 2)], "affine", CORPUS, registry, max_words=1500, seed=1)
    # The maps split the corpus with seed 1: a seed-0 evaluation would test on their fit documents.
    with pytest.raises(next_token.FittedOnEvaluation, match="split seed 1"):
        next_token.run(source, target, CORPUS, positions=8, fit_positions=80, registry=registry, seed=0)
    result = next_token.run(
        source, target, CORPUS, positions=24, fit_positions=200, registry=registry, seed=1
    )
    assert not result["same_model"]
    assert [(p["source_layer"], p["target_layer"]) for p in result["pairs"]] == [(1, 1), (3, 2)]
    assert all(isinstance(p["mapping_r2"], float) and p["mapping_id"] for p in result["pairs"])
    assert all(p["same_prompt"]["p_at_1"]["n"] == 24 for p in result["pairs"])
    # The cross-model description takes its corpus entities only from documents no map was fitted on.
    maps = resolve_mappings(registry, source, target, [(1, 1), (3, 2)])
    with pytest.raises(next_token.FittedOnEvaluation, match="split seed 1"):
        description.held_out_documents(maps, CORPUS, 0)
    held_out = description.held_out_documents(maps, CORPUS, 1)
    fitted = split_documents(read_documents(CORPUS), seed=1)
    assert held_out == list(fitted.test)
    assert held_out and not any(d in fitted.train + fitted.validation for d in held_out)
    assert result["text_only"]["p_at_1"]["k"] == result["text_only"]["hits"].count("1")
    preset = get_preset("identity")  # the mean-state control is the target's, at each pair's ℓ*
    expected = mean_state_texts(target, preset.template, preset.filler, [1, 2], 1)
    assert [p["mean_state_control"]["answer"] for p in result["pairs"]] == [expected[1], expected[2]]
    combined = next_token.combine([result, result])
    assert combined["summary"]["pairs"][0]["patchscope"]["spread"] == 0.0
    next_token_plots.plot_pairs(combined, tmp_path / "cross.png")
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


def test_attribute_figures_are_recomputed_from_the_stored_outcomes(llama, tmp_path):
    relation = known_relation(
        llama, "tiny_relation", "The capital of {} is", ["France", "the river", "Paris", "a cat", "the sea"]
    )
    letters = Relation("letters", "test", "{} starts with", (Sample("cat", "c"), Sample("dog", "d")))
    result = attributes.run(llama, [relation, letters], layers=[1, 3], max_samples=None, probe_samples=10)
    assert [d["relation"] for d in result["dropped_relations"]] == ["letters"]
    (entry,) = result["relations"]
    assert entry["known"] == len(entry["samples"]) == result["evaluated"]
    assert entry["template"] == "The capital of {} is"  # placeholder not at position 0: no lead
    paper = []
    for s in entry["samples"]:
        assert len(s["hits"]) == 4 and len(s["outputs"]) == 4
        assert s["hits"] == "".join("1" if mentions(t, s["object"]) else "0" for t in s["outputs"])
        paper.append(sum(s["hits"][2 * a : 2 * a + 2] != "00" for a in range(2)) / 2)
        # The mean-state outcomes are recomputed from the relation's stored mean-state answers.
        assert s["mean_state_hits"] == "".join(
            "1" if mentions(entry["mean_state"][str(b)], s["object"]) else "0" for b in (1, 3)
        )
        assert s["same_as_mean_state"] == "".join(
            "1" if attributes.first_line(t) == attributes.first_line(entry["mean_state"][str(b)]) else "0"
            for t, b in zip(s["outputs"], [1, 3, 1, 3], strict=True)
        )
    summary = result["all"]
    if summary["n"]:
        assert summary["paper_mean_over_l_of_any_l_star"]["mean"] == pytest.approx(sum(paper) / len(paper))
        assert summary["any_pair_oracle"]["p"] >= summary["diagonal_mean_over_l"]["mean"] - 1e-9
    assert attributes.target_template("{} plays the") == "Fact: {} plays the"
    attributes.plot(result, tmp_path / "attributes.png")
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "attributes.smollm2-135m.json").write_text(json.dumps(result))
    page = write_report(folder, tmp_path / "results.md").read_text()
    assert "mean-state control, some ℓ* |" in page and "equal to the mean-state answer at the same ℓ*" in page
    # ℓ* = 3 is the last block: a patch there reaches no later token, so both controls are met exactly.
    samples = entry["samples"]
    assert all(s["same_as_unpatched"][1::2] == s["same_as_mean_state"][1::2] == "11" for s in samples)
    assert "At ℓ* = 3 (the last block) every answer equals both controls" in page


def test_the_mean_state_control_is_the_patched_generation_of_each_layer_s_mean(llama):
    template, filler = placeholder_template("The capital of {} is")
    means = layer_stats(llama).means
    batched = mean_state_texts(llama, template, filler, [0, 2, 3], 6)
    for layer in (0, 2, 3):  # each row alone: batching the layers together changes nothing
        (alone,) = patched_texts(llama, [PatchedRow(template, filler, (RowPatch(layer, means[layer]),))], 6)
        assert batched[layer] == alone
    assert list(batched) == [0, 2, 3]


def attribute_sample(hits: str, mean_state_hits: str, same_as_mean_state: str) -> dict:
    """A hand-made evaluated sample on the grid ℓ, ℓ* ∈ (1, 3): only the outcomes `summarise` reads."""
    return {
        "hits": hits,
        "probe": "00",
        "majority": False,
        "control_hit": False,
        "mean_state_hits": mean_state_hits,
        "same_as_mean_state": same_as_mean_state,
    }


def test_the_mean_state_figures_compare_with_the_paper_figure_and_with_l_star_equal_l():
    samples = [
        attribute_sample("0000", "01", "0101"),  # only the mean state at ℓ* = 3 names the object
        attribute_sample("1000", "00", "0000"),  # only the Patchscope at (1, 1) does
        attribute_sample("0000", "11", "1111"),
    ]
    summary = attributes.summarise(samples, [1, 3], seed=0)
    assert summary["mean_state_control"]["k"] == 2 and summary["mean_state_control"]["n"] == 3  # some ℓ*
    assert summary["mean_state_mean_over_l_star"]["mean"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert summary["by_source_layer"]["1"]["mean_state_at_same_layer"]["k"] == 1
    assert summary["by_source_layer"]["3"]["mean_state_at_same_layer"]["k"] == 2
    assert summary["same_as_mean_state"]["k"] == 6 and summary["same_as_mean_state"]["n"] == 12
    assert summary["paper_mean_over_l_of_any_l_star"]["mean"] == pytest.approx(0.5 / 3)
    assert "does not beat the mean-state control" in _against_mean_state("all", summary)
    ahead = attributes.summarise([attribute_sample("1111", "00", "0000")] * 3, [1, 3], seed=0)
    assert "does not beat" not in _against_mean_state("all", ahead)


def test_the_probe_and_the_baselines_can_fail():
    g = torch.Generator().manual_seed(0)  # seeded: the outcome must not depend on which tests ran before
    shift = 6 * torch.eye(8)[0]
    states = torch.cat([torch.randn(12, 8, generator=g) + shift, torch.randn(12, 8, generator=g) - shift])
    labels = ["a"] * 12 + ["b"] * 12
    assert sum(logistic_probe(states, labels)) >= 22
    unseen = ["u", "v", "w", "x", "y", "z"]
    assert sum(logistic_probe(torch.randn(6, 8, generator=g), unseen)) == 0  # unseen objects
    assert sum(majority_baseline(["a"] * 9 + ["b"] * 3)) == 9
    assert mentions("It is a cat.", "a") and not mentions("What", "a") and mentions("São Paulo!", "são paulo")
    assert sign_test([1] * 8, [0] * 8)["p"] < 0.01 and sign_test([1, 0], [0, 1])["p"] == 1.0
    assert rouge_l("American actor", "an American film actor") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert rouge_l("", "x") == 0.0


def test_lre_templates_put_the_placeholder_in_one_word_and_files_decode_escapes():
    assert placeholder_template("The capital city of {} is") == ("The capital city of{} is", " x")
    assert placeholder_template("{} plays the") == ("{} plays the", "x")
    (capitals,) = read_relations(data_dir() / "lre", ["country_capital_city"])
    assert any(s.object == "Brasília" for s in capitals.samples)
    with pytest.raises(FileNotFoundError, match="no_such_relation"):
        read_relations(data_dir() / "lre", ["no_such_relation"])


def test_two_hop_queries_are_read_from_the_data_and_every_pair_is_stored(llama, tmp_path):
    first = known_relation(llama, "landmark_in_country", "{} is in the country of", ["Big Ben", "the tower"])
    first = Relation(first.name, "test", first.template, first.samples, "country", "landmark")
    bridges = sorted({s.object for s in first.samples})
    second = known_relation(llama, "country_capital_city", "The capital city of {} is", bridges)
    second = Relation(second.name, "test", second.template, second.samples, "city", "country")
    joined = multihop.join([first, second])
    (composition,) = joined
    assert composition.name == "landmark_in_country -> country_capital_city"
    assert composition.query("Big Ben") == "The capital city of the country of Big Ben is"
    assert multihop.first_answer(" France, a country.\nMore") == "France"

    # As many tokens as `known_relation` read its objects from, so the hop filter keeps queries.
    result = multihop.run(llama, [first, second], layer_step=2, max_samples=None, max_new_tokens=8)
    n = result["evaluated"]
    assert result["found"][composition.name] == len(first.samples) and n <= result["tried"]
    if n:
        assert result["vanilla"]["k"] == sum(mentions(q["vanilla"], q["answer"]) for q in result["queries"])
        grid = [(a, b) for a in result["layers"] for b in result["layers"]]
        best = grid.index(tuple(result["patchscope_best_pair"]))
        hits = sum(q["hits"][best] == "1" for q in result["queries"])
        assert result["patchscope_best_pair_accuracy"]["k"] == hits
        assert all(len(q["patchscope"]) == len(grid) for q in result["queries"])
        assert result["patchscope_oracle"]["k"] >= hits
    assert n, "the known relations must leave queries to evaluate"
    # The mean-state control: π2 with each ℓ*'s mean state at the placeholder, one text per composition.
    template, filler = placeholder_template(composition.second.template)
    expected = mean_state_texts(llama, template, filler, result["layers"], 8)
    assert result["mean_state"][composition.name] == {str(b): t for b, t in expected.items()}
    for q in result["queries"]:
        assert q["mean_state_hits"] == hits_string(
            [mentions(expected[b], q["answer"]) for b in result["layers"]]
        )
    best_l_star = result["layers"].index(result["mean_state_best_l_star"])
    assert result["mean_state_best_l_star_accuracy"]["k"] == sum(
        q["mean_state_hits"][best_l_star] == "1" for q in result["queries"]
    )
    assert result["mean_state_oracle"]["k"] >= result["mean_state_best_l_star_accuracy"]["k"]
    same = [
        multihop.first_line(text) == multihop.first_line(expected[b])
        for q in result["queries"]
        for text, (_, b) in zip(q["patchscope"], grid, strict=True)
    ]
    assert result["same_as_mean_state"] == proportion(sum(same), len(same))
    page = multi_hop_section(result, "patchscope eval multi-hop")
    assert f"| mean-state control, any ℓ* (oracle) | {_share(result['mean_state_oracle'])} |" in page
    multihop.plot(result, tmp_path / "multihop.png")
    # Data that composes nothing evaluates nothing, and says so.
    empty = multihop.run(llama, [second], layer_step=2)
    assert empty["evaluated"] == 0 and empty["found"] == {}


def test_entity_description_scores_rouge_l_beside_its_baselines(llama, tmp_path):
    entities = [
        *description.corpus_entities(read_documents(CORPUS))[:3],
        description.Entity("Paris", "city in France", "lre"),
    ]
    result = description.run(llama, llama, entities, layer_step=2, max_new_tokens=4)
    assert [p["source_layer"] for p in result["pairs"]] == [p["target_layer"] for p in result["pairs"]]
    for p in result["pairs"]:
        recomputed = [rouge_l(d, e.reference) for d, e in zip(p["descriptions"], entities, strict=True)]
        assert p["all"]["per_item"] == recomputed and p["all"]["n"] == 4
        assert p["all"]["ci"][0] <= p["all"]["rouge_l"] <= p["all"]["ci"][1]
    # Popular vs rare splits at the median of the source's surprisal at each name: two and two here.
    surprisals = [e["name_surprisal"] for e in result["entities"]]
    assert len(set(surprisals)) == 4 and result["counts"] == {**result["counts"], "popular": 2, "rare": 2}
    assert [e["popular"] for e in result["entities"]] == description.popular_by_median(surprisals)
    assert description.popular_by_median([3.0, 1.0, 2.0, 4.0]) == [False, True, True, False]
    assert description.popular_by_median([1.0, 1.0, 1.0]) == [False, False, False]
    # Rescoring a saved result from its stored descriptions gives the figures the run gave.
    again = description.rescore(json.loads(json.dumps(result)), llama)
    assert [p["popular"] for p in again["pairs"]] == [p["popular"] for p in result["pairs"]]
    assert again["text_only"] == result["text_only"] and again["counts"] == result["counts"]
    # Each pair's mean-state control is the target's ℓ* mean-state description, scored like the pairs.
    assert sorted(result["mean_state"]) == sorted({str(p["target_layer"]) for p in result["pairs"]})
    for p, q in zip(result["pairs"], again["pairs"], strict=True):
        mean = description.description_of(result["mean_state"][str(p["target_layer"])])
        assert p["mean_state_description"] == mean
        assert p["mean_state_control"]["all"]["per_item"] == [rouge_l(mean, e.reference) for e in entities]
        same = sum(d.lower() == mean.lower() for d in p["descriptions"])
        assert p["same_as_mean_state"]["k"] == same
        assert q["mean_state_control"] == p["mean_state_control"]
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "description.smollm2-135m.smollm2-135m.json").write_text(json.dumps(result))
    page = write_report(folder, tmp_path / "results.md").read_text()
    assert "mean-state control at ℓ*, all |" in page and "Against the mean-state control at ℓ* =" in page
    assert description.description_of(": American actor, Samsung: x") == "American actor"
    description.plot(result, tmp_path / "description.png")


def test_cross_model_description_uses_the_target_s_own_mean_states(tiny_models):
    source, target = tiny_models["llama"], tiny_models["qwen2"]
    d_source, d_target = source.facts.hidden_size, target.facts.hidden_size
    weight = torch.randn(d_source, d_target, generator=torch.Generator().manual_seed(0)) / d_source**0.5

    def mapping(vectors: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return vectors.float() @ weight

    entities = [
        description.Entity("Paris", "city in France", "lre"),
        description.Entity("Rome", "city", "lre"),
    ]
    result = description.run(
        source, target, entities, pairs=[(1, 1), (3, 2)], mapping=mapping, max_new_tokens=4
    )
    preset = get_preset("description")
    expected = mean_state_texts(target, preset.template, preset.filler, [1, 2], 4)
    assert result["mean_state"] == {str(b): t for b, t in expected.items()}
    assert [p["mean_state_description"] for p in result["pairs"]] == [
        description.description_of(expected[b]) for b in (1, 2)
    ]


def test_the_report_renders_saved_results_and_names_the_commands_of_missing_ones(same_model_result, tmp_path):
    folder = tmp_path / "docs" / "results"
    folder.mkdir(parents=True)
    name = "next_token.smollm2-135m.smollm2-135m"
    combined = next_token.combine([same_model_result])  # what `patchscope eval next-token` saves
    (folder / f"{name}.json").write_text(json.dumps(combined))
    next_token_plots.plot(combined, folder / f"{name}.png")
    page = write_report(folder, tmp_path / "docs" / "results.md").read_text()
    assert f"| 0 | {same_model_result['pairs'][0]['patchscope']['precision_at_1']:.3f} ± 0.000 |" in page
    assert "(the saved result predates" not in page
    first = combined["summary"]["pairs"][0]
    assert f"| {_mean_state_cell(first)} |" in page and "The best mean-state control (ℓ* = " in page
    assert "](results/next_token.smollm2-135m.smollm2-135m.png)" in page
    assert "_Not run yet: `patchscope eval attributes --model smollm2-135m`._" in page
    # A multi-hop run that evaluated nothing concludes nothing.
    (folder / "multi_hop.smollm2-135m.json").write_text(
        json.dumps({"found": {}, "tried": 0, "evaluated": 0, "layers": [0], "max_new_tokens": 20})
    )
    page = write_report(folder, tmp_path / "docs" / "results.md").read_text()
    assert "Nothing was evaluated, so nothing is concluded." in page
    # Run times come from the recorded runs; a rerun of a command replaces its entry, and the sum is shown.
    entry = {"status": 0, "cpus": 2, "load_start": 1.0, "load_end": 2.0, "finished": "2026-01-01T00:00:00"}
    record(folder / "timings.json", {**entry, "command": "patchscope eval a", "wall_s": 600.0})
    record(folder / "timings.json", {**entry, "command": "patchscope eval b", "wall_s": 60.0})
    entries = record(folder / "timings.json", {**entry, "command": "patchscope eval a", "wall_s": 120.0})
    assert [e["command"] for e in entries] == ["patchscope eval b", "patchscope eval a"]
    page = write_report(folder, tmp_path / "docs" / "results.md").read_text()
    assert "took **3 min** of wall time in all on this 2-CPU machine" in page
    assert "| `patchscope eval a` | 2.0 min | 1.0 → 2.0 |" in page
    # A saved result no recorded command wrote is listed with its own in-process time.
    assert "Run before times were recorded" in page and "`multi_hop.smollm2-135m`" in page
    record(
        folder / "timings.json", {**entry, "command": "c", "wall_s": 1.0, "wrote": ["multi_hop.smollm2-135m"]}
    )
    assert (
        "`multi_hop.smollm2-135m`" not in write_report(folder, tmp_path / "docs" / "results.md").read_text()
    )


def test_the_next_token_verdict_names_the_pairs_that_do_not_beat_their_mean_state_control():
    def pair(a: int, b: int, patchscope: float, control: float) -> dict:
        stats = {"spread": 0.0, "values": [control]}
        return {
            "source_layer": a,
            "target_layer": b,
            "patchscope": {"mean": patchscope},
            "mean_state_control": {
                **stats,
                "mean": control,
                "answers": [" the"],
                "pooled": proportion(3, 40),
            },
            "same_as_mean_state": proportion(1, 40),
        }

    pairs = [
        pair(2, 1, 0.05, 0.075),
        pair(16, 9, 0.3, 0.075),
        pair(29, 17, 0.075, 0.075),
        pair(2, 9, 0.1, 0.075),
    ]
    pooled = [proportion(2, 40), proportion(20, 40), proportion(3, 40), proportion(4, 40)]
    verdict = _next_token_against_mean_state(pairs, pooled, "pair")
    assert "At 2 of 4 pairs the Patchscope does not beat" in verdict and "(2 → 1, 29 → 17)" in verdict
    assert "' the'" in verdict and "0.075" in verdict
    # 4/40 is ahead of 3/40 in the mean, not beyond the control's interval; 20/40 is.
    assert "At 1 of 4 pairs (2 → 9) its mean is ahead" in verdict
    ahead = _next_token_against_mean_state([pairs[1]], [pooled[1]], "layer")
    assert (
        "beats the mean-state control of its ℓ* at every layer." in ahead and "not established" not in ahead
    )
    unmeasured = {"source_layer": 0, "target_layer": 0, "patchscope": {"mean": 0.1}}
    assert _next_token_against_mean_state([unmeasured], [pooled[0]], "layer") == ""


def test_the_eval_commands_parse():
    from patchscope.cli import build_parser

    args = build_parser().parse_args(["eval", "next-token", "--positions", "5", "--json"])
    assert args.positions == 5 and args.target is None and args.func.__name__ == "cmd_next_token"
    args = build_parser().parse_args(["eval", "multi-hop", "--layer-step", "2", "--lre", "a", "--lre", "b"])
    assert args.layer_step == 2 and args.lre == ["a", "b"]
    args = build_parser().parse_args(["eval", "description", "--corpus", "x.txt"])
    assert args.func.__name__ == "cmd_description" and args.corpus == "x.txt" and not args.rescore
    args = build_parser().parse_args(["eval", "cross-model", "--pairs", "2:1,29:17"])
    assert args.pairs == "2:1,29:17"


def test_batched_plain_prompts_give_the_engine_s_greedy_texts(llama):
    prompts = ["The capital of France is", "Hi", "One two three four five six seven", "x"]
    expected = plain_texts(llama, prompts, 6)
    assert batched_plain_texts(llama, prompts, 6, batch=3) == expected


def test_the_paired_ratio_interval_holds_the_ratio_and_is_a_point_when_both_readings_agree():
    from patchscope.eval.common import bootstrap_ratio_ci

    hits, reference = [1] * 30 + [0] * 50, [1] * 45 + [0] * 35
    low, high = bootstrap_ratio_ci(hits, reference, seed=3)
    assert low < 30 / 45 < high < 1.0
    assert bootstrap_ratio_ci(reference, reference) == (1.0, 1.0)  # paired: each draw's sums are equal
