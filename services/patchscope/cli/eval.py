"""`patchscope eval ...`: run one experiment, save its JSON and plot, print a summary."""

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
    from patchscope.eval import next_token
    from patchscope.mapping.registry import MappingRegistry

    source = _load(args.source, args.dtype)
    target = source if args.target in (None, args.source) else _load(args.target, args.dtype)
    corpus = Path(args.corpus) if args.corpus else data_root() / "wikitext-2" / "valid.txt"
    update, bar = progress_bar()
    with bar:
        result = next_token.run(
            source,
            target,
            corpus,
            positions=args.positions,
            fit_positions=args.fit_positions,
            registry=MappingRegistry(args.registry),
            seed=args.seed,
            progress=update,
        )
    kind = "next_token" if result["same_model"] else "cross_model"
    name = f"{kind}.{source.id}.{target.id}"
    for entry in result["pairs"]:
        layer = entry["source_layer"]
        lens = next(e for e in result["layers"] if e["layer"] == layer)
        r2 = f"  R² {entry['mapping_r2']:.2f}" if "mapping_r2" in entry else ""
        print(
            f"{layer:>3} -> {entry['target_layer']:<3} P@1 patchscope "
            f"{entry['patchscope']['precision_at_1']:.3f}"
            f"  logit lens {lens['logit_lens']['precision_at_1']:.3f}"
            f"  tuned lens {lens['tuned_lens']['precision_at_1']:.3f}{r2}",
            file=sys.stderr,
        )
    return _finish(args, result, name, next_token.plot if result["same_model"] else next_token.plot_pairs)


def cmd_attributes(args: argparse.Namespace) -> int:
    from patchscope.eval import attributes
    from patchscope.eval.common import read_relations

    model = _load(args.model, args.dtype)
    relations = read_relations(data_root() / "lre", args.relations.split(",") if args.relations else None)
    layers = parse_int_list(args.layers, num_layers=model.facts.num_layers)
    update, bar = progress_bar()
    with bar:
        result = attributes.run(
            model,
            relations,
            layers=layers,
            max_samples=args.max_samples or None,
            seed=args.seed,
            progress=update,
        )
    print(
        f"{result['evaluated']} of {result['tried']} samples known in plain text; best layer "
        f"{result['best_layer']} {result['best_layer_accuracy']:.3f}, "
        f"probe {result['best_probe_accuracy']:.3f},"
        f" any layer (oracle) {result['any_layer_oracle']:.3f}",
        file=sys.stderr,
    )
    return _finish(args, result, f"attributes.{model.id}", attributes.plot)


def cmd_multi_hop(args: argparse.Namespace) -> int:
    from patchscope.eval import multihop
    from patchscope.eval.common import read_relations

    model = _load(args.model, args.dtype)
    relations = read_relations(data_root() / "lre")
    update, bar = progress_bar()
    with bar:
        result = multihop.run(
            model,
            relations,
            layer_step=args.layer_step,
            max_samples=args.max_samples or None,
            seed=args.seed,
            progress=update,
        )
    print(
        f"{result['evaluated']} queries; vanilla {result['vanilla']:.3f}, chain of thought "
        f"{result['chain_of_thought']:.3f}, CoT Patchscope best pair {result['patchscope_best_pair']} "
        f"{result['patchscope_best_pair_accuracy']:.3f}, oracle {result['patchscope_oracle']:.3f}",
        file=sys.stderr,
    )
    return _finish(args, result, f"multi_hop.{model.id}", multihop.plot)


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
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    nt = exp.add_parser("next-token", help="§4.1: next token from each layer (patchscope, logit/tuned lens)")
    nt.add_argument("--source", default="smollm2-135m")
    nt.add_argument("--target", default=None, help="default: the source (same-model)")
    nt.add_argument("--positions", type=int, default=1000, help="evaluation positions (held-out documents)")
    nt.add_argument("--fit-positions", type=int, default=4000, help="positions the tuned lens is fitted on")
    nt.add_argument("--corpus", default=None, help="default $PATCHSCOPE_DATA/wikitext-2/valid.txt")
    nt.add_argument("--registry", default=None, help="mapping registry (cross-model)")
    common(nt)
    nt.set_defaults(func=cmd_next_token)

    cm = exp.add_parser("cross-model", help="§4.4: next token through the registered mappings, with R²")
    cm.add_argument("--source", default="smollm2-135m")
    cm.add_argument("--target", default="gemma3-270m")
    cm.add_argument("--positions", type=int, default=1000)
    cm.add_argument("--fit-positions", type=int, default=4000)
    cm.add_argument("--corpus", default=None)
    cm.add_argument("--registry", default=None)
    common(cm)
    cm.set_defaults(func=cmd_next_token)

    at = exp.add_parser("attributes", help="§4.2: attribute extraction on LRE relations vs a linear probe")
    at.add_argument("--model", default="smollm2-135m")
    at.add_argument("--layers", default="all")
    at.add_argument("--relations", default=None, help="comma-separated LRE relation names (default: all)")
    at.add_argument("--max-samples", type=int, default=30, help="samples tried per relation (0 = all)")
    common(at)
    at.set_defaults(func=cmd_attributes)

    mh = exp.add_parser("multi-hop", help="§5: two-hop queries: vanilla, chain of thought, CoT Patchscope")
    mh.add_argument("--model", default="smollm2-135m")
    mh.add_argument("--layer-step", type=int, default=3, help="every n-th layer for ℓ and ℓ*")
    mh.add_argument("--max-samples", type=int, default=40, help="queries tried per composition (0 = all)")
    common(mh)
    mh.set_defaults(func=cmd_multi_hop)

    rp = exp.add_parser("report", help="render docs/results.md from the saved results")
    rp.add_argument("--out", default=str(RESULTS), help="folder holding the experiments' JSON results")
    rp.add_argument("--page", default="docs/results.md")
    rp.set_defaults(func=cmd_report)
