"""Presets, answers, and the sweep built from them."""

import json

import pytest
import torch

from patchscope.cli import main
from patchscope.cli.args import parse_int_list
from patchscope.engine import IncompatibleModels, extract
from patchscope.engine.presets import PRESETS, first_line_answer, identity_answer
from patchscope.engine.runtime import TargetRuntime
from patchscope.explain import ExplainRequest, LocalBackend, TargetSpec, explain


def sweep(source, target, prompt: str, source_layers, **spec):
    """One same- or cross-model request through the in-process pipeline."""
    positions = tuple(spec.pop("positions", (-1,)))
    request = ExplainRequest(
        source=source.id,
        prompt=prompt,
        layers=tuple(source_layers),
        positions=positions,
        target=TargetSpec(model=target.id, **spec),
    )
    return explain(LocalBackend.of(source, TargetRuntime.build(target)), request)


@pytest.mark.parametrize(
    ("explanation", "answer"),
    [
        (" -> Obama\n\nThe output is", "Obama"),
        (" ->  milk, cheese\n", "milk,"),
        ("Obama -> Obama", "Obama"),
        ("\n-> late arrow", "->"),  # no arrow on the (empty) first line: the first word
        ("", ""),
        (" ->\nx", ""),
    ],
)
def test_identity_answer_is_first_word_after_arrow_on_first_line(explanation, answer):
    assert identity_answer(explanation) == answer


def test_first_line_answer_strips_only_the_first_line():
    assert first_line_answer("  American actor \nand more") == "American actor"


def test_every_preset_template_has_exactly_one_placeholder():
    for preset in PRESETS.values():
        assert preset.template.count("{}") == 1, preset.name


def test_sweep_sites_are_layer_major_and_name_their_source_token(llama):
    result = sweep(llama, llama, "The lobster is red", [0, 2], positions=[1, -1])
    sites = [(r.site.source_layer, r.site.target_layer, r.site.position) for r in result.results]
    last = len(extract(llama, "The lobster is red", [0]).token_ids) - 1
    assert sites == [(0, 0, 1), (0, 0, last), (2, 2, 1), (2, 2, last)]
    assert result.results[1].source_token == llama.tokenizer.decode(
        [extract(llama, "The lobster is red", [0]).token_ids[-1]]
    )
    assert all(r.mapping_id is None and r.mapping_r2 is None for r in result.results)


def test_target_layers_one_for_all_or_one_per_source_layer(llama):
    one = sweep(llama, llama, "a b c", [0, 1, 2], layers=(3,))
    assert [r.site.target_layer for r in one.results] == [3, 3, 3]
    each = sweep(llama, llama, "a b c", [0, 1], layers=(2, -1))
    assert [r.site.target_layer for r in each.results] == [2, 3]


@torch.inference_mode()
def test_logit_lens_equals_final_norm_and_unembedding_of_the_state(tiny):
    prompt = "The lobster is a species"
    result = sweep(tiny, tiny, prompt, [1], preset="logit-lens", top_k=3)
    (site,) = result.results
    state = extract(tiny, prompt, [1]).states[0, 0]
    logits = tiny.model.get_submodule(tiny.layout.paths.unembed)(tiny.layout.final_norm(state))
    if tiny.layout.softcap:
        logits = torch.tanh(logits / tiny.layout.softcap) * tiny.layout.softcap
    probs = torch.softmax(logits, -1)
    assert [p for _, p in site.top_k] == pytest.approx(probs.topk(3).values.tolist(), rel=1e-5)
    assert site.explanation == tiny.tokenizer.decode([int(probs.argmax())])


def test_cross_model_without_mapping_is_refused(tiny_models):
    with pytest.raises(IncompatibleModels, match="needs a mapping"):
        sweep(tiny_models["llama"], tiny_models["qwen2"], "a b", [0])


@pytest.mark.parametrize(
    ("spec", "values"),
    [
        ("0-3", [0, 1, 2, 3]),
        ("1,3,5", [1, 3, 5]),
        ("-1", [-1]),
        ("2-4,8", [2, 3, 4, 8]),
        ("-3--1", [-3, -2, -1]),
    ],
)
def test_parse_int_list(spec, values):
    assert parse_int_list(spec) == values


def test_cli_explain_json_on_a_registered_directory(tiny_dirs, capsys):
    path = str(tiny_dirs["llama"])
    code = main(["explain", "The lobster", "--source", path, "--target", path, "--layers", "0-1", "--json"])
    assert code == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["source_layer"] for r in records] == [0, 1]
    assert set(records[0]) == {
        "source_layer",
        "target_layer",
        "position",
        "source_token",
        "explanation",
        "answer",
        "mapping_id",
        "mapping_r2",
        "unpatched_answer",
        "same_as_unpatched",
        "patch_effect",
        "dependence",
        "confidence",
        "mean_state_answer",
        "same_as_mean_state",
    }


def test_cli_reports_bad_input_as_one_line_and_exit_code_2(tiny_dirs, capsys):
    path = str(tiny_dirs["llama"])
    assert main(["explain", "The lobster", "--source", path, "--target", path, "--layers", "9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("patchscope: error: layers: layer out of range") and err.count("\n") == 1
