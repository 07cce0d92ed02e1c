"""`patchscope batch`: explain files of captured states (patchscope-client extract, vLLM dumps) in bulk."""

from __future__ import annotations

import argparse
import sys

from patchscope.cli.args import parse_int_list, progress
from patchscope.engine.presets import DEFAULT_PRESET, DEFAULT_TOP_K


def _positions(spec: str) -> tuple[int, ...] | None:
    return None if spec.strip() == "all" else tuple(parse_int_list(spec))


def options_from(args: argparse.Namespace):
    """The job's options, or a ValueError with one line per problem (pydantic's own is a page)."""
    from pydantic import ValidationError

    from patchscope.batch import BatchOptions, parse_target_layers

    try:
        return _options(args, BatchOptions, parse_target_layers)
    except ValidationError as error:
        problems = [f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in error.errors()]
        raise ValueError("; ".join(problems)) from None


def _options(args: argparse.Namespace, BatchOptions, parse_target_layers):
    return BatchOptions(
        source=args.source,
        target=args.target,
        format=args.format,
        vllm_layers=tuple(parse_int_list(args.vllm_layers)) if args.vllm_layers else (),
        positions=_positions(args.positions),
        preset=args.preset,
        template=args.template,
        target_layers=parse_target_layers(args.target_layers),
        mapping=args.mapping,
        max_new_tokens=args.max_new_tokens,
        top_k=args.top_k,
        dtype=args.dtype,
        allow_other_weights=args.allow_other_weights,
        files_per_part=args.files_per_part,
        batch_rows=args.batch_rows,
        max_file_bytes=args.max_file_bytes,
        max_rows_per_file=args.max_rows_per_file,
        registry=args.registry,
        device=args.device,
    )


class _Bar:
    """Parts done and rows/s on stderr: a rich bar on a terminal, else a line per part."""

    def __init__(self) -> None:
        import time

        self.clock = time.perf_counter
        self.started = self.clock()
        self.bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("parts"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[speed]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self.task = self.bar.add_task("parts", total=None, speed="")

    def __call__(self, done: int, total: int, rows: int) -> None:
        elapsed = self.clock() - self.started
        speed = f"{rows} rows, {rows / elapsed:.2f} rows/s" if elapsed > 0 and rows else ""
        if self.bar is None:
            progress(f"parts {done}/{total}" + (f", {speed}" if speed else ""))
        else:
            self.bar.update(self.task, completed=done, total=total, speed=speed)

    def __enter__(self) -> _Bar:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def cmd_batch(args: argparse.Namespace) -> int:
    options = options_from(args)
    with _Bar() as bar:
        if args.ray:
            from patchscope.batch.ray_data import run_ray

            summary = run_ray(
                options,
                args.inputs,
                args.out,
                address=args.ray,
                actors=args.actors,
                cpus_per_actor=args.cpus_per_actor,
                gpus_per_actor=args.gpus_per_actor,
                resume=args.resume,
                report=bar,
            )
        else:
            from patchscope.batch import run_local

            summary = run_local(options, args.inputs, args.out, resume=args.resume, report=bar)
    for line in summary.lines():
        progress(line)
    progress(f"wrote {args.out}")
    return 0 if summary.rows else 1  # non-zero only when nothing could be explained


def add_parsers(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "batch",
        help="explain files of captured states in bulk into a Parquet table (resumable)",
        description="Explain captured states in bulk: one Parquet row per site, written in parts; a rerun "
        "with the same --out skips the parts already written. Files that cannot be explained are refused "
        "one by one with a reason, listed at the end.",
    )
    b.add_argument("inputs", nargs="+", metavar="INPUT", help="files, globs or directories of .safetensors")
    b.add_argument("--source", required=True, help="the states' model id (or a local model directory)")
    b.add_argument("--target", required=True, help="target model id (same as --source for same-model)")
    b.add_argument(
        "--out", required=True, help="the table (FILE.parquet); its parts go to FILE.parquet.parts/"
    )
    b.add_argument("--format", default="auto", choices=["auto", "patchscope", "vllm"])
    b.add_argument(
        "--vllm-layers",
        default=None,
        help="vLLM's eagle_aux_hidden_state_layer_ids in the dumps' order; id k is block k-1's output",
    )
    b.add_argument(
        "--positions",
        default="-1",
        help="positions of each vLLM dump (BOS counted): -1 (last, default), all, 0-5, 3,7; "
        "a patchscope file's rows are explained as they are",
    )
    b.add_argument("--preset", default=DEFAULT_PRESET, help="identity | description | attribute | logit-lens")
    b.add_argument(
        "--template", default=None, help="override the preset's target prompt; {} marks the placeholder"
    )
    b.add_argument(
        "--target-layers",
        default=None,
        help="one target layer, or source:target pairs (2:1,6:4); default by depth",
    )
    b.add_argument(
        "--mapping", default="auto", help="'auto' (best held-out R² per layer pair) or a mapping id"
    )
    b.add_argument("--max-new-tokens", type=int, default=10, help="greedy decoding, so reruns agree")
    b.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="pairs reported by the logit-lens preset")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    b.add_argument("--device", default="cpu")
    b.add_argument(
        "--registry", default=None, help="mapping registry directory (default $PATCHSCOPE_HOME/mappings)"
    )
    b.add_argument(
        "--allow-other-weights",
        action="store_true",
        help="explain files whose fingerprint is not the source's (flagged provenance_mismatch)",
    )
    b.add_argument(
        "--files-per-part", type=int, default=64, help="input files per part (what a crash can lose)"
    )
    b.add_argument("--batch-rows", type=int, default=256, help="rows of one patched generation")
    b.add_argument("--max-file-bytes", type=int, default=4 << 30)
    b.add_argument("--max-rows-per-file", type=int, default=4096)
    b.add_argument(
        "--resume", action="store_true", help="continue the job at --out (an error if there is none)"
    )
    b.add_argument(
        "--ray", default=None, metavar="ADDRESS", help="run the parts on a Ray cluster with Ray Data"
    )
    b.add_argument("--actors", type=int, default=1, help="Ray Data actors, each holding the models once")
    b.add_argument("--cpus-per-actor", type=float, default=1.0)
    b.add_argument("--gpus-per-actor", type=float, default=0.0)
    b.set_defaults(func=cmd_batch)
