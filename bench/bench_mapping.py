"""Mapping quality and cost on the default pair (smollm2-135m -> gemma3-270m).

Prints figures; asserts nothing.

  quality    held-out R² for 2:1, 6:4, 10:6 (≤ 20k words of wikitext-2, split by document) of affine and
             learned on corpus text, and of affine + the carrier vocabulary texts (affine+vocab, the
             default of fit-mapping and make run), held-out nouns excluded from every fit
  identity   cross-model identity rate on bench/data/heldout_nouns.txt ("I saw the {word}") of affine and
             affine+vocab, Wilson 95% intervals, beside the same-model references smollm2 -> smollm2 and
             gemma3 -> gemma3
  all-pairs  every layer pair (30 × 18): extraction and solve times, R² heat map and mapped-norm ratio PNGs

`make bench-mapping` runs all three into a scratch registry and writes docs/mapping_*.png.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from patchscope.data import data_root
from patchscope.engine import GenerationConfig, PatchedRow, RowPatch, extract, load_model, patched_generate
from patchscope.engine.presets import PRESETS, identity_answer
from patchscope.engine.runtime import TargetRuntime
from patchscope.eval.common import wilson
from patchscope.mapping.artefact import MappingInfo
from patchscope.mapping.pipeline import fit_mappings
from patchscope.mapping.registry import MappingRegistry
from patchscope.mapping.resolve import MappingSet

PAIRS = [(2, 1), (6, 4), (10, 6)]
ROOT = Path(__file__).resolve().parents[1]


def corpus() -> Path:
    return data_root() / "wikitext-2" / "valid.txt"


VOCAB = "affine+vocab"  # affine with the carrier vocabulary texts: what fit-mapping and make run fit


def quality(
    source, target, registries: dict[str, MappingRegistry], labels: list[str], vocab_words: int
) -> None:
    """Fit each of `labels` (a method, or VOCAB) for PAIRS into its own registry; print held-out R²."""
    print(
        "== quality: held-out R² (variance-weighted) and cosine, test split by document (corpus text only)"
        + (f"; {VOCAB} = affine + up to {vocab_words} vocabulary texts" if VOCAB in labels else "")
    )
    held_out = set((ROOT / "bench" / "data" / "heldout_nouns.txt").read_text().split())
    rows: dict[tuple[int, int], dict[str, MappingInfo]] = {}
    for label in labels:
        method, extra = ("affine", vocab_words) if label == VOCAB else (label, 0)
        started = time.perf_counter()
        report = fit_mappings(
            source,
            target,
            PAIRS,
            method,
            corpus(),
            registries[label],
            max_words=20_000,
            vocab_words=extra,
            exclude_words=held_out,
        )
        print(
            f"{label}: {report.pairs} pairs; extraction {report.extract_s:.1f}s, fit {report.solve_s:.1f}s, "
            f"total {time.perf_counter() - started:.1f}s"
        )
        for info in report.infos:
            rows.setdefault((info.source_layer, info.target_layer), {})[label] = info
    print(f"{'pair':<8}" + "".join(f"{label + ' R²':>18}{'cos':>7}" for label in labels))
    for (a, b), m in rows.items():
        line = f"{a}:{b:<6}" + "".join(f"{m[label].r2:>18.3f}{m[label].cosine:>7.3f}" for label in labels)
        if "affine" in m and "learned" in m:
            line += f"   learned − affine {m['learned'].r2 - m['affine'].r2:+.3f}"
        print(line)


def identity_rate(source, target, pairs, mapping, words: list[str], chunk: int = 150) -> list[int]:
    """How many words the target repeats, per layer pair (answer equals the word, case-insensitive)."""
    preset = PRESETS["identity"]
    rows, truth = [], []
    layers = sorted({a for a, _ in pairs})
    for word in words:
        states = extract(source, f"I saw the {word}", layers).states[:, -1]  # [l, d]
        for k, (a, b) in enumerate(pairs):
            vector = states[layers.index(a)]
            if mapping is not None:
                vector = mapping(vector, a, b)
            rows.append(PatchedRow(preset.template, preset.filler, (RowPatch(b, vector),)))
            truth.append((k, word))
    hits = [0] * len(pairs)
    config = GenerationConfig(max_new_tokens=4)
    runtime = TargetRuntime.build(target)
    for start in range(0, len(rows), chunk):
        for (k, word), out in zip(
            truth[start : start + chunk],
            patched_generate(runtime, rows[start : start + chunk], config),
            strict=True,
        ):
            hits[k] += identity_answer(out.text).lower() == word
    return hits


def identity(
    source, target, registries: dict[str, MappingRegistry], labels: list[str], cross_only: bool
) -> None:
    words = (ROOT / "bench" / "data" / "heldout_nouns.txt").read_text().split()
    n = len(words)
    print(f"== identity: {n} held-out nouns, single-token in both tokenizers, absent from the fit text")
    pairs = list(PAIRS)
    settings = []
    for label in labels:
        method = "affine" if label == VOCAB else label
        registry = registries[label]
        found = {
            (i.source_layer, i.target_layer): i.id for i in registry.scan().mappings if i.method == method
        }
        if not all(p in found for p in pairs):
            raise SystemExit(f"no {label} mappings for {PAIRS}: run the quality part first")
        mapping = MappingSet({p: registry.load(found[p]) for p in pairs})
        for loaded in mapping.by_pair.values():
            loaded.check(source, target)
        settings.append((f"{source.id} -> {target.id} ({label})", source, target, pairs, mapping))
    if not cross_only:
        settings += [
            (f"{source.id} -> {source.id}", source, source, [(a, a) for a, _ in pairs], None),
            (f"{target.id} -> {target.id}", target, target, [(b, b) for _, b in pairs], None),
        ]
    for name, s, t, ps, m in settings:
        started = time.perf_counter()
        hits = identity_rate(s, t, ps, m, words)
        cells = []
        for (a, b), k in zip(ps, hits, strict=True):
            lo, hi = wilson(k, n)
            cells.append(f"{a}->{b}: {k / n:6.1%} [{lo:.1%}, {hi:.1%}]")
        print(f"{name:<46} " + "   ".join(cells) + f"   ({time.perf_counter() - started:.0f}s)")


def all_pairs(source, target, registry: MappingRegistry, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, L_star = source.facts.num_layers, target.facts.num_layers
    pairs = [(a, b) for a in range(L) for b in range(L_star)]
    report = fit_mappings(source, target, pairs, "affine", corpus(), registry, max_words=20_000)
    print(
        f"== all pairs ({len(pairs)}): extraction {report.extract_s:.1f}s, solve {report.solve_s:.1f}s, "
        f"total {report.extract_s + report.solve_s:.1f}s; pairs of states {report.pairs}"
    )
    r2 = torch.full((L, L_star), float("nan"))
    ratio = torch.full((L, L_star), float("nan"))
    for info in report.infos:
        r2[info.source_layer, info.target_layer] = info.r2
        ratio[info.source_layer, info.target_layer] = info.mapped_norm_mean / info.target_norm_mean
    best = r2.argmax(dim=1)
    print(
        "best target layer per source layer: "
        + ", ".join(f"{a}:{int(best[a])} ({r2[a, best[a]]:.2f})" for a in range(L))
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data, label in (("r2", r2, "held-out R²"), ("norm_ratio", ratio, "mean ‖f(x)‖ / mean ‖y‖")):
        fig, ax = plt.subplots(figsize=(7, 8))
        image = ax.imshow(data.numpy(), aspect="auto", origin="lower", cmap="viridis")
        ax.set_xlabel(f"target layer ℓ* ({target.id})")
        ax.set_ylabel(f"source layer ℓ ({source.id})")
        ax.set_title(f"affine map {label}, by layer pair")
        fig.colorbar(image, ax=ax, label=label)
        fig.tight_layout()
        fig.savefig(out_dir / f"mapping_{name}.png", dpi=110)
        plt.close(fig)
    print(f"wrote {out_dir / 'mapping_r2.png'} and {out_dir / 'mapping_norm_ratio.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("parts", nargs="*", default=["quality", "identity", "all-pairs"])
    parser.add_argument(
        "--registry", default=None, help="scratch registries' parent (default: a temporary one)"
    )
    parser.add_argument(
        "--method", default=f"affine,{VOCAB}", help="which of the fitted maps the identity part uses"
    )
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument(
        "--methods",
        default=f"affine,learned,{VOCAB}",
        help=f"what the quality part fits ({VOCAB}: see --vocab-words)",
    )
    parser.add_argument("--vocab-words", type=int, default=20_000, help=f"vocabulary texts of {VOCAB}")
    parser.add_argument("--cross-only", action="store_true", help="identity part: skip same-model references")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout
    print(f"commit {commit.strip()}, torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    source, target = load_model("smollm2-135m"), load_model("gemma3-270m")
    root = Path(args.registry or tempfile.mkdtemp(prefix="patchscope-bench-"))
    labels = sorted(set(args.methods.split(",")) | set(args.method.split(",")), key=args.methods.find)
    registries = {label: MappingRegistry(root / label) for label in labels}
    if "quality" in args.parts:
        quality(source, target, registries, args.methods.split(","), args.vocab_words)
    if "identity" in args.parts:
        identity(source, target, registries, args.method.split(","), args.cross_only)
    if "all-pairs" in args.parts:
        all_pairs(
            source, target, MappingRegistry(Path(tempfile.mkdtemp(prefix="patchscope-all-"))), Path(args.out)
        )


if __name__ == "__main__":
    main()
