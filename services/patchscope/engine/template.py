"""Tokenising a template so the patch lands on a known token.

The prefix, the filler and the suffix are tokenised separately and joined, so the prefix never merges with
the placeholder and every row of a sweep gets the same ids (DESIGN.md, "template").
"""

from __future__ import annotations

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
