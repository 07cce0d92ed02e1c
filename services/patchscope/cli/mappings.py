"""`patchscope mappings` and `patchscope fit-mapping`: the mapping registry and fitting new maps."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from patchscope.cli.args import progress
from patchscope.cli.models import registry_with_paths


def cmd_mappings(args: argparse.Namespace) -> int:
    from patchscope.mapping.registry import MappingRegistry

    registry = MappingRegistry(args.registry)
    listing = registry.scan()
    if args.json:
        print(json.dumps([m.__dict__ for m in listing.mappings], indent=2))
        return 0
    print(f"{'id':<48}{'method':<11}{'pairs':>7}{'R²':>7}{'R²/dim':>8}{'cos':>7}{'|y| mean':>10}")
    for m in listing.mappings:
        print(
            f"{m.id:<48}{m.method:<11}{m.pairs_train:>7}{m.r2:>7.3f}{m.r2_mean_dim:>8.3f}{m.cosine:>7.3f}"
            f"{m.target_norm_mean:>10.1f}"
        )
    for name, problem in listing.unreadable:
        print(f"unreadable: {name}: {problem}")
    print(f"registry: {registry.root}")
    return 0


def cmd_fit_mapping(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from patchscope.engine import load_model
    from patchscope.mapping import pipeline
    from patchscope.mapping.registry import MappingRegistry

    corpus = Path(args.corpus) if args.corpus else default_corpus()
    if not corpus.is_file():
        raise pipeline.InvalidArgument("corpus", "file not found", value=str(corpus))
    models = registry_with_paths(args.source, args.target)
    source = load_model(args.source, registry=models, progress=progress)
    target = source  # tuned-lens maps a layer of the source to its own final layer
    if args.target != args.source and args.method != "tuned-lens":
        target = load_model(args.target, registry=models, progress=progress)
    pairs = pipeline.parse_pairs(args.pairs, source, target)
    if args.method == "tuned-lens":
        pairs = sorted({(a, source.facts.num_layers - 1) for a, _ in pairs})
    registry = MappingRegistry(args.registry)
    if args.if_missing:
        have = {
            (m.source_model, m.target_model, m.source_layer, m.target_layer, m.method)
            for m in registry.scan().mappings
        }
        pairs = [(a, b) for a, b in pairs if (source.id, target.id, a, b, args.method) not in have]
        if not pairs:
            progress("all requested mappings are registered already")
            return 0

    with Progress(
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=None,
        transient=False,
    ) as bar:

        class Bars(pipeline.Progress):
            def __init__(self) -> None:
                self.tasks: dict[str, int] = {}

            def start(self, phase: str, total: int) -> None:
                self.tasks[phase] = bar.add_task(phase, total=total)

            def advance(self, phase: str, done: int) -> None:
                bar.update(self.tasks[phase], completed=done)

        exclude = set(Path(args.exclude_words).read_text().split()) if args.exclude_words else set()
        report = pipeline.fit_mappings(
            source,
            target,
            pairs,
            args.method,
            corpus,
            registry,
            max_words=args.max_words or None,
            progress=Bars(),
            vocab_words=args.vocab_words,
            kl_weight=args.kl_weight,
            exclude_words=exclude,
            seed=args.seed,
        )
    print(f"pairs of states: {report.pairs}; extraction {report.extract_s:.1f}s, fit {report.solve_s:.1f}s")
    print(f"{'mapping':<48}{'R²':>7}{'R²/dim':>8}{'cos':>7}{'MSE':>10}")
    for m in report.infos:
        print(f"{m.id:<48}{m.r2:>7.3f}{m.r2_mean_dim:>8.3f}{m.cosine:>7.3f}{m.mse:>10.3g}")
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
    fit.add_argument("--method", default="affine", choices=["affine", "learned", "identity", "tuned-lens"])
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
    fit.add_argument(
        "--seed", type=int, default=0, help="document split seed (recorded; eval tests only on other documents)"
    )
    fit.add_argument("--exclude-words", default=None, help="file of words the vocabulary texts must not use")
    fit.add_argument(
        "--kl-weight",
        type=float,
        default=0.0,
        help="learned only: add W × KL between the target head's reading of true and mapped states",
    )
    fit.set_defaults(func=cmd_fit_mapping)
