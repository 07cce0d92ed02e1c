"""Experiment 4 (paper §5): two-hop questions, and the CoT Patchscope that answers them in two passes.

Compositions are read from the data: any two LRE relations where the first's range is the second's domain
(their LRE properties) and objects of the first are subjects of the second (case-insensitive) compose, for
every sample the data joins (the Eiffel Tower → France → Paris).
The query τ is split as in the paper into π1, a phrase that names the bridge (`the {range} of {subject}`,
the range name from the first relation's LRE properties: "the country of the Eiffel Tower"), and π2, the
second relation's template with π1 in its placeholder ("The capital city of [π1] is"). Only queries whose
two hops the model answers on their own are kept, as in the paper. Methods, all greedy, `max_new_tokens`
(the plain prompts in padded batches, `plain.batched_plain_texts`, since every query's prompt differs):

- **vanilla**: τ itself;
- **"Let's think step by step"**: the paper's baseline, literally (`COT_PROMPT`), reported even if a
  model this small cannot use it;
- **two-step chain**: hop 1 prompted, its answer placed into hop 2's prompt (an upper reference: the
  filter already checked both prompts);
- **CoT Patchscope**: S = π1 and T = π2 with the placeholder `x`; the state of π1's last token at ℓ is
  patched at the placeholder (π1's place in π2) at ℓ*, for every (ℓ, ℓ*) of a stated grid;
- **controls**: T with `x` and nothing patched, T with ℓ*'s mean state patched at `x` (the mean-state
  control: the prompt's and the layer's own answer, which holds nothing about the subject), and a constant
  answer per composition (its most common answer), each of which a Patchscope figure must beat to show
  anything. The mean-state control is read at every ℓ* of the grid and, like the pairs, summarised at the
  best fixed pair's ℓ*, at its own best ℓ* (chosen after seeing the answers, as the best pair is) and
  over any ℓ* (beside the Patchscope's oracle).

Every pair's generation is stored per query, so the best pair and the oracle can be audited.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from patchscope.engine.generation import PatchedRow, RowPatch
from patchscope.engine.hooks import extract
from patchscope.engine.layer_stats import layer_stats
from patchscope.engine.models import LoadedModel
from patchscope.eval.common import (
    Progress,
    Relation,
    hits_string,
    layer_grid,
    mean_state_texts,
    mentions,
    no_progress,
    patched_texts,
    placeholder_template,
    proportion,
    pyplot,
    save_figure,
    subsample,
    trivial_object,
    unpatched_texts,
)
from patchscope.eval.plain import batched_plain_texts

COT_PROMPT = "Let's think step by step. {}"
MIN_QUERIES = 1  # a composition with fewer joined samples is not listed


@dataclass(frozen=True)
class Composition:
    """Two relations chained through the first one's object."""

    first: Relation  # hop 1 (subject -> bridge)
    second: Relation  # hop 2 (bridge -> answer)
    range_name: str  # what hop 1's object is ("country"), from the LRE properties

    @property
    def name(self) -> str:
        return f"{self.first.name} -> {self.second.name}"

    def pi1(self, subject: str) -> str:
        return f"the {self.range_name} of {subject}"

    def query(self, subject: str) -> str:
        text = self.second.template.format(self.pi1(subject))
        return text[0].upper() + text[1:]


@dataclass(frozen=True)
class TwoHop:
    """One two-hop query: subject -> bridge (hop 1) -> answer (hop 2)."""

    composition: Composition
    subject: str
    bridge: str
    answer: str


def bridge_noun(relation: Relation) -> str:
    """The noun of π1: the range name ("country"), or the relation's last word within one kind.

    For person → person ("father") the relation's word says more than "the person of".
    """
    if relation.range_name and relation.range_name != relation.domain_name:
        return relation.range_name
    return relation.name.rsplit("_", 1)[-1]


def join(relations: Sequence[Relation]) -> dict[Composition, list[TwoHop]]:
    """Every two-hop query the data supports, per composition (pairs of distinct relations)."""
    out: dict[Composition, list[TwoHop]] = {}
    for first in relations:
        for second in relations:
            if first.name == second.name or (
                first.range_name and second.domain_name and first.range_name != second.domain_name
            ):
                continue  # the bridge must be of the kind hop 2 takes (LRE range = domain)
            by_subject = {s.subject.lower(): s for s in second.samples}
            queries = [
                (s.subject, s.object, by_subject[s.object.lower()].object)
                for s in first.samples
                if s.object.lower() in by_subject and not trivial_object(by_subject[s.object.lower()].object)
            ]
            if len(queries) >= MIN_QUERIES:
                comp = Composition(first, second, bridge_noun(first))
                out[comp] = [TwoHop(comp, *q) for q in queries]
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


def first_line(text: str) -> str:
    """The first line of a generation, the part compared with the mean-state control's."""
    return text.strip().split("\n", 1)[0].strip()


def _share(texts: Sequence[str], queries: Sequence[TwoHop]) -> dict:
    return proportion(sum(mentions(t, q.answer) for t, q in zip(texts, queries, strict=True)), len(queries))


def run(
    model: LoadedModel,
    relations: Sequence[Relation],
    *,
    layer_step: int = 4,
    max_samples: int | None = 40,
    max_new_tokens: int = 20,
    seed: int = 0,
    progress: Progress = no_progress,
) -> dict:
    """Vanilla vs step-by-step vs chain vs CoT Patchscope on the queries the model can do hop by hop."""
    started = time.perf_counter()
    layers = layer_grid(model.facts.num_layers, layer_step)
    grid = [(a, b) for a in layers for b in layers]
    joined = join(relations)
    found = {c.name: len(v) for c, v in joined.items()}
    queries = [q for comp in joined for q in subsample(joined[comp], max_samples, seed)]
    tried = len(queries)
    result: dict = {
        "experiment": "multi-hop",
        "model": model.id,
        "found": found,
        "tried": tried,
        "layers": layers,
        "layer_step": layer_step,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "cot_prompt": COT_PROMPT,
        "max_samples": max_samples,
    }
    if queries:
        hop1 = batched_plain_texts(
            model, [q.composition.first.template.format(q.subject) for q in queries], max_new_tokens
        )
        hop2 = batched_plain_texts(
            model, [q.composition.second.template.format(q.bridge) for q in queries], max_new_tokens
        )
        kept = [
            k for k, q in enumerate(queries) if mentions(hop1[k], q.bridge) and mentions(hop2[k], q.answer)
        ]
        queries, hop1 = [queries[k] for k in kept], [hop1[k] for k in kept]
    n = len(queries)
    result["evaluated"] = n
    result["evaluated_by_composition"] = dict(Counter(q.composition.name for q in queries))
    if not n:
        result["seconds"] = round(time.perf_counter() - started, 1)
        result["queries"] = []
        return result
    progress("hops", 1, 4)
    vanilla = batched_plain_texts(model, [q.composition.query(q.subject) for q in queries], max_new_tokens)
    step_by_step = batched_plain_texts(
        model, [COT_PROMPT.format(q.composition.query(q.subject)) for q in queries], max_new_tokens
    )
    progress("hops", 2, 4)
    chained = batched_plain_texts(
        model,
        [q.composition.second.template.format(first_answer(h)) for q, h in zip(queries, hop1, strict=True)],
        max_new_tokens,
    )
    progress("hops", 3, 4)
    controls, mean_state = {}, {}
    stats = layer_stats(model)
    for comp in {q.composition for q in queries}:
        template, filler = placeholder_template(comp.second.template)
        (controls[comp.name],) = unpatched_texts(model, template, filler, max_new_tokens)
        mean_state[comp.name] = mean_state_texts(model, template, filler, layers, max_new_tokens, stats=stats)
    progress("hops", 4, 4)

    rows = []
    for q in queries:
        states = extract(model, q.composition.pi1(q.subject), layers, [-1]).states[:, 0]  # [l, d]
        template, filler = placeholder_template(q.composition.second.template)
        for a, b in grid:
            rows.append(PatchedRow(template, filler, (RowPatch(layer=b, vector=states[layers.index(a)]),)))
    texts = patched_texts(model, rows, max_new_tokens, progress=progress, phase="CoT Patchscope")
    hits = torch.zeros(n, len(grid), dtype=torch.bool)
    for r, text in enumerate(texts):
        k, g = divmod(r, len(grid))
        hits[k, g] = mentions(text, queries[k].answer)
    pair_accuracy = hits.float().mean(dim=0)
    best = int(pair_accuracy.argmax())
    mean_hits = torch.tensor(  # [n, ℓ*]
        [[mentions(mean_state[q.composition.name][b], q.answer) for b in layers] for q in queries]
    )
    same_mean = [
        first_line(text)
        == first_line(mean_state[queries[r // len(grid)].composition.name][grid[r % len(grid)][1]])
        for r, text in enumerate(texts)
    ]
    mean_best = int(mean_hits.float().mean(dim=0).argmax())
    modal = {
        name: Counter(q.answer.lower() for q in queries if q.composition.name == name).most_common(1)[0][0]
        for name in result["evaluated_by_composition"]
    }
    result.update(
        vanilla=_share(vanilla, queries),
        step_by_step=_share(step_by_step, queries),
        chain=_share(chained, queries),
        no_patch_control=_share([controls[q.composition.name] for q in queries], queries),
        constant_answer=proportion(sum(q.answer.lower() == modal[q.composition.name] for q in queries), n),
        patchscope_best_pair=list(grid[best]),
        patchscope_best_pair_accuracy=proportion(int(hits[:, best].sum()), n),
        patchscope_oracle=proportion(int(hits.any(dim=1).sum()), n),
        pair_accuracy={f"{a}:{b}": float(v) for (a, b), v in zip(grid, pair_accuracy.tolist(), strict=True)},
        best_pair_distinct_outputs=len({texts[k * len(grid) + best].strip() for k in range(n)}),
        mean_state_at_best_pair=proportion(int(mean_hits[:, layers.index(grid[best][1])].sum()), n),
        mean_state_best_l_star=layers[mean_best],
        mean_state_best_l_star_accuracy=proportion(int(mean_hits[:, mean_best].sum()), n),
        mean_state_oracle=proportion(int(mean_hits.any(dim=1).sum()), n),
        same_as_mean_state=proportion(sum(same_mean), len(same_mean)),
        best_pair_same_as_mean_state=proportion(sum(same_mean[k * len(grid) + best] for k in range(n)), n),
        controls=controls,
        mean_state={name: {str(b): t for b, t in by.items()} for name, by in mean_state.items()},
        seconds=round(time.perf_counter() - started, 1),
        queries=[
            {
                "composition": q.composition.name,
                "subject": q.subject,
                "bridge": q.bridge,
                "answer": q.answer,
                "pi1": q.composition.pi1(q.subject),
                "query": q.composition.query(q.subject),
                "vanilla": vanilla[k],
                "step_by_step": step_by_step[k],
                "chain": chained[k],
                "hits": hits_string(hits[k].tolist()),
                "mean_state_hits": hits_string(mean_hits[k].tolist()),  # per ℓ* of `layers`
                "patchscope": texts[k * len(grid) : (k + 1) * len(grid)],  # in `grid` order
            }
            for k, q in enumerate(queries)
        ],
    )
    return result


def plot(result: dict, path: Path) -> Path:
    """Accuracy of the CoT Patchscope per (ℓ, ℓ*) as a heat map, with the baselines in the title."""
    plt = pyplot()
    layers = result["layers"]
    fig, ax = plt.subplots(figsize=(5.8, 4.8))
    if result["evaluated"]:
        grid = [[result["pair_accuracy"][f"{a}:{b}"] for b in layers] for a in layers]
        image = ax.imshow(grid, origin="lower", cmap="viridis", vmin=0, vmax=max(0.05, max(map(max, grid))))
        fig.colorbar(image, ax=ax, label="accuracy")
        title = (
            f"CoT Patchscope, {result['evaluated']} queries; vanilla {result['vanilla']['p']:.2f}, "
            f"no-patch {result['no_patch_control']['p']:.2f}"
        )
    else:
        title = "CoT Patchscope: no query evaluated"
    ax.set_xticks(range(len(layers)), layers, fontsize=7)
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_xlabel("target layer ℓ* (T = π2)")
    ax.set_ylabel("source layer ℓ (S = π1)")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)
    plt.close(fig)
    return path
