"""Labelled sites: explanations whose right answer is known, run through the one pipeline with controls.

Identity: a corpus sentence cut after a word, explained at its last token; right when the answer is that
word. Attribute: an LRE subject in its relation's own template, explained through that template; right
when the object appears in the explanation (the paper's rule). Every item is split by its word or subject,
so the held-out figures are on words and subjects the calibrator never saw.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from patchscope.engine.generation import GenerationConfig
from patchscope.engine.hooks import extract
from patchscope.engine.models import LoadedModel
from patchscope.eval.common import contains, placeholder_template, read_relations
from patchscope.explain import ActivationsRequest, LocalBackend, TargetSpec, explain
from patchscope.explain.plan import MappingResolver
from patchscope.explain.signals import Features, features_of, same_answer
from patchscope.mapping.pipeline import depth_proportional

WORD = re.compile(r"[A-Za-z]{3,}")
CHUNK = 64  # rows per batched generation: bounds the logits kept for the controls


@dataclass(frozen=True)
class Item:
    """A source prompt whose last token's state is explained; `group` decides its split."""

    prompt: str
    template: str | None  # None: the preset's
    expected: str
    group: str


@dataclass(frozen=True)
class Labelled:
    """One explained site with its features and whether its answer was right."""

    features: Features
    correct: bool
    group: str
    answer: str
    expected: str


def is_test(group: str, seed: int) -> bool:
    """Half the groups, chosen by a seeded hash: stable across runs and machines."""
    return hashlib.sha256(f"{seed}:{group}".encode()).digest()[0] % 2 == 1


def identity_items(corpus: Path, count: int, seed: int) -> list[Item]:
    """Sentence prefixes of the corpus ending in an alphabetic word (at most 12 words of context)."""
    if not corpus.is_file():
        raise FileNotFoundError(f"corpus {corpus} does not exist")
    lines = [
        line.split() for line in corpus.read_text(encoding="utf-8").splitlines() if len(line.split()) > 8
    ]
    rng = random.Random(seed)
    items, seen = [], set()
    while len(items) < count and lines:
        words = rng.choice(lines)
        cut = rng.randrange(2, len(words))
        if not WORD.fullmatch(words[cut]) or words[cut].lower() in seen:
            continue
        seen.add(words[cut].lower())
        items.append(Item(" ".join(words[max(0, cut - 11) : cut + 1]), None, words[cut], words[cut].lower()))
    return items


def attribute_items(lre: Path, count: int, seed: int) -> list[Item]:
    """Subjects in their relation's template, cut after the subject; relations taken in turn."""
    relations = read_relations(lre)
    rng = random.Random(seed)
    pools = [[(r, s) for s in rng.sample(list(r.samples), len(r.samples))] for r in relations]
    items: list[Item] = []
    while len(items) < count and any(pools):
        for pool in pools:
            if pool and len(items) < count:
                relation, sample = pool.pop()
                prefix = relation.template.split("{}")[0]
                template, _ = placeholder_template(relation.template)
                items.append(Item(prefix + sample.subject, template, sample.object, sample.subject.lower()))
    return items


def right(preset: str, answer: str, explanation: str, expected: str) -> bool:
    if preset == "identity":
        return same_answer(answer, expected)
    return contains(explanation, expected)


def label(
    source: LoadedModel,
    backend: LocalBackend,
    target_id: str,
    preset: str,
    items: Sequence[Item],
    layer_pairs: Sequence[tuple[int, int]],
    resolve: MappingResolver,
    *,
    max_new_tokens: int = 10,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> list[Labelled]:
    """Explain every item at every layer pair (last token), rows of one template batched together."""
    source_layers = sorted({a for a, _ in layer_pairs})
    by_template: dict[str | None, list[tuple[Item, torch.Tensor]]] = {}
    for k, item in enumerate(items):
        states = extract(source, item.prompt, source_layers, [-1]).states[:, 0]  # [l, d]
        by_template.setdefault(item.template, []).append((item, states))
        progress(k + 1, 2 * len(items))
    labelled: list[Labelled] = []
    total = sum(len(group) for group in by_template.values()) * len(layer_pairs)
    done = 0
    for template, group_items in by_template.items():
        # one row per (item, layer pair), rows of one template batched together
        group = [
            (item, states[source_layers.index(a)], a, b)
            for item, states in group_items
            for a, b in layer_pairs
        ]
        for start in range(0, len(group), CHUNK):
            chunk = group[start : start + CHUNK]
            request = ActivationsRequest(
                source=source.id,
                states=torch.stack([r[1] for r in chunk]),
                layers=tuple(r[2] for r in chunk),
                target=TargetSpec(
                    model=target_id,
                    preset=preset,
                    template=template,
                    layers=tuple(r[3] for r in chunk),
                    generation=GenerationConfig(max_new_tokens=max_new_tokens),
                ),
                fingerprint=source.fingerprint,
            )
            result = explain(backend, request, resolve)
            target_layers = backend.targets[target_id].model.facts.num_layers
            for (item, _, a, b), site in zip(chunk, result.results, strict=True):
                assert site.control is not None
                depths = (a / max(1, source.facts.num_layers - 1), b / max(1, target_layers - 1))
                labelled.append(
                    Labelled(
                        features=features_of(site.control, depths, site.mapping_r2),
                        correct=right(preset, site.answer, site.explanation, item.expected),
                        group=item.group,
                        answer=site.answer,
                        expected=item.expected,
                    )
                )
            done += len(chunk)
            progress(len(items) + done * len(items) // max(1, total), 2 * len(items))
    return labelled


def default_pairs(
    source: LoadedModel, target: LoadedModel, registered: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Same model: five layers from shallow to deep; cross-model: every registered pair."""
    if source.fingerprint == target.fingerprint:
        L = source.facts.num_layers
        layers = sorted({round(x * (L - 2) / 4) + 1 for x in range(5)})
        return [(a, a) for a in layers]
    if not registered:
        L, L_star = source.facts.num_layers, target.facts.num_layers
        raise FileNotFoundError(
            f"no mappings registered for {source.id} -> {target.id}: fit some first, e.g. "
            f"patchscope fit-mapping --source {source.id} --target {target.id} --pairs "
            f"2:{depth_proportional(2, L, L_star)}"
        )
    return sorted(registered)
