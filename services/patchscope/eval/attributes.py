"""Experiment 2 (paper §4.2): attribute extraction from the subject's state, against a linear probe.

For each LRE relation, a sample counts only if the model answers it when prompted in plain text
(`template.format(subject)` → the object appears in the greedy continuation), as in the paper. The source
prompt is the subject alone; its last token's state at layer ℓ is patched into the relation's template
at the placeholder (layer ℓ, same model) and the target generates; correct when the object appears.

Baseline: a linear probe on the same states (one-vs-rest ridge classifier over the relation's objects,
5-fold cross-validated; an object never seen in the training folds counts as wrong).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
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


def probe_accuracy(states: torch.Tensor, labels: Sequence[str], folds: int = 5, ridge: float = 1.0) -> float:
    """Cross-validated accuracy of a one-vs-rest ridge classifier (states [N, d] → label)."""
    n = len(labels)
    if n < 2:
        return 0.0
    x = torch.nn.functional.normalize(states.double(), dim=-1)
    correct = 0
    for fold in range(min(folds, n)):
        test = [i for i in range(n) if i % folds == fold]
        train = [i for i in range(n) if i % folds != fold]
        classes = sorted({labels[i] for i in train})
        if not classes or not test:
            continue
        y = torch.zeros(len(train), len(classes), dtype=torch.float64)
        for row, i in enumerate(train):
            y[row, classes.index(labels[i])] = 1.0
        xt = torch.cat([x[train], torch.ones(len(train), 1, dtype=torch.float64)], dim=1)
        gram = xt.T @ xt + ridge * torch.eye(xt.shape[1], dtype=torch.float64)
        weight = torch.linalg.solve(gram, xt.T @ y)
        xs = torch.cat([x[test], torch.ones(len(test), 1, dtype=torch.float64)], dim=1)
        predicted = (xs @ weight).argmax(dim=-1).tolist()
        correct += sum(classes[p] == labels[i] for p, i in zip(predicted, test, strict=True))
    return correct / n


def run(
    model: LoadedModel,
    relations: Sequence[Relation],
    *,
    layers: Sequence[int] | None = None,
    max_samples: int | None = 30,
    max_new_tokens: int = 8,
    seed: int = 0,
    progress: Progress = no_progress,
) -> dict:
    """Accuracy per relation and layer for the patchscope and the probe; best fixed layer and the oracle."""
    started = time.perf_counter()
    layers = list(range(model.facts.num_layers)) if layers is None else list(layers)
    per_relation = []
    all_hits: list[list[bool]] = []  # per evaluated sample, per layer
    probe_hits: dict[int, list[float]] = {layer: [] for layer in layers}
    for index, relation in enumerate(relations):
        samples = subsample(relation.samples, max_samples, seed)
        prompts = [relation.template.format(s.subject) for s in samples]
        plain = plain_texts(model, prompts, max_new_tokens)
        known_plain = [(s, text) for s, text in zip(samples, plain, strict=True) if contains(text, s.object)]
        known = [s for s, _ in known_plain]
        entry: dict = {
            "relation": relation.name,
            "kind": relation.kind,
            "template": relation.template,
            "tried": len(samples),
            "known": len(known),
        }
        progress("relations", index + 1, len(relations))
        if not known:
            entry.update(accuracy={}, probe={}, samples=[])
            per_relation.append(entry)
            continue
        hidden = [extract(model, s.subject, layers, [-1]).states[:, 0] for s in known]  # each [l, d]
        states = torch.stack(hidden, dim=1)  # [l, n, d]
        template, filler = placeholder_template(relation.template)
        rows = [
            PatchedRow(template, filler, (RowPatch(layer=layer, vector=states[li, si]),))
            for li, layer in enumerate(layers)
            for si in range(len(known))
        ]
        texts = patched_texts(model, rows, max_new_tokens, phase=f"patchscope {relation.name}")
        hits = [
            [contains(texts[li * len(known) + si], s.object) for li in range(len(layers))]
            for si, s in enumerate(known)
        ]
        all_hits += hits
        labels = [s.object for s in known]
        probe = {layer: probe_accuracy(states[li], labels) for li, layer in enumerate(layers)}
        for layer, value in probe.items():
            probe_hits[layer].append(value * len(known))
        entry.update(
            accuracy={str(layer): sum(h[li] for h in hits) / len(known) for li, layer in enumerate(layers)},
            probe={str(layer): value for layer, value in probe.items()},
            any_layer=sum(any(h) for h in hits) / len(known),
            samples=[
                {
                    "subject": s.subject,
                    "object": s.object,
                    "plain": plain_text,
                    "patchscope": {
                        str(layer): texts[li * len(known) + si] for li, layer in enumerate(layers)
                    },
                }
                for si, (s, plain_text) in enumerate(known_plain)
            ],
        )
        per_relation.append(entry)
    evaluated = len(all_hits)
    by_layer = {
        str(layer): (sum(h[li] for h in all_hits) / evaluated if evaluated else 0.0)
        for li, layer in enumerate(layers)
    }
    probe_by_layer = {
        str(layer): (sum(probe_hits[layer]) / evaluated if evaluated else 0.0) for layer in layers
    }
    best_layer = max(layers, key=lambda layer: by_layer[str(layer)]) if evaluated else None
    best_probe = max(layers, key=lambda layer: probe_by_layer[str(layer)]) if evaluated else None
    return {
        "experiment": "attributes",
        "model": model.id,
        "layers": layers,
        "max_samples_per_relation": max_samples,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "tried": sum(r["tried"] for r in per_relation),
        "evaluated": evaluated,
        "accuracy_by_layer": by_layer,
        "probe_by_layer": probe_by_layer,
        "best_layer": best_layer,
        "best_layer_accuracy": by_layer[str(best_layer)] if best_layer is not None else 0.0,
        "best_probe_layer": best_probe,
        "best_probe_accuracy": probe_by_layer[str(best_probe)] if best_probe is not None else 0.0,
        "any_layer_oracle": (sum(any(h) for h in all_hits) / evaluated) if evaluated else 0.0,
        "seconds": round(time.perf_counter() - started, 1),
        "relations": per_relation,
    }


def plot(result: dict, path: Path) -> Path:
    """Accuracy per layer over all evaluated samples: patchscope, probe, and the any-layer oracle."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    layers = result["layers"]
    ax.plot(layers, [result["accuracy_by_layer"][str(k)] for k in layers], "^-", ms=3, label="Patchscope")
    ax.plot(
        layers, [result["probe_by_layer"][str(k)] for k in layers], "s-", ms=3, label="linear probe (5-fold)"
    )
    ax.axhline(result["any_layer_oracle"], ls="--", color="grey", label="any layer (oracle)")
    ax.set_xlabel(f"layer ({result['model']})")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"attribute extraction: {result['evaluated']} samples the model knows", fontsize=10)
    save_figure(fig, path)
    plt.close(fig)
    return path
