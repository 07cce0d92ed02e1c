"""The rows behavioural fitting (mapping/behavioural.py) trains and is measured on, before any patch runs.

Why apart: which subjects and words land in which split is what keeps every held-out row away from the
fit; the fit, the behaviour metrics and `fit-mapping` all read these rows, and building them needs no
autograd and no patched forward, only the relations, the corpus carriers and the words both tokenizers
share.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from patchscope.engine.models import LoadedModel
from patchscope.engine.presets import PRESETS
from patchscope.eval.common import (
    SOURCE_CONTEXT,
    Relation,
    placeholder_template,
    read_relations,
    target_template,
)
from patchscope.mapping.collect import shared_words
from patchscope.mapping.corpus import CARRIERS

SPLITS = ("train", "validation", "test")


def split_of(key: str, seed: int, shares: tuple[float, float] = (0.7, 0.1)) -> str:
    """The split of `key` from a seeded hash: a subject or word lands in one split only."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "train" if u < shares[0] else "validation" if u < shares[0] + shares[1] else "test"


@dataclass(frozen=True)
class BehaviourTemplate:
    """A target template the fit patches: its text, its filler and what kind of reading it asks for."""

    name: str
    template: str
    filler: str


def templates_for(relations: Sequence[Relation]) -> dict[str, BehaviourTemplate]:
    """The identity and description presets and every relation's attribute template."""
    out = {
        name: BehaviourTemplate(name, PRESETS[name].template, PRESETS[name].filler)
        for name in ("identity", "description")
    }
    for relation in relations:
        template, filler = placeholder_template(target_template(relation.template))
        out[relation.name] = BehaviourTemplate(relation.name, template, filler)
    return out


@dataclass(frozen=True)
class TextRow:
    """One training example before any model runs: a source text read at its last token, a template."""

    text: str
    template: str  # a key of the templates dict


@dataclass
class BehaviourData:
    """Texts and templates of each split, and the held-out evaluation sets of `behaviour_metrics`."""

    templates: dict[str, BehaviourTemplate]
    rows: dict[str, list[TextRow]]
    identity_words: list[str]  # held-out words for the identity rate
    attribute_samples: list[tuple[str, str, str]]  # held-out (relation, subject, object)
    relations: dict[str, Relation] = field(default_factory=dict)
    # The same kinds of sets from the validation split: what a layer pair or a method is chosen on, so
    # that the test sets above only report the choice.
    validation_words: list[str] = field(default_factory=list)
    validation_samples: list[tuple[str, str, str]] = field(default_factory=list)

    def evaluation(self, split: str) -> tuple[list[str], list[tuple[str, str, str]]]:
        """The identity words and attribute samples of `split` ("validation" or "test")."""
        if split == "validation":
            return self.validation_words, self.validation_samples
        if split == "test":
            return self.identity_words, self.attribute_samples
        raise ValueError(f"evaluation split is validation or test, not {split!r}")

    def subject_texts(self, split: str) -> list[str]:
        """The subjects of `split` as the source reads them (in `SOURCE_CONTEXT`), each once.

        Why: a map fitted on corpus word ends has seen few states of a name read after a short lead; these
        texts add such states to a ridge fit without touching a held-out subject.
        """
        texts = {row.text for row in self.rows[split] if row.template in self.relations}
        return sorted(texts)


def build_data(
    source: LoadedModel,
    target: LoadedModel,
    relations: Sequence[Relation],
    *,
    seed: int = 0,
    subjects_per_relation: int = 24,
    words: int = 600,
    identity_eval: int = 100,
    attribute_eval_per_relation: int = 8,
    validation_eval_per_relation: int | None = None,
    exclude_words: set[str] | None = None,
) -> BehaviourData:
    """Rows split by subject (LRE) and by word (shared single-token words), never by row.

    A subject, read in `SOURCE_CONTEXT` as the experiments read it, gives an attribute row (its relation's
    template, led as `target_template` leads it) and an identity row; a word, put at the end
    of one of the corpus carriers, gives an identity row and a description row. Test subjects and words
    give the held-out KL rows and the metrics' test samples (`attribute_eval_per_relation` each); no fit
    sees them. Validation subjects and words give the early-stopping rows and the samples a choice
    between maps is made on (`validation_eval_per_relation` each, default as many as the test's).
    """
    templates = templates_for(relations)
    rows: dict[str, list[TextRow]] = {s: [] for s in SPLITS}
    samples: dict[str, list[tuple[str, str, str]]] = {"validation": [], "test": []}
    caps = {
        "train": subjects_per_relation,
        "validation": max(2, subjects_per_relation // 6),
        "test": attribute_eval_per_relation,
    }
    eval_caps = {
        "validation": attribute_eval_per_relation
        if validation_eval_per_relation is None
        else validation_eval_per_relation,
        "test": attribute_eval_per_relation,
    }
    for relation in relations:
        taken = {s: 0 for s in SPLITS}
        held = {"validation": 0, "test": 0}
        seen: set[str] = set()
        for sample in relation.samples:
            if sample.subject in seen or not sample.subject.strip():
                continue
            seen.add(sample.subject)
            part = split_of(sample.subject, seed)
            if part in samples and held[part] < eval_caps[part]:
                held[part] += 1
                samples[part].append((relation.name, sample.subject, sample.object))
            if taken[part] >= caps[part]:
                continue
            taken[part] += 1
            text = SOURCE_CONTEXT.format(sample.subject)
            rows[part].append(TextRow(text, relation.name))
            rows[part].append(TextRow(text, "identity"))
    vocabulary = shared_words(source, target, exclude_words or set())
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for word in vocabulary:
        by_split[split_of("word:" + word, seed)].append(word)
    rng = random.Random(seed)
    budget = {"train": words, "validation": max(20, words // 8), "test": identity_eval}
    chosen = {}
    for part in SPLITS:
        chosen[part] = rng.sample(by_split[part], min(budget[part], len(by_split[part])))
        for word in chosen[part]:
            text = rng.choice(CARRIERS).format(word)
            rows[part].append(TextRow(text, "identity"))
            rows[part].append(TextRow(text, "description"))
    return BehaviourData(
        templates,
        rows,
        sorted(chosen["test"]),
        samples["test"],
        {r.name: r for r in relations},
        validation_words=sorted(chosen["validation"][:identity_eval]),
        validation_samples=samples["validation"],
    )


def default_relations() -> list[Relation]:
    from patchscope.data import data_root

    return read_relations(data_root() / "lre")
