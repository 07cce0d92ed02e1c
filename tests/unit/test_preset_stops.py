"""Presets' default stop sequences leave every answer as it is without them.

The property is checked at three levels: on any string (the answer rule itself), on any token sequence
as the engine decodes and cuts it (tokenizers may decode a prefix differently from the whole), and on
the real models' explanations.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from patchscope.engine.generation import GenerationConfig, StopMatcher, cut_at_stop
from patchscope.engine.presets import PRESETS, identity_answer, with_default_stop
from patchscope.engine.runtime import TargetRuntime
from patchscope.explain import ExplainRequest, LocalBackend, TargetSpec, explain

STOPPING = [p for p in PRESETS.values() if p.default_stop]
# Characters that decide answers (line breaks, spaces, the identity arrow) among ordinary ones.
PIECES = [*"\n\r\t ->abc.,1é中", "->", "\n\n", " \n", " -> "]
TEXT = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)


def decoded_with_stop(tokenizer, ids: list[int], stop: tuple[str, ...]) -> str:
    """The explanation the engine returns for `ids` under `stop`: it ends at the token completing a stop."""
    matcher = StopMatcher(tokenizer, stop)
    for k, token in enumerate(ids):
        if matcher.add(0, token):
            ids = ids[: k + 1]
            break
    return cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop)[0]


def test_presets_with_a_default_stop_are_the_first_line_ones():
    assert {p.name for p in STOPPING} == {"description", "attribute"}
    assert all(p.default_stop == ("\n",) for p in STOPPING)


@given(text=TEXT)
def test_default_stop_leaves_the_answer_of_any_text_unchanged(text):
    for preset in STOPPING:
        assert preset.answer(cut_at_stop(text, preset.default_stop)[0]) == preset.answer(text)


def test_identity_has_no_default_stop_because_a_blank_first_line_answers_later():
    text = "\n-> late arrow"
    assert identity_answer(text) == "->"
    assert identity_answer(cut_at_stop(text, ("\n",))[0]) == ""  # what a "\n" stop would answer
    assert PRESETS["identity"].default_stop == ()


def _newline_ids(tokenizer) -> list[int]:
    return [
        i
        for i, piece in enumerate(tokenizer.batch_decode([[i] for i in range(len(tokenizer))]))
        if "\n" in piece
    ]


def _check_token_sequences(tokenizer, ids: list[int]) -> None:
    full = tokenizer.decode(ids, skip_special_tokens=True)
    for preset in STOPPING:
        assert preset.answer(decoded_with_stop(tokenizer, ids, preset.default_stop)) == preset.answer(full)


@pytest.fixture(scope="module")
def tiny_newlines(llama):
    newlines = _newline_ids(llama.tokenizer)
    assert newlines, "the tiny tokenizer has newline tokens to stop at"
    return llama.tokenizer, newlines


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_default_stop_leaves_the_answer_of_any_token_sequence_unchanged(tiny_newlines, data):
    tokenizer, newlines = tiny_newlines
    token = st.one_of(st.integers(0, len(tokenizer) - 1), st.sampled_from(newlines))
    _check_token_sequences(tokenizer, data.draw(st.lists(token, max_size=24)))


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def real_tokenizer(request):
    """A real model's tokenizer and (a sample of) its tokens that decode with a line break."""
    from patchscope.engine.models import ModelRegistry

    directory = ModelRegistry().weights_dir(request.param)
    if directory is None:
        pytest.skip(f"{request.param} is not converted (make models)")
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return tokenizer, _newline_ids(tokenizer)[:200]


@pytest.mark.realmodel
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_default_stop_leaves_the_answer_unchanged_under_the_real_tokenizers(real_tokenizer, data):
    # Byte-level (SmolLM2) and SentencePiece (Gemma) decoders, on ids biased towards line breaks.
    tokenizer, newlines = real_tokenizer
    token = st.one_of(st.integers(0, len(tokenizer) - 1), st.sampled_from(newlines))
    _check_token_sequences(tokenizer, data.draw(st.lists(token, max_size=24)))


def test_a_request_stop_replaces_the_default_and_sampling_keeps_none():
    description = PRESETS["description"]
    assert with_default_stop(description, GenerationConfig()).stop == ("\n",)
    assert with_default_stop(description, GenerationConfig(stop=("Paris",))).stop == ("Paris",)
    assert with_default_stop(description, GenerationConfig(temperature=0.7, seed=1)).stop == ()
    assert with_default_stop(PRESETS["identity"], GenerationConfig()).stop == ()


@pytest.mark.realmodel
@torch.inference_mode()
def test_attribute_answers_on_the_real_model_equal_with_and_without_the_default_stop(smollm2):
    # The attribute template's continuations reach a line break within a few tokens on these layers (the
    # description template's comma-separated list seldom does); both presets share the answer rule.
    runtime = TargetRuntime.build(smollm2)
    plain = GenerationConfig(max_new_tokens=16)

    def run(generation: GenerationConfig):
        request = ExplainRequest(
            source=smollm2.id,
            prompt="Paris",
            layers=(2, 8, 14, 20),
            target=TargetSpec(smollm2.id, preset="attribute", generation=generation, controls=False),
        )
        return explain(LocalBackend.of(smollm2, runtime), request).results

    # A request's own stop replaces the default: one that never occurs gives the uncut explanations; the
    # plain request gets the preset's default from planning.
    full = run(GenerationConfig(max_new_tokens=16, stop=("\x00never\x00",)))
    stopped = run(plain)
    assert any("\n" in r.explanation for r in full), "no row reached a line break: the check would be empty"
    assert [r.answer for r in stopped] == [r.answer for r in full]
    assert all("\n" not in r.explanation for r in stopped)
