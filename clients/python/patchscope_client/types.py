"""Typed records of the API, so callers never touch protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ModelInfo:
    """A hosted model, as `ListModels` reports it."""

    id: str
    source: bool
    target: bool
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_parameters: int
    fingerprint: str
    tokenizer_fingerprint: str
    dtype: str
    ready: bool


@dataclass(frozen=True)
class MappingInfo:
    """A registered mapping and its held-out metrics."""

    id: str
    source: str
    target: str
    source_layer: int
    target_layer: int
    method: str
    r2: float
    r2_mean_dim: float
    cosine: float
    mse: float
    num_pairs: int


@dataclass(frozen=True)
class Site:
    """Where a state came from and where it went: `index` is the site's place in the request."""

    index: int
    position: int
    source_layer: int
    target_layer: int
    source_token: str


@dataclass(frozen=True)
class Started:
    """A site's first event: the mapping used and the patched vector's norm against the layer's."""

    site: Site
    mapping_id: str
    mapping_r2: float | None
    mapped_norm: float
    target_layer_norm: float
    provenance_mismatch: bool
    emitted_at: float


@dataclass(frozen=True)
class Token:
    """One generated token of a site; `text` is what it adds to the explanation."""

    site: Site
    step: int
    token_id: int
    text: str
    emitted_at: float


@dataclass(frozen=True)
class Control:
    """What the target says without the patch, and how much the patch changed it (API 1.1; 1.3 fields).

    `same_as_unpatched`: the site's answer is the one the target gives with nothing patched, so the
    explanation says nothing about the state. `patch_effect`: total-variation distance between the first
    next-token distributions with and without the patch, in [0, 1]. `dependence`: `explanation_logprob`
    minus `unpatched_logprob` (the same tokens teacher-forced without the patch), nats per token; near 0,
    the target would have said it anyway. `confidence`: a calibrator's probability that the answer is
    right, None when no calibrator is registered (`calibrator_id` is then empty). `unpatched_top_k`:
    the logit lens's unpatched reading (API 1.3). `mean_state_*`: with the mean-state control (API 1.3),
    what the target says with its layer's mean state at the site; None without it.
    """

    unpatched_explanation: str
    unpatched_answer: str
    same_as_unpatched: bool
    patch_effect: float | None = None
    explanation_logprob: float | None = None
    unpatched_logprob: float | None = None
    dependence: float | None = None
    confidence: float | None = None
    calibrator_id: str = ""
    unpatched_top_k: list[tuple[str, float]] | None = None
    mean_state_explanation: str | None = None
    mean_state_answer: str | None = None
    same_as_mean_state: bool | None = None


@dataclass(frozen=True)
class Finished:
    """A site's last event: the whole explanation, its answer, timings and what reproduces it.

    `control` is None when the request turned controls off, for the logit lens, or from a 1.0 server.
    """

    site: Site
    explanation: str
    answer: str
    top_k: list[tuple[str, float]]
    timings: dict[str, float]
    reproduction: dict[str, object]
    emitted_at: float
    control: Control | None = None


Event = Started | Token | Finished


@dataclass
class SiteResult:
    """One row of a collected sweep; `to_json` has the keys of `patchscope explain --json`."""

    site: Site
    explanation: str = ""
    answer: str = ""
    mapping_id: str | None = None
    mapping_r2: float | None = None
    top_k: list[tuple[str, float]] | None = None
    control: Control | None = None

    def to_json(self) -> dict[str, object]:
        record: dict[str, object] = {
            "source_layer": self.site.source_layer,
            "target_layer": self.site.target_layer,
            "position": self.site.position,
            "source_token": self.site.source_token,
            "explanation": self.explanation,
            "answer": self.answer,
            "mapping_id": self.mapping_id,
            "mapping_r2": self.mapping_r2,
        }
        if self.top_k:
            record["top_k"] = [{"token": t, "prob": p} for t, p in self.top_k]
        c = self.control  # every key present, None without controls: a reader never guesses which
        if c is not None and c.unpatched_top_k is not None:
            record["unpatched_top_k"] = [{"token": t, "prob": p} for t, p in c.unpatched_top_k]
        record.update(
            unpatched_answer=c.unpatched_answer if c else None,
            same_as_unpatched=c.same_as_unpatched if c else None,
            patch_effect=c.patch_effect if c else None,
            dependence=c.dependence if c else None,
            confidence=c.confidence if c else None,
            mean_state_answer=c.mean_state_answer if c else None,
            same_as_mean_state=c.same_as_mean_state if c else None,
        )
        return record


@dataclass
class ResultTable:
    """A sweep's results in site order."""

    rows: list[SiteResult] = field(default_factory=list)

    def to_json(self) -> list[dict[str, object]]:
        return [row.to_json() for row in self.rows]


def collect(events) -> ResultTable:
    """Fold a stream of events into one row per site (in request order)."""
    rows: dict[int, SiteResult] = {}
    for event in events:
        row = rows.setdefault(event.site.index, SiteResult(event.site))
        if isinstance(event, Started):
            row.mapping_id, row.mapping_r2 = event.mapping_id or None, event.mapping_r2
        elif isinstance(event, Finished):
            row.explanation, row.answer, row.top_k = event.explanation, event.answer, event.top_k or None
            row.control = event.control
    return ResultTable([rows[i] for i in sorted(rows)])


@dataclass(frozen=True)
class LayerStates:
    """One layer's states from `extract`: `states[j]` is the state at `positions[j]`."""

    layer: int
    positions: list[int]
    states: np.ndarray  # [positions, hidden] float32 (or a torch tensor when asked for)


@dataclass(frozen=True)
class Extraction:
    """The states `extract` returned, one entry per layer, with the prompt's tokens."""

    model: str
    fingerprint: str
    token_ids: list[int]
    tokens: list[str]
    layers: list[LayerStates]
