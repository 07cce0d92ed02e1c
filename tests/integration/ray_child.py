"""Run a script that starts its own Ray instance in a child process and read the JSON it prints last.

Tests that need Ray's own process-level setup (a fixed metrics port, Serve's tracing config) cannot share
the suite's cluster; a child process keeps its `ray.init` and `ray.shutdown` away from it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile


def run_ray_child(script: str, *args: str, prefix: str, timeout_s: float) -> dict:
    """Run `script` as `python -c script TEMP_DIR *args`; TEMP_DIR is a private, short Ray temp dir."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    temp_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths have a limit
    try:
        done = subprocess.run(
            [sys.executable, "-c", script, temp_dir, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
        )
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
