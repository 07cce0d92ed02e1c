"""Faithfulness signals: what each explanation is worth, from the controls run in the same batch.

A Patchscope explanation can come from the patched state or from the target's own habits. The unpatched
control row says what the target produces with no state at all; the first-step distance and the
teacher-forced scores say how much the state moved the target. A calibrator, fitted on data with known
answers, turns these into the probability that the answer is right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from patchscope.explain.events import Control


@dataclass(frozen=True)
class Features:
    """What a calibrator reads of one site (every field is known before the answer is checked)."""

    patch_effect: float
    dependence: float
    explanation_logprob: float
    same_as_unpatched: bool
    source_depth: float  # ℓ / (L − 1)
    target_depth: float  # ℓ* / (L* − 1)
    mapping_r2: float  # 1 for the same model (no map)

    NAMES = (
        "patch_effect",
        "dependence",
        "explanation_logprob",
        "same_as_unpatched",
        "source_depth",
        "target_depth",
        "mapping_r2",
    )

    def vector(self) -> list[float]:
        return [float(getattr(self, name)) for name in self.NAMES]


def features_of(control: Control, depths: tuple[float, float], mapping_r2: float | None) -> Features:
    """The features of a finished site, as the pipeline computed them (calibration reads them back)."""
    return Features(
        patch_effect=control.patch_effect or 0.0,
        dependence=control.dependence or 0.0,
        explanation_logprob=control.explanation_logprob or 0.0,
        same_as_unpatched=control.same_as_unpatched,
        source_depth=depths[0],
        target_depth=depths[1],
        mapping_r2=1.0 if mapping_r2 is None else mapping_r2,
    )


class Calibrator(Protocol):
    """P(answer right | features) for one (source, target, preset); `calibration/` holds the real one."""

    @property
    def id(self) -> str: ...

    def confidence(self, features: Features) -> float: ...


def same_answer(a: str, b: str) -> bool:
    """Answers compare case-insensitively (DESIGN.md: every "first generated word" means `answer`)."""
    return a.strip().casefold() == b.strip().casefold()


def control(
    *,
    answer: str,
    unpatched_explanation: str,
    unpatched_answer: str,
    patch_effect: float | None,
    explanation_logprob: float | None,
    unpatched_logprob: float | None,
    depths: tuple[float, float],
    mapping_r2: float | None,
    calibrator: Calibrator | None,
    unpatched_top_k: list[tuple[str, float]] | None = None,
    mean_state: tuple[str, str] | None = None,
) -> Control:
    """The control record of one site, with its confidence when a calibrator is registered.

    `mean_state`: the mean-state row's explanation and answer, when the request asked for it.
    """
    same = same_answer(answer, unpatched_answer)
    dependence = None
    if explanation_logprob is not None and unpatched_logprob is not None:
        dependence = explanation_logprob - unpatched_logprob
    confidence = None
    if calibrator is not None:
        features = Features(
            patch_effect=patch_effect or 0.0,
            dependence=dependence or 0.0,
            explanation_logprob=explanation_logprob or 0.0,
            same_as_unpatched=same,
            source_depth=depths[0],
            target_depth=depths[1],
            mapping_r2=1.0 if mapping_r2 is None else mapping_r2,
        )
        confidence = calibrator.confidence(features)
    return Control(
        unpatched_explanation=unpatched_explanation,
        unpatched_answer=unpatched_answer,
        same_as_unpatched=same,
        patch_effect=patch_effect,
        explanation_logprob=explanation_logprob,
        unpatched_logprob=unpatched_logprob,
        dependence=dependence,
        confidence=confidence,
        calibrator_id=calibrator.id if calibrator is not None else "",
        unpatched_top_k=unpatched_top_k,
        mean_state_explanation=mean_state[0] if mean_state else None,
        mean_state_answer=mean_state[1] if mean_state else None,
        same_as_mean_state=same_answer(answer, mean_state[1]) if mean_state else None,
    )
