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

from patchscope.engine.generation import GenerationConfig, PatchedRow, RowPatch, Step, cut_at_stop
from patchscope.engine.timings import Timings


@dataclass(frozen=True)
class GenerateRequest:
    """Rows of one Explain for one target model: row k patches `vectors[k]` at block `layers[k]`.

    With `control`, one more row follows them: the template with no patch at all, whose first-step
    distribution every other row's `patch_effect` is measured against.
    """

    model: str
    template: str
    filler: str
    layers: list[int]
    vectors: list[torch.Tensor]  # [d*] float32 CPU tensors
    config: GenerationConfig
    control: bool = False

    @property
    def num_rows(self) -> int:
        return len(self.vectors) + self.control

    def rows(self) -> list[PatchedRow]:
        rows = [
            PatchedRow(template=self.template, filler=self.filler, patches=(RowPatch(layer=layer, vector=v),))
            for layer, v in zip(self.layers, self.vectors, strict=True)
        ]
        if self.control:
            rows.append(PatchedRow(template=self.template, filler=self.filler, patches=()))
        return rows


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
    # Signals, on finished events when the generation kept its logits: the mean log-probability per token
    # of the explanation, and the total-variation distance of the first step's distribution from the
    # control row's (0 for the control row itself).
    logprob: float | None = None
    patch_effect: float | None = None
    # On a control row's finished event: the unpatched log-probability of every token prefix the
    # generation already read off the control's own distributions (its own tokens, and each token its
    # request's rows chose while their text still equalled the control's), which the teacher-forced
    # scoring reuses; then, once the request's rows are scored (engine/scoring.py), each other row's
    # unpatched mean log-probability.
    unpatched_prefixes: tuple[tuple[tuple[int, ...], float], ...] | None = None
    unpatched_logprobs: tuple[float | None, ...] | None = None


class TextDecoder:
    """Turns one row's token ids into text deltas that never split a character.

    With stop sequences, text that may be the start of one is held back until it is known not to be, so
    the deltas never contain a stop sequence or anything after it.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""

    def _visible(self, text: str) -> str:
        text, found = cut_at_stop(text, self.stop)
        if found:
            return text
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[: len(text) - held]

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        text = self._visible(text)
        if not text.startswith(self.text):
            return ""
        delta, self.text = text[len(self.text) :], text
        return delta

    def final(self) -> tuple[str, str]:
        """The whole text, and what it adds to the deltas sent so far (held-back partial characters)."""
        text = cut_at_stop(self.tokenizer.decode(self.ids, skip_special_tokens=True), self.stop)[0]
        rest = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text = text
        return text, rest


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """½ Σ|p − q| over the last dimension: 0 for equal distributions, 1 for disjoint ones."""
    return 0.5 * (p - q).abs().sum(dim=-1)


def row_events(
    steps: Iterator[Step],
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    timings: Timings,
    controls: dict[int, int] | None = None,
    stop: tuple[str, ...] = (),
) -> Iterator[list[RowEvent]]:
    """The events of each step, rows numbered as in the steps; a row's last event is `finished`.

    A row ends on a stop token, a stop sequence or at its `max_new_tokens`-th token; its finished event
    carries a copy of `timings` as the generation has filled it so far. `controls` maps rows to the
    control row of their request: the steps must then carry their logits, and finished events carry the
    signals.
    """
    stream = RowEventStream(tokenizer, max_new_tokens, timings, controls, stop)
    for step in steps:
        yield stream.feed(step)


class RowEventStream:
    """`row_events` one step at a time, for a scheduler that hands each request its own steps."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_new_tokens: int,
        timings: Timings,
        controls: dict[int, int] | None = None,
        stop: tuple[str, ...] = (),
    ) -> None:
        self.tokenizer, self.max_new_tokens, self.timings = tokenizer, max_new_tokens, timings
        self.controls, self.stop = controls, tuple(stop)
        # Per control row: token prefix -> its unpatched log-probability, read off the control's steps.
        self.prefixes: dict[int, dict[tuple[int, ...], float]] = {c: {} for c in (controls or {}).values()}
        self.off_path: set[int] = set()  # rows whose tokens no longer equal their control's
        self.decoders: dict[int, TextDecoder] = {}
        self.logprobs: dict[int, list[float]] = {}
        self.effects: dict[int, float] = {}

    def feed(self, step: Step) -> list[RowEvent]:
        decoders = self.decoders
        if self.controls is not None:
            new = [r for r in step.rows if r not in decoders]
            lse = _observe(step, self.controls, self.logprobs, self.effects, new=new)
            self._follow_controls(step, lse)
        ended = step.ended or [False] * len(step.rows)
        events = []
        for row, token, stop, end in zip(step.rows, step.token_ids, step.finished, ended, strict=True):
            decoder = decoders.setdefault(row, TextDecoder(self.tokenizer, self.stop))
            index = len(decoder.ids)  # tokens this row produced before this one
            text = "" if stop else decoder.add(token)
            if stop or end or index == self.max_new_tokens - 1:
                explanation, rest = decoder.final()
                scores = self.logprobs.get(row)
                event = RowEvent(
                    row,
                    index,
                    token,
                    text + rest,
                    True,
                    stop,
                    explanation,
                    dataclasses.replace(self.timings),
                    logprob=sum(scores) / len(scores) if scores else None,
                    patch_effect=self.effects.get(row),
                    unpatched_prefixes=tuple(self.prefixes[row].items()) if row in self.prefixes else None,
                )
            else:
                event = RowEvent(row, index, token, text, False)
            events.append(event)
        return events

    def _follow_controls(self, step: Step, lse: torch.Tensor) -> None:
        """Record the unpatched log-probability of each token chosen by a row still on its control's path.

        While a row's tokens equal its control's, the control's distribution at this step is the unpatched
        target's after the same tokens: the row's token is scored there for free. Rows of a request step
        together, so a row's control is in the same step until the row leaves the path.
        """
        assert step.logits is not None
        where = {row: k for k, row in enumerate(step.rows)}
        picks: list[tuple[int, int]] = []  # (control's index in the step, the row's token)
        keys: list[tuple[int, int]] = []  # (control row, row)
        for row, token, stop in zip(step.rows, step.token_ids, step.finished, strict=True):
            control = self.controls.get(row) if self.controls else None
            if control is None or stop or row in self.off_path or control not in where:
                continue
            ids, control_ids = self._ids(row), self._ids(control)
            if ids != control_ids:
                self.off_path.add(row)
                continue
            picks.append((where[control], token))
            keys.append((control, row))
        if not picks:
            return
        at = torch.tensor(picks, device=step.logits.device)  # [n, 2]
        values = (step.logits[at[:, 0], at[:, 1]].float() - lse[at[:, 0]]).tolist()
        for (control, row), (_, token), value in zip(keys, picks, values, strict=True):
            self.prefixes[control][(*self._ids(row), token)] = value

    def _ids(self, row: int) -> list[int]:
        """The row's tokens before this step (stop tokens excluded)."""
        decoder = self.decoders.get(row)
        return decoder.ids if decoder is not None else []


def _observe(
    step: Step,
    controls: dict[int, int],
    logprobs: dict[int, list[float]],
    effects: dict[int, float],
    new: list,
) -> torch.Tensor:
    """Log-probabilities of the chosen tokens (stop tokens excluded), and first-step distances.

    Returns the step's log-sum-exp per row ([B]).

    The chosen token's log-probability is its logit minus the row's log-sum-exp, so no [B, V]
    log-softmax is written at every step; probabilities are formed only on a row's first step, for the
    rows whose distance is measured and their controls.
    """
    if step.logits is None:
        raise ValueError("signals need the steps' logits (iter_patched_generate(..., keep_logits=True))")
    logits = step.logits.float()  # [B, V]; a no-op for the float32 (contiguous: unembed_normed) logits
    ids = torch.tensor(step.token_ids, device=logits.device)[:, None]  # [B, 1]
    lse = torch.logsumexp(logits, dim=-1)  # [B]
    chosen = (logits.gather(1, ids)[:, 0] - lse).tolist()
    for k, (row, stop) in enumerate(zip(step.rows, step.finished, strict=True)):
        if not stop:
            logprobs.setdefault(row, []).append(chosen[k])
    if not new:
        return lse
    where = {row: k for k, row in enumerate(step.rows)}
    pairs = [(row, controls[row]) for row in new if controls.get(row) in where]
    if not pairs:
        return lse
    needed = sorted({where[r] for pair in pairs for r in pair})
    at = {k: j for j, k in enumerate(needed)}
    probs = torch.softmax(logits[needed], dim=-1)  # [n, V]
    for row, control in pairs:
        effects[row] = float(total_variation(probs[at[where[row]]], probs[at[where[control]]]))
    return lse
