"""`python -m patchscope.eval.timed CMD ...`: run one eval command and record its wall time for the page.

Why: the results page says how long `make eval` takes on the machine that made it, and that figure must
come from the runs themselves, not be typed. Each call appends (command, wall seconds, CPU count, load
average at start and end, UTC time, the result files it wrote) to `docs/results/timings.json`, replacing
an earlier entry for the same command; the report renders the table from it. The exit status is passed on.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

TIMINGS = Path("docs/results/timings.json")


def record(path: Path, entry: dict) -> list[dict]:
    """`path`'s entries with `entry` in place of any earlier one for the same command (order kept)."""
    entries = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    entries = [e for e in entries if e["command"] != entry["command"]] + [entry]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return entries


def _written(folder: Path) -> dict[str, float]:
    """Each result JSON's modification time, so the entry can name the results its command wrote."""
    return {p.stem: p.stat().st_mtime for p in folder.glob("*.json") if p.name != TIMINGS.name}


def main(argv: list[str]) -> int:
    """Run `argv` as a command, then record its wall time (also when it fails, with its status)."""
    if not argv:
        raise SystemExit("usage: python -m patchscope.eval.timed COMMAND [ARGS...]")
    load_start = os.getloadavg()[0]
    before = _written(TIMINGS.parent)
    started = time.perf_counter()
    status = subprocess.call(argv)
    wall = time.perf_counter() - started
    after = _written(TIMINGS.parent)
    program = Path(argv[0]).name
    record(
        TIMINGS,
        {
            "command": shlex.join([program, *argv[1:]]),
            "wall_s": round(wall, 1),
            "status": status,
            "cpus": os.cpu_count(),
            "load_start": round(load_start, 2),
            "load_end": round(os.getloadavg()[0], 2),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "wrote": sorted(stem for stem, mtime in after.items() if before.get(stem) != mtime),
        },
    )
    print(f"[patchscope] {program}: {wall:.1f} s wall (status {status})", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
