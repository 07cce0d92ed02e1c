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
class SiteFinished:
    """Site `index` is done: its explanation, the answer a metric compares, and where time went."""

    index: int
    explanation: str
    answer: str
    top_k: list[tuple[str, float]] | None = None  # the logit lens only
    timings: Timings = field(default_factory=Timings)


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
        return record


@dataclass
class Explanation:
    """The results of a sweep, in site order, with where its time went."""

    results: list[SiteResult]
    timings: Timings
