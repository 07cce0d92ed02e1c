"""Pairing token positions of the same text in two models.

With one tokenizer, positions pair directly. With two, a position pairs with a position of the other model
when both tokens end exactly where a whitespace-delimited word ends (DESIGN.md, "cross-tokenizer pairs"):
the state after reading a whole word is the state most comparable across tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Encoded:
    """A text's ids and, for each word end that some token ends on, that token's index."""

    ids: list[int]
    pairable: list[int]  # indices that are neither position 0 nor special tokens
    word_ends: dict[int, int]  # character offset of a word's end -> token index


def word_end_offsets(text: str) -> set[int]:
    return {
        i + 1
        for i, ch in enumerate(text)
        if not ch.isspace() and (i + 1 == len(text) or text[i + 1].isspace())
    }


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> Encoded:
    """Token ids with special tokens as the model adds them; specials and position 0 never pair."""
    enc = tokenizer(text, return_offsets_mapping=True)
    ends = word_end_offsets(text)
    specials = set(tokenizer.all_special_ids)
    word_ends, pairable = {}, []
    for index, ((start, end), token) in enumerate(zip(enc.offset_mapping, enc.input_ids, strict=True)):
        if index == 0 or token in specials or end == start:
            continue
        pairable.append(index)
        if end in ends:
            word_ends[end] = index
    return Encoded(ids=list(enc.input_ids), pairable=pairable, word_ends=word_ends)


def pair_positions(source: Encoded, target: Encoded, *, same_tokenizer: bool) -> list[tuple[int, int]]:
    """(source index, target index) pairs: every shared position, or every shared word end."""
    if same_tokenizer:
        return [(i, i) for i in source.pairable]
    shared = sorted(source.word_ends.keys() & target.word_ends.keys())
    return [(source.word_ends[end], target.word_ends[end]) for end in shared]
