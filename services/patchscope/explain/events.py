"""What a running Explain reports, site by site, and the collected result of a whole sweep."""

from __future__ import annotations

from dataclasses import dataclass, field

from patchscope.engine.timings import Timings
from patchscope.explain.request import Site


@dataclass(frozen=True)
class SiteStarted:
    """Site `index` is mapped and about to be verbalised."""

    index: int
    mapping_id: str  # empty for same-model sites
    mapping_r2: float | None
    mapped_norm: float  # |f(h)|, beside the target layer's typical norm: a map far off shows here
    target_layer_norm: float | None


@dataclass(frozen=True)
class SiteToken:
    """One generated token of site `index` (`text` may be empty mid-character)."""

    index: int
    step: int
    token_id: int
    text: str


@dataclass(frozen=True)
class Control:
    """What the target says without the patch, and how much the patch changed it, for one site.

    `patch_effect` is the total-variation distance between the target's first-step next-token
    distributions with and without the patch, in [0, 1]. `dependence` is `explanation_logprob` (mean
    log-probability per token of the explanation in the patched run) minus `unpatched_logprob` (the same
    tokens scored teacher-forced without the patch), in nats per token: near 0, the target would have said
    it anyway. `confidence` is a calibrator's probability that the answer is right (None without one).
    For the logit lens the control is the unpatched reading at the same site, and the log-probabilities
    are those of the site's top-1 token in the two readings (engine/lens_control.py says why).
    """

    unpatched_explanation: str
    unpatched_answer: str
    same_as_unpatched: bool
    patch_effect: float | None
    explanation_logprob: float | None
    unpatched_logprob: float | None
    dependence: float | None
    confidence: float | None = None
    calibrator_id: str = ""  # empty: no calibrator registered for this (source, target, preset)
    # The logit lens only: the unpatched reading's (token, probability) pairs (engine/lens_control.py).
    unpatched_top_k: list[tuple[str, float]] | None = None
    # With the mean-state control: what the target says with its layer ℓ*'s mean state at the site
    # (engine/layer_stats.py), its answer, and whether the site's answer equals it (None without it).
    mean_state_explanation: str | None = None
    mean_state_answer: str | None = None
    same_as_mean_state: bool | None = None


@dataclass(frozen=True)
class SiteFinished:
    """Site `index` is done: its explanation, the answer a metric compares, and where time went."""

    index: int
    explanation: str
    answer: str
    top_k: list[tuple[str, float]] | None = None  # the logit lens only
    timings: Timings = field(default_factory=Timings)
    control: Control | None = None  # None when the request turned controls off


Event = SiteStarted | SiteToken | SiteFinished


@dataclass(frozen=True)
class SiteResult:
    """The explanation of one site, as the CLI and the experiments read it."""

    site: Site
    source_token: str
    explanation: str
    answer: str
    mapping_id: str | None = None
    mapping_r2: float | None = None
    top_k: list[tuple[str, float]] | None = None
    control: Control | None = None

    def to_json(self) -> dict[str, object]:
        record: dict[str, object] = {
            "source_layer": self.site.source_layer,
            "target_layer": self.site.target_layer,
            "position": self.site.position,
            "source_token": self.source_token,
            "explanation": self.explanation,
            "answer": self.answer,
            "mapping_id": self.mapping_id,
            "mapping_r2": self.mapping_r2,
        }
        if self.top_k is not None:
            record["top_k"] = [{"token": t, "prob": p} for t, p in self.top_k]
        c = self.control
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
class Explanation:
    """The results of a sweep, in site order, with where its time went."""

    results: list[SiteResult]
    timings: Timings
