"""`patchscope mappings` and `patchscope fit-mapping`: the mapping registry and fitting new maps."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from patchscope.cli.args import progress, progress_bar
from patchscope.cli.models import registry_with_paths


def _pct(value: float, n: int) -> str:
    return "-" if n == 0 or math.isnan(value) else f"{value:.0%}"


def cmd_mappings(args: argparse.Namespace) -> int:
    from patchscope.mapping.registry import MappingRegistry

    registry = MappingRegistry(args.registry)
    listing = registry.scan()
    if args.json:
        print(json.dumps([m.__dict__ for m in listing.mappings], indent=2))
        return 0
    # Behaviour columns: identity rate on validation words, attribute accuracy on validation subjects beside
    # the same-model target's, share equal to the unpatched control ("-": not measured).
    print(
        f"{'id':<52}{'method':<16}{'pairs':>7}{'R²':>7}{'cos':>7}{'|y| mean':>10}"
        f"{'ident':>7}{'attr':>6}{'same':>6}{'n':>5}{'=ctl':>6}"
    )
    for m in listing.mappings:
        print(
            f"{m.id:<52}{m.method:<16}{m.pairs_train:>7}{m.r2:>7.3f}{m.cosine:>7.3f}"
            f"{m.target_norm_mean:>10.1f}{_pct(m.identity_rate, m.identity_n):>7}"
            f"{_pct(m.attribute_accuracy, m.attribute_n):>6}{_pct(m.attribute_reference, m.attribute_n):>6}"
            f"{m.attribute_n:>5}{_pct(m.unpatched_share, m.attribute_n):>6}"
        )
    for name, problem in listing.unreadable:
        print(f"unreadable: {name}: {problem}")
    print(f"registry: {registry.root}")
    return 0


def cmd_fit_mapping(args: argparse.Namespace) -> int:
    from patchscope.engine import load_model
    from patchscope.mapping import pipeline
    from patchscope.mapping.behavioural import BehaviouralOptions
    from patchscope.mapping.next_token_fit import NextTokenOptions
    from patchscope.mapping.registry import MappingRegistry

    corpus = Path(args.corpus) if args.corpus else default_corpus()
    if not corpus.is_file():
        raise pipeline.InvalidArgument("corpus", "file not found", value=str(corpus))
    method = args.method
    if method == "behavioural" and args.variant == "mlp":
        method = "behavioural-mlp"
    models = registry_with_paths(args.source, args.target)
    source = load_model(args.source, registry=models, progress=progress)
    target = source  # tuned-lens maps a layer of the source to its own final layer
    if args.target != args.source and method != "tuned-lens":
        target = load_model(args.target, registry=models, progress=progress)
    pairs = pipeline.parse_pairs(args.pairs, source, target)
    if method == "tuned-lens":
        pairs = sorted({(a, source.facts.num_layers - 1) for a, _ in pairs})
    registry = MappingRegistry(args.registry)
    if args.if_missing:
        have = {
            (m.source_model, m.target_model, m.source_layer, m.target_layer, m.method)
            for m in registry.scan().mappings
        }
        pairs = [(a, b) for a, b in pairs if (source.id, target.id, a, b, method) not in have]
        if not pairs:
            progress("all requested mappings are registered already")
            return 0
    options = None
    if method in pipeline.BEHAVIOURAL:
        options = BehaviouralOptions(
            hidden=args.hidden if method == "behavioural-mlp" else 0,
            lr=BehaviouralOptions.lr if args.lr is None else args.lr,
            max_steps=BehaviouralOptions.max_steps if args.steps is None else args.steps,
            batch_size=args.batch_size,
            mse_weight=args.mse_weight,
            calibrate_norm=not args.no_norm_calibration,
        )
    next_token = None
    if method == "next-token":
        next_token = NextTokenOptions(
            train_positions=args.positions,
            lr=NextTokenOptions.lr if args.lr is None else args.lr,
            max_steps=NextTokenOptions.max_steps if args.steps is None else args.steps,
            batch_size=args.batch_size,
        )

    update, display = progress_bar()
    with display:

        class Bars(pipeline.Progress):
            """Rich bars on a terminal; a line per tenth of each phase (and every note) otherwise."""

            def __init__(self) -> None:
                self.totals: dict[str, int] = {}

            def start(self, phase: str, total: int) -> None:
                self.totals[phase] = total
                update(phase, 0, total)

            def advance(self, phase: str, done: int) -> None:
                update(phase, done, self.totals.get(phase, done))

            def note(self, phase: str, text: str) -> None:
                progress(f"{phase}: {text}")

        exclude = set(Path(args.exclude_words).read_text().split()) if args.exclude_words else set()
        report = pipeline.fit_mappings(
            source,
            target,
            pairs,
            method,
            corpus,
            registry,
            max_words=args.max_words or None,
            progress=Bars(),
            vocab_words=args.vocab_words,
            kl_weight=args.kl_weight,
            exclude_words=exclude,
            seed=args.seed,
            behavioural_options=options,
            behaviour_eval=args.behaviour_metrics,
            subject_texts=args.subject_texts,
            next_token_options=next_token,
        )
    print(f"pairs of states: {report.pairs}; extraction {report.extract_s:.1f}s, fit {report.solve_s:.1f}s")
    print(
        f"{'mapping':<52}{'R²':>7}{'R²/dim':>8}{'cos':>7}{'MSE':>10}{'ident':>7}{'attr':>6}{'same':>6}{'=ctl':>6}"
    )
    for m in report.infos:
        print(
            f"{m.id:<52}{m.r2:>7.3f}{m.r2_mean_dim:>8.3f}{m.cosine:>7.3f}{m.mse:>10.3g}"
            f"{_pct(m.identity_rate, m.identity_n):>7}{_pct(m.attribute_accuracy, m.attribute_n):>6}"
            f"{_pct(m.attribute_reference, m.attribute_n):>6}{_pct(m.unpatched_share, m.attribute_n):>6}"
        )
    print(f"written to {registry.root}")
    return 0


def default_corpus() -> Path:
    from patchscope.data import data_root

    return data_root() / "wikitext-2" / "valid.txt"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    maps = sub.add_parser("mappings", help="list registered mappings with their held-out metrics")
    maps.add_argument("--registry", default=None)
    maps.add_argument("--json", action="store_true")
    maps.set_defaults(func=cmd_mappings)

    fit = sub.add_parser("fit-mapping", help="fit source -> target maps on a corpus and register them")
    fit.add_argument("--source", required=True)
    fit.add_argument("--target", required=True)
    fit.add_argument("--pairs", default="depth", help="2:1,6:4,10:6 | depth (every source layer) | all")
    fit.add_argument(
        "--method",
        default="affine",
        choices=[
            "affine",
            "learned",
            "identity",
            "tuned-lens",
            "behavioural",
            "behavioural-mlp",
            "next-token",
        ],
        help="behavioural: ridge start, then trained on the target's own behaviour (KL through its upper "
        "layers + MSE); slower than affine, see the README. next-token: ridge start, then trained so that "
        "the target's identity reading names the source's own next token (for late layers; docs/mapping.md)",
    )
    fit.add_argument(
        "--variant",
        default="affine",
        choices=["affine", "mlp"],
        help="behavioural only: an affine map, or affine + an MLP residual (= --method behavioural-mlp)",
    )
    fit.add_argument(
        "--corpus", default=None, help="text file (default $PATCHSCOPE_DATA/wikitext-2/valid.txt)"
    )
    fit.add_argument("--max-words", type=int, default=20000, help="words read from the corpus (0 = all)")
    fit.add_argument("--registry", default=None)
    fit.add_argument("--if-missing", action="store_true", help="fit only pairs the registry lacks")
    fit.add_argument(
        "--vocab-words",
        type=int,
        default=20000,
        help="add up to N short training texts, each ending in a word both tokenizers have as one token "
        "(default 20000: every such word of the default pair; 0 = corpus only); see the README",
    )
    fit.add_argument("--exclude-words", default=None, help="file of words the vocabulary texts must not use")
    fit.add_argument(
        "--subject-texts",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add the training and validation subjects of the packaged LRE relations, read as "
        '"Here is <subject>", to the fit\'s texts (test subjects never; default: on for behavioural '
        "methods); see docs/mapping.md",
    )
    fit.add_argument(
        "--kl-weight",
        type=float,
        default=0.0,
        help="learned only: add W × KL between the target head's reading of true and mapped states",
    )
    fit.add_argument("--seed", type=int, default=0, help="splits, data order and initialisation")
    fit.add_argument(
        "--steps",
        type=int,
        default=None,
        help="behavioural, next-token: most Adam steps, early stopping (default 300; next-token 1000)",
    )
    fit.add_argument(
        "--lr", type=float, default=None, help="behavioural, next-token: Adam learning rate (1e-4; 1e-3)"
    )
    fit.add_argument("--batch-size", type=int, default=64, help="behavioural, next-token: rows per step")
    fit.add_argument(
        "--positions", type=int, default=8000, help="next-token: training positions of the train documents"
    )
    fit.add_argument("--hidden", type=int, default=256, help="behavioural-mlp: width of the MLP residual")
    fit.add_argument(
        "--mse-weight", type=float, default=0.2, help="behavioural: weight of the MSE/Var regulariser"
    )
    fit.add_argument(
        "--no-norm-calibration",
        action="store_true",
        help="behavioural: skip scaling the ridge start's output by the gain with the best validation KL",
    )
    fit.add_argument(
        "--behaviour-metrics",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure identity / attribute / unpatched-share metrics on the validation split and record "
        "them (default: on for behavioural methods; `--mapping auto` prefers maps that have them)",
    )
    fit.set_defaults(func=cmd_fit_mapping)
