"""Experiment 2 (paper §4.2): attribute extraction from the subject's state, against a linear probe.

The paper's protocol, as far as these models allow:

- A sample counts only if the model answers it in plain text (the relation's prompt with the subject →
  the object appears in the greedy continuation), as in the paper.
- **Source**: the subject in a neutral context (`SOURCE_CONTEXT`), its last token, so the state is never
  at position 0 (an attention sink; SmolLM2 has no BOS).
- **Target**: the relation's first LRE template with the placeholder `x`; a template that begins with the
  placeholder gets the lead `TEMPLATE_LEAD`, for the same reason. Patched at ℓ* from the source's ℓ, for
  every (ℓ, ℓ*) of a stated grid; greedy, `max_new_tokens` tokens.
- **Score**: the object appears as whole words (`common.mentions`); objects of one character are not
  scored, and relations whose objects mostly are (the letter relations) are dropped and listed.
- **The paper's figure**: for each source layer ℓ, the share of samples for which *some* ℓ* works; then
  the mean over ℓ. The diagonal ℓ* = ℓ and the any-(ℓ, ℓ*) oracle are reported beside it.
- **Baselines that can fail**: a multinomial logistic-regression probe per layer (3-fold CV on up to
  `probe_samples` samples of the relation, read on the evaluated ones), a majority-class guess on the same
  folds, the no-patch control (the template with `x` and nothing patched), the mean-state control (the
  template with ℓ*'s mean state over `layer_stats.WARMUP_TEXT` patched at `x`, per grid ℓ*: "some ℓ*
  works" is comparable to the paper's figure, its mean over ℓ* to ℓ* = ℓ), and the text-only baseline
  (the plain prompt, 1 on the evaluated set by construction: the filter).
- Per task, a paired sign test of the per-sample Patchscope score against the probe's, with Bonferroni
  correction over the tasks with at least `MIN_TEST_SAMPLES` samples.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from patchscope.engine.generation import PatchedRow, RowPatch
from patchscope.engine.hooks import extract
from patchscope.engine.layer_stats import layer_stats
from patchscope.engine.models import LoadedModel
from patchscope.eval.common import (
    SOURCE_CONTEXT,
    TEMPLATE_LEAD,
    Progress,
    Relation,
    bootstrap_ci,
    hits_string,
    layer_grid,
    logistic_probe,
    majority_baseline,
    mean_state_texts,
    mentions,
    no_progress,
    patched_texts,
    placeholder_template,
    plain_texts,
    proportion,
    pyplot,
    save_figure,
    sign_test,
    subsample,
    target_template,
    trivial_object,
    unpatched_texts,
)

MIN_TEST_SAMPLES = 10
# The twelve tasks of the paper's §4.2, as LRE names; those absent from the data are reported as absent.
PAPER_TASKS = (
    "company_ceo",
    "country_currency",
    "food_from_country",
    "person_plays_pro_sport",
    "product_by_company",
    "star_constellation",
    "fruit_inside_color",
    "fruit_outside_color",
    "object_superclass",
    "substance_phase",
    "task_done_by_tool",
    "word_sentiment",
)


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarise(samples: list[dict], layers: Sequence[int], seed: int) -> dict:
    """Every aggregate figure of a set of evaluated samples, each with n and an interval."""
    n = len(samples)
    if not n:
        return {"n": 0}
    nl = len(layers)

    def grid(s: dict) -> list[list[bool]]:
        h = s["hits"]
        return [[h[a * nl + b] == "1" for b in range(nl)] for a in range(nl)]

    grids = [grid(s) for s in samples]
    paper = [_mean([any(row) for row in g]) for g in grids]
    diagonal = [_mean([g[a][a] for a in range(nl)]) for g in grids]
    probe = [_mean([c == "1" for c in s["probe"]]) for s in samples]
    mean_state = [[c == "1" for c in s["mean_state_hits"]] for s in samples]  # [n][ℓ*]
    mean_state_rate = [_mean(m) for m in mean_state]
    same_mean = [c == "1" for s in samples for c in s["same_as_mean_state"]]
    out = {
        "n": n,
        "paper_mean_over_l_of_any_l_star": {"mean": _mean(paper), "ci": bootstrap_ci(paper, seed=seed)},
        "diagonal_mean_over_l": {"mean": _mean(diagonal), "ci": bootstrap_ci(diagonal, seed=seed)},
        "probe_mean_over_l": {"mean": _mean(probe), "ci": bootstrap_ci(probe, seed=seed)},
        "any_pair_oracle": proportion(sum(any(map(any, g)) for g in grids), n),
        "majority_class": proportion(sum(s["majority"] for s in samples), n),
        "no_patch_control": proportion(sum(s["control_hit"] for s in samples), n),
        "mean_state_control": proportion(sum(any(m) for m in mean_state), n),  # some ℓ*: vs the paper's
        "mean_state_mean_over_l_star": {  # vs ℓ* = ℓ
            "mean": _mean(mean_state_rate),
            "ci": bootstrap_ci(mean_state_rate, seed=seed),
        },
        "same_as_mean_state": proportion(sum(same_mean), len(same_mean)),
        "by_source_layer": {
            str(layer): {
                "any_target_layer": proportion(sum(any(g[a]) for g in grids), n),
                "same_layer": proportion(sum(g[a][a] for g in grids), n),
                "probe": proportion(sum(s["probe"][a] == "1" for s in samples), n),
                "mean_state_at_same_layer": proportion(sum(m[a] for m in mean_state), n),
            }
            for a, layer in enumerate(layers)
        },
        "vs_probe": sign_test(paper, probe),
    }
    return out


def run(
    model: LoadedModel,
    relations: Sequence[Relation],
    *,
    layers: Sequence[int] | None = None,
    layer_step: int = 4,
    max_samples: int | None = 20,
    probe_samples: int = 60,
    max_new_tokens: int = 8,
    seed: int = 0,
    progress: Progress = no_progress,
) -> dict:
    """The attribute experiment over `relations`; see the module docstring for the protocol."""
    started = time.perf_counter()
    layers = layer_grid(model.facts.num_layers, layer_step) if layers is None else list(layers)
    nl = len(layers)
    stats = layer_stats(model)
    per_relation, dropped = [], []
    for index, relation in enumerate(relations):
        progress("relations", index, len(relations))
        usable = [s for s in relation.samples if not trivial_object(s.object)]
        if len(usable) < len(relation.samples) / 2:
            dropped.append(
                {"relation": relation.name, "reason": "objects of one character (any text matches)"}
            )
            continue
        pool = subsample(usable, max(probe_samples, max_samples or 0) or None, seed)
        tried = subsample(pool, max_samples, seed)
        template = target_template(relation.template)
        plain = plain_texts(model, [template.format(s.subject) for s in tried], max_new_tokens)
        known = [k for k, (s, t) in enumerate(zip(tried, plain, strict=True)) if mentions(t, s.object)]
        entry: dict = {
            "relation": relation.name,
            "kind": relation.kind,
            "paper_task": relation.name in PAPER_TASKS,
            "template": template,
            "tried": len(tried),
            "known": len(known),
            "text_only": proportion(len(known), len(tried)),
            "samples": [],
        }
        per_relation.append(entry)
        if not known:
            continue
        # States of the whole pool (the probe trains on it); the evaluated samples are a part of it.
        states = torch.stack(
            [extract(model, SOURCE_CONTEXT.format(s.subject), layers, [-1]).states[:, 0] for s in pool]
        )  # [P, l, d]
        where = {id(s): i for i, s in enumerate(pool)}
        evaluated = [tried[k] for k in known]
        rows_of = [where[id(s)] for s in evaluated]
        engine_template, filler = placeholder_template(template)
        rows = [
            PatchedRow(engine_template, filler, (RowPatch(layer=b, vector=states[p, a]),))
            for p in rows_of
            for a in range(nl)
            for b in layers
        ]
        texts = patched_texts(model, rows, max_new_tokens, phase=f"patchscope {relation.name}")
        (control,) = unpatched_texts(model, engine_template, filler, max_new_tokens)
        mean_state = mean_state_texts(model, engine_template, filler, layers, max_new_tokens, stats=stats)
        entry["mean_state"] = {str(b): t for b, t in mean_state.items()}
        labels = [s.object for s in pool]
        probe = [logistic_probe(states[:, a], labels, folds=3, seed=seed) for a in range(nl)]  # [l][P]
        majority = majority_baseline(labels, folds=3, seed=seed)
        per_sample = nl * nl
        for j, (k, s) in enumerate(zip(known, evaluated, strict=True)):
            outputs = texts[j * per_sample : (j + 1) * per_sample]
            entry["samples"].append(
                {
                    "subject": s.subject,
                    "object": s.object,
                    "plain": plain[k],
                    "control": control,
                    "control_hit": mentions(control, s.object),
                    "hits": hits_string([mentions(t, s.object) for t in outputs]),  # ℓ-major, ℓ* minor
                    "same_as_unpatched": hits_string([first_line(t) == first_line(control) for t in outputs]),
                    "mean_state_hits": hits_string([mentions(mean_state[b], s.object) for b in layers]),
                    "same_as_mean_state": hits_string(  # ℓ-major, ℓ* minor, against ℓ*'s mean-state answer
                        [
                            first_line(outputs[a * nl + i]) == first_line(mean_state[b])
                            for a in range(nl)
                            for i, b in enumerate(layers)
                        ]
                    ),
                    "probe": hits_string([probe[a][rows_of[j]] for a in range(nl)]),
                    "majority": majority[rows_of[j]],
                    "outputs": outputs,
                }
            )
        entry["probe_pool"] = len(pool)
        entry["summary"] = summarise(entry["samples"], layers, seed)
    progress("relations", len(relations), len(relations))

    testable = [r for r in per_relation if r["known"] >= MIN_TEST_SAMPLES]
    for r in per_relation:
        if r in testable:
            r["summary"]["vs_probe"]["p_bonferroni"] = min(1.0, r["summary"]["vs_probe"]["p"] * len(testable))
    everything = [s for r in per_relation for s in r["samples"]]
    same = [c == "1" for s in everything for c in s["same_as_unpatched"]]
    same_mean = [c == "1" for s in everything for c in s["same_as_mean_state"]]
    return {
        "experiment": "attributes",
        "model": model.id,
        "layers": layers,
        "layer_step": layer_step,
        "source_context": SOURCE_CONTEXT,
        "template_lead": TEMPLATE_LEAD,
        "max_samples_per_relation": max_samples,
        "probe_samples_per_relation": probe_samples,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "tried": sum(r["tried"] for r in per_relation),
        "evaluated": len(everything),
        "dropped_relations": dropped,
        "paper_tasks_absent": sorted(set(PAPER_TASKS) - {r.name for r in relations}),
        "bonferroni_tasks": len(testable),
        "all": summarise(everything, layers, seed),
        "paper_tasks": summarise(
            [s for r in per_relation if r["paper_task"] for s in r["samples"]], layers, seed
        ),
        "other_tasks": summarise(
            [s for r in per_relation if not r["paper_task"] for s in r["samples"]], layers, seed
        ),
        "same_as_unpatched": proportion(sum(same), len(same)),
        "same_as_mean_state": proportion(sum(same_mean), len(same_mean)),
        "seconds": round(time.perf_counter() - started, 1),
        "relations": per_relation,
    }


def plot(result: dict, path: Path) -> Path:
    """Per source layer: some ℓ* works (the paper's curve), ℓ* = ℓ, the probe; controls as lines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.8, 3.8))
    layers = result["layers"]
    summary = result["all"]
    if summary["n"]:
        by = summary["by_source_layer"]
        for key, marker, label in (
            ("any_target_layer", "^-", "Patchscope, some ℓ* (paper)"),
            ("same_layer", "v-", "Patchscope, ℓ* = ℓ"),
            ("probe", "s-", "logistic probe (3-fold)"),
        ):
            p = [by[str(k)][key]["p"] for k in layers]
            low = [p[i] - by[str(k)][key]["ci"][0] for i, k in enumerate(layers)]
            high = [by[str(k)][key]["ci"][1] - p[i] for i, k in enumerate(layers)]
            ax.errorbar(layers, p, yerr=[low, high], fmt=marker, ms=3, capsize=2, label=label)
        ax.axhline(summary["majority_class"]["p"], ls=":", color="black", label="majority class")
        ax.axhline(summary["no_patch_control"]["p"], ls="--", color="grey", label="no-patch control")
        mean_state = [by[str(k)]["mean_state_at_same_layer"]["p"] for k in layers]
        ax.plot(layers, mean_state, "x--", ms=4, color="tab:red", label="mean-state control, ℓ* = ℓ")
        ax.axhline(
            summary["mean_state_control"]["p"], ls="-.", color="tab:red", label="mean-state control, some ℓ*"
        )
    ax.set_xlabel(f"source layer ℓ ({result['model']})")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"attribute extraction: {result['evaluated']} samples the model knows (95% CI)", fontsize=10)
    save_figure(fig, path)
    plt.close(fig)
    return path
