"""Held-out behaviour of a fitted map, recorded in the registry beside R² (see mapping/behavioural.py).

Why apart: the identity rate, the attribute accuracy next to the same-model reference and the share of
answers equal to the unpatched control run the target's ordinary patched generation on held-out words
and subjects, for any map (ridge maps too), so they need the rows and the state readers but not the
training loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from patchscope.engine.generation import PatchedRow, RowPatch
from patchscope.engine.models import LoadedModel
from patchscope.engine.presets import PRESETS, identity_answer
from patchscope.eval.common import SOURCE_CONTEXT, contains, patched_texts, plain_texts
from patchscope.mapping.behaviour_data import BehaviourData
from patchscope.mapping.behaviour_forward import _last_token_states

IDENTITY_PROMPT = "I saw the {}"  # the source prompt of the identity metric (as bench_mapping.py's)


@dataclass(frozen=True)
class BehaviourMetrics:
    """Held-out behaviour of one map (NaN where not measured), recorded beside R²."""

    identity_rate: float = math.nan
    identity_n: int = 0
    attribute_accuracy: float = math.nan
    attribute_reference: float = math.nan  # the same-model target at ℓ* on the same samples
    attribute_n: int = 0
    unpatched_share: float = math.nan  # attribute explanations equal to the template's unpatched output
    kl: float = math.nan  # coarse KL on the held-out rows, when measured
    # Per sample, in the metric set's order: the mapped hit and the same-model hit (paired intervals).
    attribute_hits: tuple[bool, ...] = ()
    reference_hits: tuple[bool, ...] = ()

    @property
    def measured(self) -> bool:
        return self.identity_n > 0 or self.attribute_n > 0

    @property
    def attribute_ratio(self) -> float:
        """Attribute accuracy through the map over the same-model target's on the same samples."""
        return self.attribute_accuracy / self.attribute_reference if self.attribute_reference else math.nan


@dataclass
class MetricSet:
    """What `behaviour_metrics` reuses across maps of one target layer: known samples, controls, reference."""

    words: list[str]
    samples: list[tuple[str, str, str]]  # known by the target in plain text: (relation, subject, object)
    controls: dict[str, str]  # relation -> the template's output with no patch
    reference_hits: dict[int, list[bool]] = field(default_factory=dict)  # ℓ* -> same-model hits


def metric_set(
    target: LoadedModel, data: BehaviourData, *, split: str = "test", max_new_tokens: int = 8
) -> MetricSet:
    """The held-out samples of `split` the target answers in plain text, and the unpatched controls.

    `split="validation"` gives the set a layer pair or a method is chosen on; the test set then reports
    the choice without having made it.
    """
    words, samples = data.evaluation(split)
    prompts = [data.relations[r].template.format(s) for r, s, _ in samples]
    plain = plain_texts(target, prompts, max_new_tokens)
    known = [smp for smp, text in zip(samples, plain, strict=True) if contains(text, smp[2])]
    names = sorted({r for r, _, _ in known})
    rows = [PatchedRow(data.templates[r].template, data.templates[r].filler, ()) for r in names]
    controls = dict(zip(names, patched_texts(target, rows, max_new_tokens), strict=True))
    return MetricSet(words, known, controls)


def _attribute_texts(
    target: LoadedModel,
    data: BehaviourData,
    samples: list[tuple[str, str, str]],
    vectors: torch.Tensor,
    layer: int,
    max_new_tokens: int,
) -> list[str]:
    rows = [
        PatchedRow(data.templates[r].template, data.templates[r].filler, (RowPatch(layer, vectors[i]),))
        for i, (r, _, _) in enumerate(samples)
    ]
    return patched_texts(target, rows, max_new_tokens)


def behaviour_metrics(
    source: LoadedModel,
    target: LoadedModel,
    a: int,
    b: int,
    mapping: Callable[[torch.Tensor], torch.Tensor],
    data: BehaviourData,
    metrics: MetricSet,
    *,
    max_new_tokens: int = 8,
) -> BehaviourMetrics:
    """Identity rate, attribute accuracy (with the same-model reference) and the unpatched share."""
    identity_hits = 0
    if metrics.words:
        x = _last_token_states(source, [IDENTITY_PROMPT.format(w) for w in metrics.words], a)
        with torch.no_grad():
            mapped = mapping(x)
        preset = PRESETS["identity"]
        rows = [PatchedRow(preset.template, preset.filler, (RowPatch(b, v),)) for v in mapped]
        texts = patched_texts(target, rows, 4)
        identity_hits = sum(
            identity_answer(t).lower() == w.lower() for t, w in zip(texts, metrics.words, strict=True)
        )
    samples = metrics.samples
    accuracy = reference = share = math.nan
    hits: list[bool] = []
    if samples:
        subjects = [SOURCE_CONTEXT.format(s) for _, s, _ in samples]
        with torch.no_grad():
            mapped = mapping(_last_token_states(source, subjects, a))
        texts = _attribute_texts(target, data, samples, mapped, b, max_new_tokens)
        hits = [contains(t, o) for t, (_, _, o) in zip(texts, samples, strict=True)]
        if b not in metrics.reference_hits:
            own = _last_token_states(target, subjects, b)
            own_texts = _attribute_texts(target, data, samples, own, b, max_new_tokens)
            metrics.reference_hits[b] = [
                contains(t, o) for t, (_, _, o) in zip(own_texts, samples, strict=True)
            ]
        accuracy = sum(hits) / len(samples)
        reference = sum(metrics.reference_hits[b]) / len(samples)
        same = [t == metrics.controls[r] for t, (r, _, _) in zip(texts, samples, strict=True)]
        share = sum(same) / len(samples)
    n_words = len(metrics.words)
    return BehaviourMetrics(
        identity_rate=identity_hits / n_words if n_words else math.nan,
        identity_n=n_words,
        attribute_accuracy=accuracy,
        attribute_reference=reference,
        attribute_n=len(samples),
        unpatched_share=share,
        attribute_hits=tuple(hits),
        reference_hits=tuple(metrics.reference_hits.get(b, [])) if samples else (),
    )
