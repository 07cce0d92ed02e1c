"""`patchscope` command: serve, models, prepare, explain, mappings, fit-mapping, calibrate, eval, batch.

One module per command group, each adding its subcommands with `add_parsers`; `args` holds what they share.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_parser() -> argparse.ArgumentParser:
    from patchscope.cli import batch, calibrate, explain, mappings, models, serve
    from patchscope.cli import eval as eval_group

    parser = argparse.ArgumentParser(prog="patchscope", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (serve, models, explain, mappings, calibrate, eval_group, batch):
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from patchscope.engine.errors import PatchscopeError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (PatchscopeError, argparse.ArgumentTypeError, FileNotFoundError) as error:
        print(f"patchscope: error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # bad numbers in --layers / --position
        print(f"patchscope: error: {error}", file=sys.stderr)
        return 2
