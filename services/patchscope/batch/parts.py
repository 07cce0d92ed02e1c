"""Where a batch job keeps its output: one Parquet part per group of input files, then one merged table.

`OUT.parquet.parts/` holds `job.json` (the job's options and which files each part covers) and
`part-NNNNN.parquet`, each written to a temporary name, synced and renamed, so a part either exists whole
or not at all: a crash loses at most the parts in flight, and a rerun skips every part on disk. A part
records its files (with size and modification time, to notice a file changed under a resumed job) and
its refusals in the Parquet metadata, so the summary of a resumed job still lists every refusal.
`OUT.parquet` is the parts concatenated in part order, rewritten at the end of every run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from patchscope.batch.inputs import Refusal
from patchscope.batch.schema import SCHEMA
from patchscope.engine.errors import InvalidArgument

FILES_KEY = b"patchscope.files"
REFUSALS_KEY = b"patchscope.refusals"


@dataclass(frozen=True)
class PartInfo:
    """A part on disk, read from its footer without its rows."""

    index: int
    rows: int
    refusals: tuple[Refusal, ...]


def stat_record(path: str) -> list:
    try:
        st = os.stat(path)
    except OSError:
        return [path, None, None]
    return [path, st.st_size, st.st_mtime_ns]


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class PartStore:
    """The parts of one job's `--out`."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.dir = self.out.with_name(self.out.name + ".parts")

    def part_path(self, index: int) -> Path:
        return self.dir / f"part-{index:05d}.parquet"

    def open(self, spec: dict, parts: list[list[str]], *, resume: bool) -> None:
        """Start the job, or check that the job on disk is this one (same options, same parts).

        Reruns with the same `--out` resume; a different job there is an error, never a silent mix.
        """
        job = {"spec": spec, "parts": parts}
        record = self.dir / "job.json"
        if not record.exists():
            if resume:
                raise InvalidArgument("--resume", f"nothing to resume: {record} does not exist")
            self.dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(record, lambda p: p.write_text(json.dumps(job, indent=1, sort_keys=True)))
            return
        saved = json.loads(record.read_text())
        if saved.get("spec") != spec:
            changed = sorted(
                k for k in spec.keys() | saved["spec"].keys() if spec.get(k) != saved["spec"].get(k)
            )
            raise InvalidArgument(
                "--out",
                f"{self.out} holds a job with other options ({', '.join(changed)}); "
                f"use another --out, or remove {self.dir} to start over",
            )
        if saved.get("parts") != parts:
            raise InvalidArgument(
                "INPUT",
                f"the inputs differ from those of the job at {self.out} ({len(saved['parts'])} parts there, "
                f"{len(parts)} now); use another --out, or remove {self.dir} to start over",
            )

    def done(self) -> set[int]:
        """Parts on disk whose footer reads, after checking their files did not change since."""
        finished = set()
        for path in sorted(self.dir.glob("part-*.parquet")):
            try:
                meta = pq.read_schema(path).metadata or {}
            except (OSError, pa.ArrowInvalid):
                continue  # unreadable: redone (a rename makes this rare, a bad disk not impossible)
            for record in json.loads(meta.get(FILES_KEY, b"[]")):
                if stat_record(record[0]) != record:
                    raise InvalidArgument(
                        "INPUT",
                        f"{record[0]} changed since {path.name} explained it; use another --out, or remove "
                        f"{path} to redo its files",
                    )
            finished.add(int(path.stem.removeprefix("part-")))
        return finished

    def write(self, index: int, table: pa.Table, files: list[str], refusals: list[Refusal]) -> None:
        meta = {
            FILES_KEY: json.dumps([stat_record(f) for f in files]).encode(),
            REFUSALS_KEY: json.dumps([[r.file, r.reason] for r in refusals]).encode(),
        }
        table = table.replace_schema_metadata(meta)
        _atomic_write(self.part_path(index), lambda p: pq.write_table(table, p))

    def info(self, index: int) -> PartInfo:
        path = self.part_path(index)
        meta = pq.read_schema(path).metadata or {}
        refusals = tuple(Refusal(f, r) for f, r in json.loads(meta.get(REFUSALS_KEY, b"[]")))
        return PartInfo(index, pq.read_metadata(path).num_rows, refusals)

    def merge(self, indices: list[int]) -> pa.Table:
        """Concatenate parts in part order into `OUT.parquet` (atomically); returns the table."""
        tables = [pq.read_table(self.part_path(i), schema=SCHEMA) for i in sorted(indices)]
        merged = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
        merged = merged.replace_schema_metadata(None)
        _atomic_write(self.out, lambda p: pq.write_table(merged, p))
        return merged
