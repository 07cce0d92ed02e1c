"""A batch job from inputs to one table: cut the files into parts, run the parts not yet on disk, merge.

Where the parts run is the only choice: in this process (`run_local`) or on Ray Data actors
(batch/ray_data.py); both call `Worker.run_part` and write parts through the same `PartStore`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from patchscope.batch.inputs import Refusal, expand
from patchscope.batch.options import BatchOptions
from patchscope.batch.parts import PartStore
from patchscope.batch.worker import Worker

# (parts done, parts in all, rows written so far) after each part
Report = Callable[[int, int, int], None]


@dataclass
class Summary:
    """What a run did: rows in the final table, parts run now and skipped, every refusal, speed."""

    rows: int
    parts_run: int
    parts_skipped: int
    refusals: list[Refusal] = field(default_factory=list)
    rows_run: int = 0  # rows explained by this run (not those of parts resumed from disk)
    seconds: float = 0.0
    table: pa.Table | None = None

    @property
    def rows_per_s(self) -> float:
        return self.rows_run / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        lines = [
            f"{self.rows} rows in the table; this run explained {self.rows_run} rows in "
            f"{self.parts_run} parts ({self.rows_per_s:.2f} rows/s); "
            f"{self.parts_skipped} parts already on disk"
        ]
        if self.refusals:
            lines.append(f"{len(self.refusals)} inputs refused:")
            lines += [f"  {r.file}: {r.reason}" for r in self.refusals]
        return lines


@dataclass(frozen=True)
class Prepared:
    """The job's parts on disk and those still to run."""

    store: PartStore
    parts: list[list[str]]
    pending: list[int]
    unmatched: list[Refusal]  # inputs that named no file


def prepare(options: BatchOptions, inputs: Sequence[str], out: str, *, resume: bool = False) -> Prepared:
    """Cut the inputs into parts (sorted files, `files_per_part` each) and find the parts still to run."""
    files, unmatched = expand(inputs)
    n = options.files_per_part
    parts = [files[i : i + n] for i in range(0, len(files), n)]
    store = PartStore(out)
    store.open(options.spec(), parts, resume=resume)
    done = store.done()
    return Prepared(store, parts, [i for i in range(len(parts)) if i not in done], unmatched)


def finish(prepared: Prepared, parts_run: int, rows_run: int, seconds: float) -> Summary:
    """Merge every part into the final table and gather the refusals of all of them."""
    store, parts = prepared.store, prepared.parts
    infos = [store.info(i) for i in range(len(parts))]
    merged = store.merge(list(range(len(parts))))
    refusals = list(prepared.unmatched) + [r for info in infos for r in info.refusals]
    return Summary(
        rows=merged.num_rows,
        parts_run=parts_run,
        parts_skipped=len(parts) - parts_run,
        refusals=refusals,
        rows_run=rows_run,
        seconds=seconds,
        table=merged,
    )


def run_local(
    options: BatchOptions,
    inputs: Sequence[str],
    out: str,
    *,
    resume: bool = False,
    worker: Worker | None = None,
    report: Report = lambda done, total, rows: None,
) -> Summary:
    """Run the job in this process: models loaded once, parts one after another, each written whole."""
    prepared = prepare(options, inputs, out, resume=resume)
    if worker is not None and worker.options != options:
        raise ValueError("the worker was built for other options than the job's")
    total = len(prepared.parts)
    done = total - len(prepared.pending)
    rows_run = 0
    started = time.perf_counter()
    if prepared.pending:
        worker = worker or Worker.load(options)
        started = time.perf_counter()  # speed of the explaining, not of loading the models
        report(done, total, rows_run)
        for index in prepared.pending:
            files = prepared.parts[index]
            part, refusals = worker.run_part(files)
            prepared.store.write(index, part, files, refusals)
            rows_run += part.num_rows
            done += 1
            report(done, total, rows_run)
    return finish(prepared, len(prepared.pending), rows_run, time.perf_counter() - started)
