"""Planning bounds a template's target tokens by its UTF-8 bytes: the bound holds for every tokenizer family.

The claim (explain/checks.py, `template_token_bound`): the target tokenises the template's prefix, the
filler and the suffix apart, after its leading specials; each piece takes at most one token per UTF-8 byte,
plus one where the tokenizer prepends a dummy "▁" (Llama-2-style SentencePiece), and the leading specials
are at most one token (BOS). So tokens <= bytes(template) - 2 (the placeholder is not tokenised)
+ bytes(filler) + 1 + 3 = bytes(template) + bytes(filler) + 2.

Checked on random text (any code point, emoji and ZWJ sequences, CJK, combining marks, whitespace runs,
the tokenizers' own special-token strings) for the tokenizers of the 7 tiny architectures (byte-level
BPE, with and without BOS), the two real models (SmolLM2: byte-level BPE; Gemma 3: SentencePiece-style
BPE with byte fallback) and a Llama-2-style tokenizer built here (byte fallback and a dummy prefix), the
family whose worst case the bound is tight for. Hypothesis draws a fresh seed each run and prints a
failing example.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from patchscope.engine.models.registry import ModelRegistry
from patchscope.engine.template import leading_special_ids, normaliser_growth, tokenize_template
from patchscope.engine.validation import PLACEHOLDER, check_template
from patchscope.explain.checks import template_token_bound

EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇯🇵", "🧑🏿‍🚀", "❤️", "\U0001fae0"]
CJK = [*"漢字かなカナ한국어中文日本語", "\u3000", "\U00020000"]
COMBINING = ["e\u0301", "a\u0308\u0323", "\u0301\u0301\u0301", "ก\u0e35\u0e48", "\u200d", "\ufe0f"]
WHITESPACE = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u2028", "    \n\n"]
SPECIALS = ["<s>", "</s>", "<bos>", "<eos>", "<start_of_turn>", "<|endoftext|>", "<|im_start|>", "<unk>"]
ASCII = list("abcxyz09 .,?!-'\"")

piece = st.one_of(
    st.text(max_size=40),  # any code point hypothesis draws (no surrogates: protobuf strings are UTF-8)
    st.lists(st.sampled_from(EMOJI + CJK + COMBINING + WHITESPACE + SPECIALS + ASCII), max_size=30).map(
        "".join
    ),
)
fillers = st.one_of(st.sampled_from(["?", " x", "x", " ", "😀"]), piece.filter(bool))


def templates():
    return (
        st.tuples(piece, piece)
        .map(lambda parts: parts[0] + PLACEHOLDER + parts[1])
        .filter(lambda template: template.count(PLACEHOLDER) == 1)
    )


def utf8(text: str) -> int:
    return len(text.encode("utf-8"))


def dummy_prefix_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer: byte-fallback BPE, every text prefixed by "▁", spaces as "▁", BOS."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for text in ["▁", "a", "b", "t", "h", "e", "▁t", "he", "▁the", "▁a"]:
        vocab[text] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def check_bound(tokenizer: PreTrainedTokenizerBase, template: str, filler: str, dummy_prefix: int) -> None:
    """The bound on the whole template, and the per-piece facts it is made of."""
    growth = normaliser_growth(tokenizer)
    assert len(leading_special_ids(tokenizer)) <= 1
    prefix, suffix = check_template("template", template)
    for text in (prefix, filler, suffix):
        if text:
            tokens = len(tokenizer(text, add_special_tokens=False).input_ids)
            assert tokens <= growth * utf8(text) + dummy_prefix
    if not tokenizer(filler, add_special_tokens=False).input_ids:
        return  # planning's tokeniser refuses such a filler before any model runs
    bound = template_token_bound(template, filler, growth)
    assert len(tokenize_template(tokenizer, template, filler).ids) <= bound


SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(template=templates(), filler=fillers)
def test_tiny_architectures_tokenizers_stay_within_the_byte_bound(tiny, template, filler):
    check_bound(tiny.tokenizer, template, filler, dummy_prefix=0)


@pytest.mark.realmodel
@pytest.mark.parametrize("model_id", ["smollm2-135m", "gemma3-270m"])
def test_real_tokenizers_stay_within_the_byte_bound(model_id):
    directory = ModelRegistry().cache_dir(model_id)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    # The structure the proof needs: bytes reach the model one token each at worst, no normaliser that
    # expands text (NFKC turns one 3-byte character into up to 18 characters).
    spec = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    byte_level = "ByteLevel" in json.dumps(spec["pre_tokenizer"])
    assert byte_level or spec["model"].get("byte_fallback") is True
    assert not any(form in json.dumps(spec["normalizer"]) for form in ("NFKC", "NFKD", "NFC", "NFD"))

    @SETTINGS
    @given(template=templates(), filler=fillers)
    def run(template, filler):
        check_bound(tokenizer, template, filler, dummy_prefix=0)

    run()


@SETTINGS
@given(template=templates(), filler=fillers)
def test_a_dummy_prefix_tokenizer_stays_within_the_byte_bound(template, filler):
    check_bound(DUMMY, template, filler, dummy_prefix=1)


DUMMY = dummy_prefix_tokenizer()


def test_an_nfc_normaliser_is_seen_and_its_growth_bounds_the_tokens(tiny_models):
    # U+0344 (2 bytes) is 4 bytes after NFC (U+0308 U+0301): 4 byte-level tokens from 2 bytes sent, so the
    # plain byte bound is wrong for such a tokenizer and planning multiplies it by the normal form's growth.
    qwen2 = tiny_models["qwen2"].tokenizer
    nfc = [m for m in tiny_models.values() if normaliser_growth(m.tokenizer) == 3]
    assert qwen2 in [m.tokenizer for m in nfc]
    assert normaliser_growth(DUMMY) == 1
    assert len(qwen2("\u0344", add_special_tokens=False).input_ids) > utf8("\u0344")
    check_bound(qwen2, "{}\u0344", "?", dummy_prefix=0)


def test_the_bound_is_tight_for_a_dummy_prefix_tokenizer():
    """BOS + three pieces that each take a dummy "▁" and one token per byte: the bound, not one less."""
    template, filler = "😀" + PLACEHOLDER + "😀", "😀"
    tokens = tokenize_template(DUMMY, template, filler).ids
    assert len(tokens) == 1 + 3 * (1 + 4) == template_token_bound(template, filler)
