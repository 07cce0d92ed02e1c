"""Tokenising a template so the patch lands on a known token.

The prefix, the filler and the suffix are tokenised separately and joined, so the prefix never merges with
the placeholder and every row of a sweep gets the same ids (DESIGN.md, "template").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

from patchscope.engine.errors import InvalidArgument
from patchscope.engine.validation import check_template


@dataclass(frozen=True)
class TemplateTokens:
    """A template's ids with the patch site marked."""

    ids: tuple[int, ...]
    placeholder: int  # index of the filler's last token: where the patch goes
    prefix_len: int  # tokens before the filler (leading specials included): shareable across rows


def leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids the tokenizer puts before any text (BOS for Llama and Gemma, nothing for GPT-2)."""
    with_specials = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    for start in range(len(with_specials) - len(plain) + 1):
        if with_specials[start : start + len(plain)] == plain:
            return list(with_specials[:start])
    return []


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Ids of a source prompt exactly as the model's own tokenizer adds specials to it."""
    return list(tokenizer(prompt).input_ids)


# How many times its UTF-8 bytes a text can grow under each Unicode normal form (UAX #15, "Design
# Goals": NFC and NFD 3×, NFKC and NFKD 11× in UTF-8).
_NORMAL_FORM_GROWTH = {"NFC": 3, "NFD": 3, "NFKC": 11, "NFKD": 11}


def normaliser_growth(tokenizer: PreTrainedTokenizerBase) -> int:
    """The most a tokenizer's normaliser can multiply a text's UTF-8 bytes by, before it is tokenised.

    Planning bounds a template's tokens by its bytes without the target's tokenizer; a normaliser that
    rewrites text into a Unicode normal form (Qwen2's NFC) can make more bytes, and so more tokens, than
    the caller sent. A tokenizer without a fast backend is not inspectable: the worst form is assumed.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return max(_NORMAL_FORM_GROWTH.values())
    normaliser = backend.normalizer  # its own JSON only: the whole tokenizer's is megabytes of vocabulary
    spec = normaliser.__getstate__().decode("utf-8") if normaliser is not None else ""
    found = re.findall(r'"type":\s*"(NFK?[CD])"', spec)
    return max((_NORMAL_FORM_GROWTH[form] for form in found), default=1)


def prompt_tokens(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[str]:
    """The prompt's tokens as `extract` sees them (specials added as the model adds them), one string each."""
    return [tokenizer.decode([t]) for t in tokenize_prompt(tokenizer, prompt)]


@lru_cache(maxsize=256)
def _tokenize(tokenizer: PreTrainedTokenizerBase, template: str, filler: str) -> TemplateTokens:
    prefix, suffix = check_template("template", template)
    if not filler:
        raise InvalidArgument("filler", "must be non-empty (it is the token the patch overwrites)")
    lead = leading_special_ids(tokenizer)
    prefix_ids = lead + (tokenizer(prefix, add_special_tokens=False).input_ids if prefix else [])
    filler_ids = tokenizer(filler, add_special_tokens=False).input_ids
    suffix_ids = tokenizer(suffix, add_special_tokens=False).input_ids if suffix else []
    if not filler_ids:
        raise InvalidArgument("filler", "tokenises to nothing", value=filler)
    ids = tuple(prefix_ids + filler_ids + suffix_ids)
    return TemplateTokens(
        ids=ids, placeholder=len(prefix_ids) + len(filler_ids) - 1, prefix_len=len(prefix_ids)
    )


def tokenize_template(tokenizer: PreTrainedTokenizerBase, template: str, filler: str) -> TemplateTokens:
    """Ids of `template` with `filler` in place of `{}`; the patch site is the filler's last token."""
    return _tokenize(tokenizer, template, filler)
