"""What every command group shares: integer lists from the command line and progress on stderr."""

from __future__ import annotations

import argparse
import contextlib
import sys


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


def progress(message: str) -> None:
    print(f"[patchscope] {message}", file=sys.stderr, flush=True)


def progress_bar():
    """(callback, context manager): a rich progress display on a terminal, else a line per tenth done."""
    if not sys.stderr.isatty():
        reported: dict[str, int] = {}

        def log(phase: str, done: int, total: int) -> None:
            tenth = 10 * done // max(total, 1)
            if reported.get(phase) != tenth:
                reported[phase] = tenth
                print(f"[patchscope] {phase}: {done}/{total}", file=sys.stderr, flush=True)

        return log, contextlib.nullcontext()

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    tasks: dict[str, int] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=total)
        bar.update(tasks[phase], completed=done, total=total)

    return update, bar
