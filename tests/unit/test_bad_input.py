"""Bad input raises `InvalidArgument` (a ValueError) naming the field and the allowed range; nothing runs."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from patchscope.engine import (
    GenerationConfig,
    InvalidArgument,
    PatchedRow,
    RowPatch,
    extract,
    patched_generate,
)
from patchscope.engine.validation import ModelFacts, check_layers
from patchscope.explain import ExplainRequest, LocalBackend, TargetSpec, explain

FACTS = ModelFacts(model_id="m", num_layers=30, hidden_size=8, vocab_size=100)


@given(st.integers(min_value=-1000, max_value=1000))
def test_layers_resolve_in_range_or_raise_naming_field_and_range(layer):
    try:
        (resolved,) = check_layers("layers", [layer], FACTS)
    except InvalidArgument as error:
        assert not -30 <= layer < 30
        assert error.field == "layers" and "-30..29" in str(error) and str(layer) in str(error)
    else:
        assert 0 <= resolved < 30 and resolved % 30 == layer % 30


def test_layer_out_of_range_names_field_and_range(llama):
    with pytest.raises(InvalidArgument, match=r"layers: layer out of range .*allowed: -4\.\.3; got: 7"):
        extract(llama, "hello world", layers=[7])


@pytest.mark.parametrize("prompt", ["", "   ", "\n"])
def test_empty_prompt_is_rejected(llama, prompt):
    with pytest.raises(InvalidArgument, match="prompt: must be a non-empty string"):
        extract(llama, prompt, layers=[0])


def test_position_out_of_range_names_the_prompt_length(llama):
    with pytest.raises(InvalidArgument, match=r"positions: .*allowed: -\d+\.\.\d+; got: 99"):
        extract(llama, "hello world", layers=[0], positions=[99])


@pytest.mark.parametrize("template", ["no placeholder", "two {} and {}"])
def test_template_without_exactly_one_placeholder_is_rejected(llama, llama_runtime, template):
    row = PatchedRow(template, "?", (RowPatch(0, torch.zeros(llama.facts.hidden_size)),))
    with pytest.raises(InvalidArgument, match=r"template: must contain the placeholder \{\} exactly once"):
        patched_generate(llama_runtime, [row])


@pytest.mark.parametrize(
    ("vector", "match"),
    [
        (torch.zeros(63), r"vector: vector has the wrong shape .*allowed: \[64\]; got: \[63\]"),
        (torch.zeros(2, 64), r"wrong shape"),
        (torch.full((64,), float("nan")), "NaN or Inf"),
        (torch.tensor([float("inf")] + [0.0] * 63), "NaN or Inf"),
        (torch.zeros(64, dtype=torch.long), "floating point"),
    ],
)
def test_bad_vectors_are_rejected_with_the_field_path(llama, llama_runtime, vector, match):
    row = PatchedRow("a {} b", "?", (RowPatch(1, vector),))
    with pytest.raises(InvalidArgument, match=r"rows\[0\]\.patches\[0\]\.vector") as info:
        patched_generate(llama_runtime, [row])
    assert info.match(match)


def test_bad_generation_options_are_rejected(llama, llama_runtime):
    row = PatchedRow("a {} b", "?", (RowPatch(1, torch.zeros(64)),))
    with pytest.raises(InvalidArgument, match=r"max_new_tokens: out of range; allowed: 1\.\.512; got: 0"):
        patched_generate(llama_runtime, [row], GenerationConfig(max_new_tokens=0))
    with pytest.raises(InvalidArgument, match="top_p"):
        patched_generate(llama_runtime, [row], GenerationConfig(top_p=1.5))
    with pytest.raises(InvalidArgument, match="rows: must contain at least one row"):
        patched_generate(llama_runtime, [])


def test_explain_validates_before_running_any_model(llama, llama_runtime, monkeypatch):
    def forbidden(*_a, **_k):
        raise AssertionError("a model ran before validation finished")

    def request(prompt: str = "Barack Obama", source_layers=(0,), **target) -> ExplainRequest:
        return ExplainRequest(llama.id, prompt, source_layers, TargetSpec(llama.id, **target))

    backend = LocalBackend.of(llama, llama_runtime)  # its warm-up read (layer statistics) runs here
    monkeypatch.setattr(llama.model, "forward", forbidden)
    for bad, field in [
        (request(preset="nope"), "preset"),
        (request(template="no marker"), "template"),
        (request(source_layers=(0, 1), layers=(0, 1, 2)), "layers"),
        (request(top_k=0), "top_k"),
        (request(prompt=""), "prompt"),
    ]:
        with pytest.raises(InvalidArgument, match=rf"^(target\.)?{field}"):
            explain(backend, bad)
