"""Mapping quality and cost on the default pair (smollm2-135m -> gemma3-270m).

Prints figures; asserts nothing.

  quality    held-out R² for 2:1, 6:4, 10:6 (≤ 20k words of wikitext-2, split by document) of affine and
             learned on corpus text, and of affine + the carrier vocabulary texts (affine+vocab, the
             default of fit-mapping and make run), held-out nouns excluded from every fit
  identity   cross-model identity rate on bench/data/heldout_nouns.txt ("I saw the {word}") of affine and
             affine+vocab, Wilson 95% intervals, beside the same-model references smollm2 -> smollm2 and
             gemma3 -> gemma3
  all-pairs  every layer pair (30 × 18): extraction and solve times, R² heat map and mapped-norm ratio PNGs
  behaviour  at --behaviour-pairs (default 2:1), side by side: ridge (affine+vocab), learned, learned+KL
             (the head-lens KL term), behavioural and behavioural-mlp (mapping/behavioural.py), each with its
             fit time, held-out R², held-out KL of the target's continuations, identity rate on held-out
             shared words and on the first --nouns held-out nouns, attribute accuracy on held-out LRE
             subjects the target knows beside the same-model target at ℓ*, and the share of attribute
             explanations equal to the unpatched control; counts n and Wilson 95% intervals; the same
             attribute figure on validation subjects, and with several pairs, one pair per method chosen
             on validation and reported on test
  next-token the paper's §4.4 reading at late pairs (--next-token-pairs): per method of
             --next-token-methods (affine: ridge at `make eval`'s budget; next-token: ridge start trained
             on the source's own next token, mapping/next_token_fit.py) fitted on one split seed's train
             documents, cross-model P@1 on its test documents (`eval cross-model`'s reader and scoring)
             beside the source's own ridge tuned lens and logit lens at the source layer on the same
             positions, the share equal to the unpatched control, the paired difference to the tuned lens
             with a bootstrap 95% interval, and each map's fit time

`make bench-mapping` runs all three into a scratch registry and writes docs/mapping_*.png.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from patchscope.data import data_root
from patchscope.engine import GenerationConfig, PatchedRow, RowPatch, extract, load_model, patched_generate
from patchscope.engine.presets import PRESETS, identity_answer
from patchscope.engine.runtime import TargetRuntime
from patchscope.eval.common import bootstrap_ratio_ci, wilson
from patchscope.mapping.artefact import MappingInfo
from patchscope.mapping.pipeline import Progress, fit_mappings
from patchscope.mapping.registry import MappingRegistry
from patchscope.mapping.resolve import MappingSet

PAIRS = [(2, 1), (6, 4), (10, 6)]
ROOT = Path(__file__).resolve().parents[1]


def corpus() -> Path:
    return data_root() / "wikitext-2" / "valid.txt"


def heldout_nouns() -> list[str]:
    """The nouns no bench fit may read (bench/data/heldout_nouns.txt), in file order."""
    return (ROOT / "bench" / "data" / "heldout_nouns.txt").read_text().split()


def layer_pairs(spec: str) -> list[tuple[int, int]]:
    """`2:1,6:4` → [(2, 1), (6, 4)]."""
    return [(int(a), int(b)) for a, b in (p.split(":") for p in spec.split(","))]


VOCAB = "affine+vocab"  # affine with the carrier vocabulary texts: what fit-mapping and make run fit


def quality(
    source, target, registries: dict[str, MappingRegistry], labels: list[str], vocab_words: int
) -> None:
    """Fit each of `labels` (a method, or VOCAB) for PAIRS into its own registry; print held-out R²."""
    print(
        "== quality: held-out R² (variance-weighted) and cosine, test split by document (corpus text only)"
        + (f"; {VOCAB} = affine + up to {vocab_words} vocabulary texts" if VOCAB in labels else "")
    )
    held_out = set(heldout_nouns())
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
    words = heldout_nouns()
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


def _cell(k: int, n: int) -> str:
    if n == 0:
        return f"{'-':>22}"
    lo, hi = wilson(k, n)
    return f"{k / n:>6.1%} [{lo:.0%},{hi:.0%}] n={n:<3}"


class Notes(Progress):
    """Phase notes on stderr with the seconds since the part began, so a long run shows where it is."""

    def __init__(self) -> None:
        self.began = time.perf_counter()

    def note(self, phase: str, text: str) -> None:
        print(f"[{time.perf_counter() - self.began:6.0f}s] {phase}: {text}", file=sys.stderr, flush=True)


def behaviour(source, target, root: Path, args) -> None:
    """Every method at the same pairs on the same data; the behavioural ones start from the ridge map."""
    from patchscope.mapping import behaviour_data as bd
    from patchscope.mapping import behaviour_forward as bf
    from patchscope.mapping import behaviour_metrics as bm
    from patchscope.mapping import behavioural as bh

    pairs = layer_pairs(args.behaviour_pairs)
    nouns = heldout_nouns()
    held_out = set(nouns)
    nouns = nouns[: args.nouns]
    started = time.perf_counter()
    relations = bd.default_relations()
    data = bd.build_data(
        source,
        target,
        relations,
        subjects_per_relation=args.subjects,
        words=args.words,
        identity_eval=args.identity_words,
        attribute_eval_per_relation=args.attribute_samples,
        validation_eval_per_relation=args.validation_samples,
        exclude_words=held_out,
    )
    metric_set = bm.metric_set(target, data)
    validation_set = bm.metric_set(target, data, split="validation")
    print(
        f"== behaviour at {args.behaviour_pairs}: rows { ({k: len(v) for k, v in data.rows.items()}) }, "
        f"{len(metric_set.words)} held-out words, {len(metric_set.samples)} of {len(data.attribute_samples)} "
        f"held-out LRE subjects known by {target.id} in plain text; validation: {len(validation_set.words)} "
        f"words, {len(validation_set.samples)} of {len(data.validation_samples)} subjects known; subject "
        f"texts in the fits: {len(data.subject_texts('train')) if args.subject_texts else 0} "
        f"({time.perf_counter() - started:.0f}s)"
    )
    options = {
        "behavioural": bh.BehaviouralOptions(
            max_steps=args.steps, lr=args.lr, batch_size=args.batch_size, positions=args.positions
        ),
        "behavioural-mlp": bh.BehaviouralOptions(
            hidden=256, max_steps=args.steps, lr=args.lr, batch_size=args.batch_size, positions=args.positions
        ),
    }
    methods = args.behaviour_methods.split(",")
    common = dict(
        max_words=args.behaviour_max_words,
        vocab_words=args.vocab_words,
        exclude_words=held_out,
        seed=0,
        subject_texts=args.subject_texts,
        behaviour_data=data,
    )
    small = {"hidden": 256, "max_epochs": 20}  # the learned MLP at a size this CPU fits in minutes
    states = None
    fitted: dict[str, dict[tuple[int, int], MappingInfo]] = {}
    seconds: dict[str, float] = {}
    for label in methods:
        method, extra = {
            "ridge": ("affine", {}),
            "learned": ("learned", {"learned_options": small}),
            "learned+kl": (
                "learned",
                {"learned_options": {"hidden": 256, "max_epochs": 20}, "kl_weight": 1.0},
            ),
        }.get(label, (label, {"behavioural_options": options.get(label)}))
        began = time.perf_counter()
        report = fit_mappings(
            source,
            target,
            pairs,
            method,
            corpus(),
            MappingRegistry(root / label),
            behaviour_eval=False,
            paired_states=states,
            progress=Notes(),
            **common,
            **extra,
        )
        states = report.states
        seconds[label] = time.perf_counter() - began - report.extract_s
        fitted[label] = {(i.source_layer, i.target_layer): i for i in report.infos}
        print(f"{label}: fitted in {seconds[label]:.0f}s (+ extraction {report.extract_s:.0f}s, shared)")
    header = (
        f"{'method':<16}{'fit s':>7}{'R²':>7}{'test KL':>9}  {'identity (held-out words)':<24}"
        f"{'identity (nouns)':<24}{'attribute':<24}{'× same':>7}  {'= unpatched':<22}"
        f"{'validation × same':>18}"
    )
    measured: dict[str, dict[tuple[int, int], tuple[bm.BehaviourMetrics, bm.BehaviourMetrics, int]]] = {
        label: {} for label in methods
    }
    for a, b in pairs:
        forwards = {name: bf.TemplateForward(target, t, b) for name, t in data.templates.items()}
        test = bf.prepare(source, target, data.rows["test"], forwards, a, b)
        print(f"-- pair {a}:{b}; same-model {target.id} {b}->{b} on the same attribute samples:", end=" ")
        lines = []
        for label in methods:
            info = fitted[label][(a, b)]
            loaded = MappingRegistry(root / label).load(info.id)
            kl = bh.split_kl(forwards, test, loaded.map)
            m = bm.behaviour_metrics(source, target, a, b, loaded.map, data, metric_set)
            v = bm.behaviour_metrics(source, target, a, b, loaded.map, data, validation_set)
            noun_hits = identity_rate(source, target, [(a, b)], MappingSet({(a, b): loaded}), nouns)[0]
            measured[label][(a, b)] = (v, m, noun_hits)
            ratio, n_attr = m.attribute_ratio, m.attribute_n
            lines.append(
                f"{label:<16}{seconds[label]:>7.0f}{info.r2:>7.3f}{kl:>9.4f}  "
                f"{_cell(round(m.identity_rate * m.identity_n), m.identity_n):<24}"
                f"{_cell(noun_hits, len(nouns)):<24}"
                f"{_cell(round(m.attribute_accuracy * n_attr), n_attr):<24}{ratio:>7.2f}  "
                f"{_cell(round(m.unpatched_share * n_attr), n_attr):<22}"
                f"{v.attribute_ratio:>9.2f} (n={v.attribute_n})"
            )
        ref = metric_set.reference_hits.get(b, [])
        print(_cell(sum(ref), len(ref)))
        print(header)
        print("\n".join(lines))
    if len(pairs) > 1:
        print(
            "== one pair per method, chosen on validation subjects (highest attribute × same-model, then "
            "accuracy); the test split only reports it. × same on test with a paired bootstrap 95% interval:"
        )
        for label in methods:
            val = {p: v for p, (v, _, _) in measured[label].items()}
            chosen = max(pairs, key=lambda p: (val[p].attribute_ratio, val[p].attribute_accuracy))
            v, m, noun_hits = measured[label][chosen]
            lo, hi = bootstrap_ratio_ci(m.attribute_hits, m.reference_hits)
            print(
                f"{label:<16} pair {chosen[0]}:{chosen[1]}  "
                f"validation {v.attribute_ratio:.2f} (n={v.attribute_n})  "
                f"test {m.attribute_ratio:.2f} [{lo:.2f}, {hi:.2f}] (n={m.attribute_n}), "
                f"= unpatched {m.unpatched_share:.1%}, identity on nouns {noun_hits}/{len(nouns)}"
            )
    print(f"behaviour part: {time.perf_counter() - started:.0f}s in all")


def next_token_part(source, target, root: Path, args) -> None:
    """Each method fitted on one seed's train documents, read on its test positions; tuned lens beside."""
    from patchscope.eval import next_token
    from patchscope.eval.common import bootstrap_ci
    from patchscope.mapping.next_token_fit import NextTokenOptions

    pairs = layer_pairs(args.next_token_pairs)
    held_out = set(heldout_nouns())
    options = NextTokenOptions(
        train_positions=args.next_token_positions, lr=args.next_token_lr, max_steps=args.next_token_steps
    )
    rows = []
    for method in args.next_token_methods.split(","):
        registry = MappingRegistry(root / method / f"seed-{args.seed}")
        report = fit_mappings(
            source,
            target,
            pairs,
            method,
            corpus(),
            registry,
            max_words=args.next_token_max_words,
            vocab_words=2000,
            exclude_words=held_out,
            seed=args.seed,
            progress=Notes(),
            next_token_options=options,
        )
        fit_s = {(i.source_layer, i.target_layer): i.fit_seconds for i in report.infos}
        result = next_token.run(
            source,
            target,
            corpus(),
            positions=args.next_token_eval,
            fit_positions=args.next_token_positions,
            per_text=2,
            pairs=pairs,
            registry=registry,
            seed=args.seed,
            same_prompt=False,
        )
        layers = {entry["layer"]: entry for entry in result["layers"]}
        for entry in result["pairs"]:
            a, b = entry["source_layer"], entry["target_layer"]
            rows.append((a, b, method, entry["patchscope"], layers[a], fit_s[(a, b)]))
    print(
        f"-- next token, seed {args.seed}: {args.next_token_eval} test positions; the tuned lens and the "
        f"next-token maps fitted on {args.next_token_positions} train positions"
    )
    print(
        f"{'pair':<8}{'method':<12}{'P@1':>24}{'= unpatched':>13}{'tuned lens':>24}{'logit lens':>12}"
        f"{'map − tuned [95%]':>26}{'fit s':>8}"
    )
    for a, b, method, reading, layer, fit_seconds in sorted(rows):
        hits = [int(c) for c in reading["hits"]]
        tuned_hits = [int(c) for c in layer["tuned_lens"]["hits"]]
        diff = [h - t for h, t in zip(hits, tuned_hits, strict=True)]
        lo, hi = bootstrap_ci(diff)
        unpatched = reading["same_as_unpatched"]
        print(
            f"{a:>2} → {b:<3}{method:<12}{_cell(sum(hits), len(hits)):>24}{unpatched['p']:>13.1%}"
            f"{_cell(sum(tuned_hits), len(tuned_hits)):>24}{layer['logit_lens']['p_at_1']['p']:>12.3f}"
            f"{sum(diff) / len(diff):>+10.3f} [{lo:+.3f}, {hi:+.3f}]{fit_seconds:>8.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "parts",
        nargs="*",
        default=["quality", "identity", "all-pairs"],
        help="… and/or behaviour, next-token",
    )
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
    parser.add_argument("--behaviour-pairs", default="2:1", help="behaviour part: layer pairs")
    parser.add_argument(
        "--behaviour-methods",
        default="ridge,learned,learned+kl,behavioural,behavioural-mlp",
        help="behaviour part: what it fits, side by side",
    )
    parser.add_argument("--behaviour-max-words", type=int, default=20_000, help="corpus words of every fit")
    parser.add_argument("--subjects", type=int, default=24, help="LRE training subjects per relation")
    parser.add_argument(
        "--subject-texts",
        action="store_true",
        help="behaviour part: every fit also reads the training and validation subjects in context",
    )
    parser.add_argument("--words", type=int, default=600, help="shared training words (carrier texts)")
    parser.add_argument("--identity-words", type=int, default=100, help="held-out shared words")
    parser.add_argument("--attribute-samples", type=int, default=8, help="held-out subjects per relation")
    parser.add_argument(
        "--validation-samples",
        type=int,
        default=None,
        help="validation subjects per relation (default: as --attribute-samples)",
    )
    parser.add_argument("--nouns", type=int, default=249, help="held-out nouns of the identity figure")
    parser.add_argument("--steps", type=int, default=300, help="behavioural: most Adam steps")
    parser.add_argument("--lr", type=float, default=1e-4, help="behavioural: Adam learning rate")
    parser.add_argument("--batch-size", type=int, default=64, help="behavioural: rows per step")
    parser.add_argument(
        "--positions", type=int, default=2, help="behavioural: continuation positions scored per row"
    )
    parser.add_argument("--next-token-pairs", default="23:13,25:15,28:16", help="next-token part: pairs")
    parser.add_argument("--next-token-methods", default="affine,next-token", help="next-token part: methods")
    parser.add_argument("--next-token-positions", type=int, default=8000, help="train positions (map, lens)")
    parser.add_argument("--next-token-eval", type=int, default=160, help="test positions (2 per text)")
    parser.add_argument("--next-token-steps", type=int, default=1000, help="next-token: most Adam steps")
    parser.add_argument("--next-token-lr", type=float, default=1e-3, help="next-token: Adam learning rate")
    parser.add_argument("--next-token-max-words", type=int, default=6000, help="words of the ridge start")
    parser.add_argument("--seed", type=int, default=0, help="next-token part: the document split seed")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
    if "behaviour" in args.parts:
        behaviour(source, target, root / "behaviour", args)
    if "next-token" in args.parts:
        next_token_part(source, target, root / "next-token", args)
    if "all-pairs" in args.parts:
        all_pairs(
            source, target, MappingRegistry(Path(tempfile.mkdtemp(prefix="patchscope-all-"))), Path(args.out)
        )


if __name__ == "__main__":
    main()
