"""Patched generation as a stream of text events per row: what the service and the CLI both send on.

A decoding step gives token ids; a caller wants the characters each token adds (never half a UTF-8
character) and, when a row ends, its whole explanation. One conversion serves every entry point, so the
explanation streamed by the service is the one the CLI prints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from patchscope.engine.generation import GenerationConfig, PatchedRow, RowPatch, Step
from patchscope.engine.timings import Timings


@dataclass(frozen=True)
class GenerateRequest:
    """Rows of one Explain for one target model: row k patches `vectors[k]` at block `layers[k]`."""

    model: str
    template: str
    filler: str
    layers: list[int]
    vectors: list[torch.Tensor]  # [d*] float32 CPU tensors
    config: GenerationConfig

    def rows(self) -> list[PatchedRow]:
        return [
            PatchedRow(template=self.template, filler=self.filler, patches=(RowPatch(layer=layer, vector=v),))
            for layer, v in zip(self.layers, self.vectors, strict=True)
        ]


@dataclass(frozen=True)
class RowEvent:
    """What one decoding step added to one row.

    `text` is the characters the token adds to the explanation (empty while a multi-byte character is
    incomplete, and for the stop token). A finished event carries the whole explanation and the timings.
    """

    row: int
    step: int
    token_id: int
    text: str
    finished: bool
    stop: bool = False  # the token is a stop token, not part of the explanation
    explanation: str | None = None
    timings: Timings | None = None


class TextDecoder:
    """Turns one row's token ids into text deltas that never split a character."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""
        delta, self.text = text[len(self.text) :], text
        return delta

    def final(self) -> tuple[str, str]:
        """The whole text, and what it adds to the deltas sent so far (held-back partial characters)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        rest = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text = text
        return text, rest


def row_events(
    steps: Iterator[Step], tokenizer: PreTrainedTokenizerBase, max_new_tokens: int, timings: Timings
) -> Iterator[list[RowEvent]]:
    """The events of each step, rows numbered as in the steps; a row's last event is `finished`.

    A row ends on a stop token or at its `max_new_tokens`-th token; its finished event carries a copy of
    `timings` as the generation has filled it so far.
    """
    decoders: dict[int, TextDecoder] = {}
    for step in steps:
        events = []
        for row, token, stop in zip(step.rows, step.token_ids, step.finished, strict=True):
            decoder = decoders.setdefault(row, TextDecoder(tokenizer))
            index = len(decoder.ids)  # tokens this row produced before this one
            text = "" if stop else decoder.add(token)
            if stop or index == max_new_tokens - 1:
                explanation, rest = decoder.final()
                event = RowEvent(
                    row, index, token, text + rest, True, stop, explanation, dataclasses.replace(timings)
                )
            else:
                event = RowEvent(row, index, token, text, False)
            events.append(event)
        yield events
