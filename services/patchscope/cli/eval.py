"""`patchscope eval ...`: run one experiment, save its JSON and plot, print a summary.

Every command takes its data as options (`--corpus FILE`, `--lre DIR` repeatable), so any held-out set
can be run; the defaults are the slices the project ships.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from patchscope.cli.args import parse_int_list, progress, progress_bar
from patchscope.data import data_root

RESULTS = Path("docs/results")


def _load(model_id: str, dtype: str):
    import torch

    from patchscope.engine import load_model

    torch.manual_seed(0)
    return load_model(model_id, dtype=dtype, progress=progress)


def _corpus(args: argparse.Namespace) -> Path:
    corpus = Path(args.corpus) if args.corpus else data_root() / "wikitext-2" / "valid.txt"
    if not corpus.is_file():
        raise SystemExit(f"corpus {corpus} does not exist: pass --corpus FILE")
    return corpus


def _relations(args: argparse.Namespace, names: str | None = None):
    from patchscope.eval.common import read_relations

    folders = [Path(p) for p in args.lre] if args.lre else [data_root() / "lre"]
    try:
        return read_relations(folders, names.split(",") if names else None)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None


def _registry_for_seed(root: str | None, seed: int):
    """A registry of maps fitted with split seed `seed`: `ROOT/seed-N` when it exists, else ROOT itself."""
    from patchscope.mapping.registry import MappingRegistry

    base = MappingRegistry(root)
    per_seed = base.root / f"seed-{seed}"
    return MappingRegistry(per_seed) if per_seed.is_dir() else base


def _finish(args: argparse.Namespace, result: dict, name: str, plot) -> int:
    out = Path(args.out)
    from patchscope.eval.common import save_json

    path = save_json(out / f"{name}.json", result)
    picture = plot(result, out / f"{name}.png")
    print(f"[patchscope] wrote {path} and {picture} ({result['seconds']} s)", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=1, ensure_ascii=False))
    return 0


def cmd_next_token(args: argparse.Namespace) -> int:
    from patchscope.eval import next_token, next_token_plots

    source = _load(args.source, args.dtype)
    target = source if args.target in (None, args.source) else _load(args.target, args.dtype)
    corpus = _corpus(args)
    seeds = parse_int_list(args.seeds)
    runs = []
    update, bar = progress_bar()
    with bar:
        for seed in seeds:
            try:
                runs.append(
                    next_token.run(
                        source,
                        target,
                        corpus,
                        positions=args.positions,
                        fit_positions=args.fit_positions,
                        per_text=args.per_text,
                        registry=_registry_for_seed(args.registry, seed),
                        pairs=parse_pairs_option(args.pairs) if getattr(args, "pairs", None) else None,
                        seed=seed,
                        progress=update,
                    )
                )
            except next_token.FittedOnEvaluation as error:
                raise SystemExit(f"refused: {error}") from None
    result = next_token.combine(runs)
    kind = "next_token" if result["same_model"] else "cross_model"
    name = f"{kind}.{source.id}.{target.id}"
    for entry in result["summary"]["pairs"]:
        ps = entry["patchscope"]
        print(
            f"{entry['source_layer']:>3} -> {entry['target_layer']:<3} P@1 patchscope "
            f"{ps['mean']:.3f} ± {ps['spread']:.3f}",
            file=sys.stderr,
        )
    return _finish(
        args, result, name, next_token_plots.plot if result["same_model"] else next_token_plots.plot_pairs
    )


def cmd_attributes(args: argparse.Namespace) -> int:
    from patchscope.eval import attributes

    model = _load(args.model, args.dtype)
    relations = _relations(args, args.relations)
    layers = parse_int_list(args.layers, num_layers=model.facts.num_layers) if args.layers else None
    update, bar = progress_bar()
    with bar:
        result = attributes.run(
            model,
            relations,
            layers=layers,
            layer_step=args.layer_step,
            max_samples=args.max_samples or None,
            probe_samples=args.probe_samples,
            seed=args.seed,
            progress=update,
        )
    summary = result["all"]
    if summary["n"]:
        print(
            f"{result['evaluated']} of {result['tried']} samples known in plain text; paper metric (mean "
            "over ℓ of "
            f"some ℓ*) {summary['paper_mean_over_l_of_any_l_star']['mean']:.3f}, probe "
            f"{summary['probe_mean_over_l']['mean']:.3f}, majority {summary['majority_class']['p']:.3f}",
            file=sys.stderr,
        )
    return _finish(args, result, f"attributes.{model.id}", attributes.plot)


def cmd_multi_hop(args: argparse.Namespace) -> int:
    from patchscope.eval import multihop

    model = _load(args.model, args.dtype)
    update, bar = progress_bar()
    with bar:
        result = multihop.run(
            model,
            _relations(args),
            layer_step=args.layer_step,
            max_samples=args.max_samples or None,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            progress=update,
        )
    if result["evaluated"]:
        print(
            f"{result['evaluated']} queries; vanilla {result['vanilla']['p']:.3f}, step by step "
            f"{result['step_by_step']['p']:.3f}, CoT Patchscope best pair {result['patchscope_best_pair']} "
            f"{result['patchscope_best_pair_accuracy']['p']:.3f}, oracle "
            f"{result['patchscope_oracle']['p']:.3f}",
            file=sys.stderr,
        )
    else:
        print(f"no two-hop query evaluated ({result['tried']} tried): nothing to conclude", file=sys.stderr)
    return _finish(args, result, f"multi_hop.{model.id}", multihop.plot)


def cmd_description(args: argparse.Namespace) -> int:
    from patchscope.eval import description
    from patchscope.eval.next_token import FittedOnEvaluation
    from patchscope.mapping.corpus import read_documents
    from patchscope.mapping.resolve import resolve_mappings

    source = _load(args.source, args.dtype)
    name = f"description.{source.id}.{args.target or source.id}"
    if args.rescore:
        saved = Path(args.out) / f"{name}.json"
        if not saved.is_file():
            raise SystemExit(f"--rescore: {saved} does not exist: run the command without --rescore first")
        result = description.rescore(json.loads(saved.read_text(encoding="utf-8")), source)
        return _finish(args, result, name, description.plot)
    target = source if args.target in (None, args.source) else _load(args.target, args.dtype)
    corpus = _corpus(args)
    mapping, pairs = None, None
    if target is source:
        documents = read_documents(corpus)
    else:
        registry = _registry_for_seed(args.registry, args.seed)
        best = registry.best(source.id, target.id)
        pairs = parse_pairs_option(args.pairs) if args.pairs else sorted(best)
        if not pairs:
            raise SystemExit(
                f"no mappings {source.id} -> {target.id} in {registry.root}: run patchscope fit-mapping"
            )
        mapping = resolve_mappings(registry, source, target, pairs)
        try:
            documents = description.held_out_documents(mapping, corpus, args.seed)
        except FittedOnEvaluation as error:
            raise SystemExit(str(error)) from None
    entities = description.corpus_entities(documents)
    if args.lre_per_relation:
        entities += description.lre_entities(
            _relations(args, args.lre_relations), args.lre_per_relation, args.seed
        )
    update, bar = progress_bar()
    with bar:
        result = description.run(
            source,
            target,
            entities,
            pairs=pairs,
            layer_step=args.layer_step,
            mapping=mapping,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            progress=update,
        )
    result["corpus_documents"] = (
        f"the {len(documents)} test documents of split seed {args.seed} (the maps' held-out part)"
        if mapping is not None
        else f"all {len(documents)} documents"
    )
    if mapping is not None:
        for entry in result["pairs"]:
            entry["mapping_id"], entry["mapping_r2"] = mapping.describe(
                entry["source_layer"], entry["target_layer"]
            )
    print(
        f"{len(entities)} entities; best pair {result['best_pair']}; text-only ROUGE-L "
        f"{result['text_only']['all']['rouge_l']:.3f}, no-patch "
        f"{result['no_patch_control']['all']['rouge_l']:.3f}",
        file=sys.stderr,
    )
    return _finish(args, result, name, description.plot)


def parse_pairs_option(spec: str) -> list[tuple[int, int]]:
    pairs = []
    for part in spec.split(","):
        a, _, b = part.partition(":")
        pairs.append((int(a), int(b)))
    return pairs


def cmd_report(args: argparse.Namespace) -> int:
    from patchscope.eval.report import write_report

    path = write_report(Path(args.out), Path(args.page))
    print(f"[patchscope] wrote {path}", file=sys.stderr)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """`patchscope eval` and its experiments."""
    ev = sub.add_parser("eval", help="reproduce the paper's experiments (results in docs/results.md)")
    exp = ev.add_subparsers(dest="experiment", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", default=str(RESULTS), help="folder for the JSON result and the PNG plot")
        p.add_argument("--json", action="store_true", help="also print the result as JSON on stdout")
        p.add_argument("--seed", type=int, default=0, help="sampling seed (recorded in the JSON)")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    def lre(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--lre", action="append", default=None, help="LRE folder (<kind>/<name>.json); repeatable"
        )

    def next_token_options(p: argparse.ArgumentParser, positions: int) -> None:
        p.add_argument("--positions", type=int, default=positions, help="evaluation positions per seed")
        p.add_argument(
            "--fit-positions", type=int, default=2000, help="positions the tuned lens is fitted on"
        )
        p.add_argument("--per-text", type=int, default=8, help="evaluation positions taken from one text")
        p.add_argument("--seeds", default="0,1,2", help="document split seeds, each a run (mean ± spread)")
        p.add_argument("--corpus", default=None, help="default $PATCHSCOPE_DATA/wikitext-2/valid.txt")
        p.add_argument(
            "--registry",
            default=None,
            help="mapping registry (cross-model); REGISTRY/seed-N is used for seed N",
        )

    nt = exp.add_parser("next-token", help="§4.1: next token from each layer (patchscope, logit/tuned lens)")
    nt.add_argument("--source", default="smollm2-135m")
    nt.add_argument("--target", default=None, help="default: the source (same-model)")
    next_token_options(nt, 300)
    common(nt)
    nt.set_defaults(func=cmd_next_token)

    cm = exp.add_parser("cross-model", help="§4.4: next token through the registered mappings, with R²")
    cm.add_argument("--source", default="smollm2-135m")
    cm.add_argument("--target", default="gemma3-270m")
    next_token_options(cm, 200)
    cm.add_argument("--pairs", default=None, help="layer pairs 2:1,29:17 (default: every registered pair)")
    common(cm)
    cm.set_defaults(func=cmd_next_token)

    at = exp.add_parser("attributes", help="§4.2: attribute extraction on LRE relations vs a logistic probe")
    at.add_argument("--model", default="smollm2-135m")
    at.add_argument(
        "--layers", default=None, help="source and target layers (default: every --layer-step-th)"
    )
    at.add_argument(
        "--layer-step", type=int, default=4, help="grid of (ℓ, ℓ*): every n-th layer and the last"
    )
    at.add_argument("--relations", default=None, help="comma-separated LRE relation names (default: all)")
    at.add_argument("--max-samples", type=int, default=20, help="samples tried per relation (0 = all)")
    at.add_argument("--probe-samples", type=int, default=60, help="samples per relation the probe uses")
    lre(at)
    common(at)
    at.set_defaults(func=cmd_attributes)

    mh = exp.add_parser("multi-hop", help="§5: two-hop queries: vanilla, step by step, CoT Patchscope")
    mh.add_argument("--model", default="smollm2-135m")
    mh.add_argument("--layer-step", type=int, default=4, help="every n-th layer (and the last) for ℓ and ℓ*")
    mh.add_argument("--max-samples", type=int, default=25, help="queries tried per composition (0 = all)")
    mh.add_argument("--max-new-tokens", type=int, default=20)
    lre(mh)
    common(mh)
    mh.set_defaults(func=cmd_multi_hop)

    de = exp.add_parser(
        "description", help="§4.3: entity description, ROUGE-L against reference descriptions"
    )
    de.add_argument("--source", default="smollm2-135m")
    de.add_argument("--target", default=None, help="default: the source (same-model)")
    de.add_argument(
        "--corpus", default=None, help="WikiText-style file whose titles and lead sentences are used"
    )
    de.add_argument("--lre-per-relation", type=int, default=8, help="LRE subjects per relation (0 = none)")
    de.add_argument(
        "--lre-relations",
        default="landmark_in_country,person_occupation,product_by_company,company_hq,star_constellation",
        help="relations whose subjects are described",
    )
    de.add_argument("--layer-step", type=int, default=3, help="same-model: ℓ* = ℓ on every n-th layer")
    de.add_argument("--pairs", default=None, help="cross-model pairs 2:1,6:4 (default: all registered)")
    de.add_argument(
        "--registry", default=None, help="mapping registry (cross-model); REGISTRY/seed-N for --seed N"
    )
    de.add_argument("--max-new-tokens", type=int, default=16)
    de.add_argument(
        "--rescore",
        action="store_true",
        help="redo the popular/rare split of the saved result from its stored descriptions (no generation)",
    )
    lre(de)
    common(de)
    de.set_defaults(func=cmd_description)

    rp = exp.add_parser("report", help="render docs/results.md from the saved results")
    rp.add_argument("--out", default=str(RESULTS), help="folder holding the experiments' JSON results")
    rp.add_argument("--page", default="docs/results.md")
    rp.set_defaults(func=cmd_report)
