"""`patchscope batch --ray`: Ray Data actors write the same table as the in-process run, even when one dies.

A real local Ray instance (2 CPUs, private temp dir) of its own, in a child process (the suite's service
cluster lives in this one and holds its CPUs), two actors holding the tiny model. One actor is killed
(SIGKILL) once it has written a part; Ray Data restarts it and retries its part, and the table still has
every row exactly once and equals the in-process run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from patchscope.batch import BatchOptions, run_local
from patchscope.batch.schema import KEY
from tests.integration.test_batch import FILES, LAYER_IDS, write_dumps

pytestmark = pytest.mark.ray


def actor_pids() -> list[int]:
    """Processes of this machine whose title names the batch actor (Ray titles workers by their class)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"PartActor" in cmdline:
                pids.append(int(entry.name))
    return pids


def test_ray_data_table_equals_in_process_with_an_actor_killed(tiny_dirs, tiny_models, tmp_path):
    import tempfile

    model, facts = str(tiny_dirs["llama"]), tiny_models["llama"].facts
    inputs = tmp_path / "dumps"
    write_dumps(inputs, facts.hidden_size, facts.vocab_size)
    options = BatchOptions(
        source=model, target=model, vllm_layers=LAYER_IDS, files_per_part=2, max_new_tokens=12
    )
    local = run_local(options, [str(inputs)], str(tmp_path / "local.parquet"))

    out = tmp_path / "ray.parquet"
    parts = tmp_path / "ray.parquet.parts"
    killed: list[int] = []

    def kill_one_actor_after_a_part() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            pids = actor_pids()
            if pids and len(list(parts.glob("part-*.parquet"))) >= 2:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.01)

    ray_dir = tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp")  # socket paths: <= 107 bytes
    child = f"""
import json
from patchscope.batch import BatchOptions
from patchscope.batch.ray_data import run_ray
options = BatchOptions(source={model!r}, target={model!r}, vllm_layers={tuple(LAYER_IDS)!r}, files_per_part=2,
                       max_new_tokens=12)
summary = run_ray(options, [{str(inputs)!r}], {str(out)!r}, address="local", actors=2, cpus_per_actor=1,
                  init_options={{"num_cpus": 2, "_temp_dir": {ray_dir.name!r}, "include_dashboard": False}})
print("SUMMARY", json.dumps({{"parts_run": summary.parts_run, "refusals": len(summary.refusals)}}))
"""
    env = {**os.environ, "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}
    env.pop("RAY_ADDRESS", None)
    killer = threading.Thread(target=kill_one_actor_after_a_part, daemon=True)
    killer.start()
    try:
        done = subprocess.run(
            [sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=540
        )
    finally:
        killer.join(timeout=5)
        ray_dir.cleanup()
    assert done.returncode == 0, done.stderr[-3000:]
    # Ray forwards its workers' and raylet's log lines to the driver's stdout, before or after ours.
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("SUMMARY ")]
    summary = json.loads(line.removeprefix("SUMMARY "))
    assert killed, "no actor was killed: the test proved nothing"
    assert summary == {"parts_run": FILES // 2, "refusals": 0}
    got = pq.read_table(out)
    keys = [tuple(r[k] for k in KEY) for r in got.to_pylist()]
    assert len(keys) == len(set(keys)) == FILES * len(LAYER_IDS)
    assert got.equals(pq.read_table(tmp_path / "local.parquet"))
    assert local.rows == got.num_rows
