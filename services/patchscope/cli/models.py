"""`patchscope models` and `patchscope prepare`: the model registry and its conversion cache."""

from __future__ import annotations

import argparse
import json

from patchscope.cli.args import progress


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
        path = registry.prepare(model_id, progress=progress)
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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="list the model registry and which models are ready")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=cmd_models)

    prepare = sub.add_parser("prepare", help="convert models into the safetensors cache (default: all)")
    prepare.add_argument("models", nargs="*", metavar="ID")
    prepare.set_defaults(func=cmd_prepare)
