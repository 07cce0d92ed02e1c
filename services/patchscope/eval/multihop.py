"""Experiment 4 (paper §5): two-hop questions, and the CoT Patchscope that answers them in two passes.

A two-hop query composes two LRE relations whose first object is the second's subject (the Eiffel Tower
→ France → Paris). The compositions are listed in `COMPOSITIONS` with a hand-written one-sentence prompt
for each; the samples are every pair the data joins (case-insensitive match of the first object with a
subject of the second relation). Only queries whose two hops the model answers on their own are kept, as
in the paper. Three ways to answer:

- **vanilla**: the one-sentence composed prompt, greedy;
- **chain of thought (prompted)**: hop 1 prompted, its generated answer (first line, up to a period)
  placed into hop 2's prompt — the step-by-step chain, made explicit for a model this small;
- **CoT Patchscope**: hop 1's prompt is the source; the state of its last token at layer ℓ is patched
  into hop 2's template at the placeholder at ℓ*; correct when the second object appears.

The Patchscope is reported at the best fixed (ℓ, ℓ*) pair and as an oracle over all pairs tried.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from patchscope.engine.generation import PatchedRow, RowPatch
from patchscope.engine.hooks import extract
from patchscope.engine.models import LoadedModel
from patchscope.eval.common import (
    Progress,
    Relation,
    contains,
    no_progress,
    patched_texts,
    placeholder_template,
    plain_texts,
    pyplot,
    save_figure,
    subsample,
)


@dataclass(frozen=True)
class Composition:
    """Two relations chained through the first one's object, and the one-prompt question for them."""

    first: str  # relation of hop 1 (subject -> bridge)
    second: str  # relation of hop 2 (bridge -> answer)
    prompt: str  # the composed question as one prompt, `{}` = the subject


COMPOSITIONS = (
    Composition(
        "landmark_in_country", "country_capital_city", "The capital city of the country where {} is, is"
    ),
    Composition("landmark_in_country", "country_language", "People in the country where {} is speak"),
    Composition(
        "landmark_in_country", "country_largest_city", "The largest city in the country where {} is, is"
    ),
    Composition("product_by_company", "company_ceo", "The CEO of the company that created {} is"),
    Composition(
        "product_by_company", "company_hq", "The company that created {} is headquartered in the city of"
    ),
    Composition(
        "company_hq", "landmark_on_continent", "The city where {} is headquartered is on the continent of"
    ),
    Composition("person_father", "person_mother", "{}'s father's mother is named"),
)


@dataclass(frozen=True)
class TwoHop:
    """One two-hop query: subject -> bridge (hop 1) -> answer (hop 2)."""

    composition: Composition
    subject: str
    bridge: str
    answer: str


def join(relations: Sequence[Relation]) -> dict[Composition, list[TwoHop]]:
    """Every two-hop query the data supports, per composition."""
    by_name = {r.name: r for r in relations}
    out: dict[Composition, list[TwoHop]] = {}
    for comp in COMPOSITIONS:
        if comp.first not in by_name or comp.second not in by_name:
            continue
        second = {s.subject.lower(): s for s in by_name[comp.second].samples}
        out[comp] = [
            TwoHop(comp, s.subject, s.object, second[s.object.lower()].object)
            for s in by_name[comp.first].samples
            if s.object.lower() in second
        ]
    return out


def first_answer(text: str) -> str:
    """The bridge entity a model generated: its first line, up to the first period or comma."""
    line = text.strip().split("\n")[0]
    for stop in (".", ",", ";"):
        line = line.split(stop)[0]
    return line.strip()


def literal(template: str) -> str:
    """An LRE template with the placeholder token written out, as the patched rows see it before the patch."""
    engine_template, filler = placeholder_template(template)
    return engine_template.replace("{}", filler, 1)


def run(
    model: LoadedModel,
    relations: Sequence[Relation],
    *,
    layer_step: int = 3,
    max_samples: int | None = 40,
    max_new_tokens: int = 8,
    seed: int = 0,
    progress: Progress = no_progress,
) -> dict:
    """Vanilla vs prompted chain of thought vs CoT Patchscope on the queries the model can do hop by hop."""
    started = time.perf_counter()
    by_name = {r.name: r for r in relations}
    layers = list(range(0, model.facts.num_layers, layer_step))
    grid = [(a, b) for a in layers for b in layers]
    joined = join(relations)
    found = {f"{c.first} -> {c.second}": len(v) for c, v in joined.items()}
    queries = [q for comp in joined for q in subsample(joined[comp], max_samples, seed)]
    tried = len(queries)

    hop1 = plain_texts(
        model, [by_name[q.composition.first].template.format(q.subject) for q in queries], max_new_tokens
    )
    progress("hops", 1, 4)
    hop2 = plain_texts(
        model, [by_name[q.composition.second].template.format(q.bridge) for q in queries], max_new_tokens
    )
    progress("hops", 2, 4)
    kept = [k for k, q in enumerate(queries) if contains(hop1[k], q.bridge) and contains(hop2[k], q.answer)]
    queries = [queries[k] for k in kept]
    hop1 = [hop1[k] for k in kept]
    vanilla = plain_texts(model, [q.composition.prompt.format(q.subject) for q in queries], max_new_tokens)
    progress("hops", 3, 4)
    chained = plain_texts(
        model,
        [
            by_name[q.composition.second].template.format(first_answer(h))
            for q, h in zip(queries, hop1, strict=False)
        ],
        max_new_tokens,
    )
    progress("hops", 4, 4)

    rows, owners = [], []
    for k, q in enumerate(queries):
        first_prompt = by_name[q.composition.first].template.format(q.subject)
        states = extract(model, first_prompt, layers, [-1]).states[:, 0]  # [l, d]
        template, filler = placeholder_template(by_name[q.composition.second].template)
        for a, b in grid:
            rows.append(PatchedRow(template, filler, (RowPatch(layer=b, vector=states[layers.index(a)]),)))
            owners.append((k, a, b))
    texts = patched_texts(model, rows, max_new_tokens, progress=progress, phase="CoT Patchscope")
    # The control: hop 2's template with its literal placeholder, nothing patched. A patch that leaves
    # the model reading "x" scores this; only accuracy above it comes from the state.
    unpatched = plain_texts(
        model,
        [literal(by_name[q.composition.second].template) for q in queries],
        max_new_tokens,
    )
    hits = torch.zeros(len(queries), len(grid), dtype=torch.bool)
    for (k, a, b), text in zip(owners, texts, strict=True):
        hits[k, grid.index((a, b))] = contains(text, queries[k].answer)

    n = len(queries)
    pair_accuracy = hits.float().mean(dim=0) if n else torch.zeros(len(grid))
    best = int(pair_accuracy.argmax()) if n else 0
    return {
        "experiment": "multi-hop",
        "model": model.id,
        "found": found,
        "tried": tried,
        "evaluated": n,
        "layers": layers,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "vanilla": sum(contains(t, q.answer) for t, q in zip(vanilla, queries, strict=False)) / n
        if n
        else 0.0,
        "chain_of_thought": sum(contains(t, q.answer) for t, q in zip(chained, queries, strict=False)) / n
        if n
        else 0.0,
        "unpatched_template": sum(contains(t, q.answer) for t, q in zip(unpatched, queries, strict=True)) / n
        if n
        else 0.0,
        "patchscope_best_pair": list(grid[best]),
        "patchscope_best_pair_accuracy": float(pair_accuracy[best]) if n else 0.0,
        "patchscope_oracle": float(hits.any(dim=1).float().mean()) if n else 0.0,
        "pair_accuracy": {
            f"{a}:{b}": float(v) for (a, b), v in zip(grid, pair_accuracy.tolist(), strict=False)
        },
        "seconds": round(time.perf_counter() - started, 1),
        "queries": [
            {
                "composition": f"{q.composition.first} -> {q.composition.second}",
                "subject": q.subject,
                "bridge": q.bridge,
                "answer": q.answer,
                "vanilla": v,
                "chain_of_thought": c,
                "patchscope_best_pair": texts[k * len(grid) + best],
            }
            for k, (q, v, c) in enumerate(zip(queries, vanilla, chained, strict=False))
        ],
    }


def plot(result: dict, path: Path) -> Path:
    """Accuracy of the CoT Patchscope per (ℓ, ℓ*) as a heat map, with the baselines in the title."""
    plt = pyplot()
    layers = result["layers"]
    grid = [[result["pair_accuracy"][f"{a}:{b}"] for b in layers] for a in layers]
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    image = ax.imshow(grid, origin="lower", cmap="viridis", vmin=0, vmax=max(0.05, max(map(max, grid))))
    ax.set_xticks(range(len(layers)), layers)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("target layer ℓ* (hop 2 template)")
    ax.set_ylabel("source layer ℓ (hop 1 prompt)")
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(
        f"CoT Patchscope, {result['evaluated']} queries; vanilla {result['vanilla']:.2f}, "
        f"CoT {result['chain_of_thought']:.2f}",
        fontsize=9,
    )
    save_figure(fig, path)
    plt.close(fig)
    return path
