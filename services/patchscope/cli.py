"""`patchscope` command: models, prepare, explain.

Later issues add serve, mappings, fit-mapping and eval here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_int_list(spec: str, *, num_layers: int | None = None) -> list[int]:
    """Parse `0-10`, `1,3,5`, `-1`, `2-4,8` or `all` (needs `num_layers`) into a list of ints."""
    spec = spec.strip()
    if spec == "all":
        if num_layers is None:
            raise argparse.ArgumentTypeError("'all' is only valid for layers")
        return list(range(num_layers))
    values: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        head, sep, tail = part[1:].partition("-")  # a leading '-' is a sign, not a range
        if sep:
            start, end = int(part[0] + head), int(tail)
            if end < start:
                raise argparse.ArgumentTypeError(f"range {part!r} ends before it starts")
            values.extend(range(start, end + 1))
        else:
            values.append(int(part))
    return values


def _progress(message: str) -> None:
    print(f"[patchscope] {message}", file=sys.stderr, flush=True)


def cmd_models(args: argparse.Namespace) -> int:
    from patchscope.engine.models import ModelRegistry

    registry = ModelRegistry()
    statuses = [registry.status(i) for i in registry.ids()]
    if args.json:
        print(json.dumps([s.__dict__ for s in statuses], indent=2))
        return 0
    print(f"{'id':<16}{'ready':<7}{'layers':>7}{'hidden':>8}{'vocab':>9}  description")
    for s in statuses:
        ready = "yes" if s.ready else ("no" if s.installed else "absent")
        layers, hidden, vocab = (
            str(v) if v is not None else "-" for v in (s.num_layers, s.hidden_size, s.vocab_size)
        )
        print(f"{s.id:<16}{ready:<7}{layers:>7}{hidden:>8}{vocab:>9}  {s.description}")
        if s.problem:
            print(f"{'':<16}{s.problem}")
    print(f"cache: {registry.home / 'models'}  (`patchscope prepare ID` converts a model once)")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from patchscope.engine.models import ModelRegistry

    registry = ModelRegistry()
    for model_id in args.models or registry.ids():
        path = registry.prepare(model_id, progress=_progress)
        print(f"{model_id}: {path}")
    return 0


def registry_with_paths(*names: str):
    """The default registry, plus any name that is a local model directory or GGUF file (CLI only)."""
    from pathlib import Path

    from patchscope.engine.models import ModelRegistry

    registry = ModelRegistry()
    for name in names:
        if name not in registry.ids() and Path(name).exists():
            registry.register(name, name)
    return registry


def cmd_explain(args: argparse.Namespace) -> int:
    import torch

    from patchscope.engine import ExplainRequest, GenerationConfig, explain, load_model

    if args.target != args.source:
        from patchscope.engine.errors import IncompatibleModels

        raise IncompatibleModels(
            f"cross-model explanation ({args.source} -> {args.target}) needs a mapping, which this "
            "version cannot fit yet; use the same model for --source and --target"
        )
    torch.manual_seed(0)
    registry = registry_with_paths(args.source, args.target)
    source = load_model(
        args.source, registry=registry, dtype=args.dtype, device=args.device, progress=_progress
    )
    target = source
    if args.target != args.source:
        target = load_model(
            args.target, registry=registry, dtype=args.dtype, device=args.device, progress=_progress
        )
    request = ExplainRequest(
        prompt=args.prompt,
        layers=parse_int_list(args.layers, num_layers=source.facts.num_layers),
        positions=parse_int_list(args.position),
        target_layers=None if args.target_layers == "same" else parse_int_list(args.target_layers),
        preset=args.preset,
        template=args.template,
        generation=GenerationConfig(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
        ),
        top_k=args.top_k,
    )
    result = explain(source, target, request)
    if args.json:
        print(json.dumps([r.to_json() for r in result.results], indent=2, ensure_ascii=False))
        return 0
    print(f"{'src':>4} {'tgt':>4} {'pos':>4}  {'source token':<16}{'answer':<20}explanation")
    for r in result.results:
        s = r.site
        print(
            f"{s.source_layer:>4} {s.target_layer:>4} {s.position:>4}  "
            f"{r.source_token!r:<16}{r.answer!r:<20}{r.explanation!r}"
        )
    t = result.timings
    _progress(f"source {t.source_s:.2f}s, prefill {t.prefill_s:.2f}s, decode {t.decode_s:.2f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchscope", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list the model registry and which models are ready")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=cmd_models)

    prepare = sub.add_parser("prepare", help="convert models into the safetensors cache (default: all)")
    prepare.add_argument("models", nargs="*", metavar="ID")
    prepare.set_defaults(func=cmd_prepare)

    ex = sub.add_parser("explain", help="explain a source prompt's hidden states through a target model")
    ex.add_argument("prompt")
    ex.add_argument("--source", required=True, help="source model id (or a local model directory / .gguf)")
    ex.add_argument("--target", required=True, help="target model id (same as --source for same-model)")
    ex.add_argument("--preset", default="identity", help="identity | description | attribute | logit-lens")
    ex.add_argument(
        "--template", default=None, help="override the preset's target prompt; {} marks the placeholder"
    )
    ex.add_argument("--layers", default="all", help="source layers: 0-10, 1,3,5 or all (default)")
    ex.add_argument("--position", default="-1", help="source token positions, BOS counted; default -1 (last)")
    ex.add_argument("--target-layers", default="same", help="'same', one layer, or one per source layer")
    ex.add_argument("--max-new-tokens", type=int, default=10)
    ex.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ex.add_argument("--top-p", type=float, default=1.0)
    ex.add_argument("--seed", type=int, default=None)
    ex.add_argument("--top-k", type=int, default=5, help="pairs reported by the logit-lens preset")
    ex.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ex.add_argument("--device", default="cpu")
    ex.add_argument("--json", action="store_true", help="print a list of JSON objects, one per site")
    ex.set_defaults(func=cmd_explain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from patchscope.engine.errors import PatchscopeError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (PatchscopeError, argparse.ArgumentTypeError) as error:
        print(f"patchscope: error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # bad numbers in --layers / --position
        print(f"patchscope: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
