"""`patchscope batch` as a process: killed mid-run and resumed, its table equals an uninterrupted run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from patchscope.batch.schema import KEY

FILES, LAYER_IDS, PER_PART = 40, (2, 4), 2


def write_dumps(folder: Path, hidden: int, vocab: int) -> None:
    """vLLM-format dumps of random (finite) states: the kill test needs many files, not meaningful ones."""
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for k in range(FILES):
        t = 3 + k % 5
        save_file(
            {
                "hidden_states": torch.randn(t, len(LAYER_IDS), hidden, generator=g),
                "token_ids": torch.randint(2, vocab, (t,), generator=g),
            },
            str(folder / f"req-{k:03d}.safetensors"),
        )


def command(model: Path, inputs: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "patchscope.cli",
        "batch",
        str(inputs),
        "--source",
        str(model),
        "--target",
        str(model),
        "--out",
        str(out),
        "--vllm-layers",
        ",".join(map(str, LAYER_IDS)),
        "--files-per-part",
        str(PER_PART),
        "--max-new-tokens",
        "12",
        *extra,
    ]


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_killed_mid_run_then_resumed_equals_an_uninterrupted_run(tiny_dirs, tiny_models, tmp_path):
    model, facts = tiny_dirs["llama"], tiny_models["llama"].facts
    inputs = tmp_path / "dumps"
    write_dumps(inputs, facts.hidden_size, facts.vocab_size)
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    parts_total = FILES // PER_PART

    whole = tmp_path / "whole.parquet"
    subprocess.run(command(model, inputs, whole), check=True, env=env, capture_output=True, timeout=300)

    out = tmp_path / "killed.parquet"
    parts = tmp_path / "killed.parquet.parts"
    proc = subprocess.Popen(command(model, inputs, out), env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while len(list(parts.glob("part-*.parquet"))) < 3 and proc.poll() is None:
        assert time.monotonic() < deadline, "the job wrote no parts"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list(parts.glob("part-*.parquet")))
    assert proc.returncode == -signal.SIGKILL and 3 <= written < parts_total, "killed too late to test resume"
    assert not out.exists()  # the table is only merged at the end

    resumed = subprocess.run(
        command(model, inputs, out, "--resume"), env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (
        f"{parts_total - written} parts" in resumed.stderr
        and f"{written} parts already on disk" in resumed.stderr
    )

    got, want = rows(out), rows(whole)
    keys = [tuple(r[k] for k in KEY) for r in got]
    assert len(keys) == len(set(keys)) == FILES * len(LAYER_IDS)  # every row exactly once
    assert got == want
    assert pq.read_table(out).equals(pq.read_table(whole))


def test_nothing_explainable_exits_non_zero_with_the_reasons(tiny_dirs, tmp_path):
    inputs = tmp_path / "bad"
    inputs.mkdir()
    (inputs / "a.safetensors").write_bytes(b"\x00" * 40)
    save_file({"other": torch.zeros(2)}, str(inputs / "b.safetensors"))
    done = subprocess.run(
        command(tiny_dirs["llama"], inputs, tmp_path / "o.parquet"),
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 1
    assert "2 inputs refused" in done.stderr and "unknown format" in done.stderr, done.stderr
    assert pq.read_table(tmp_path / "o.parquet").num_rows == 0


@pytest.mark.parametrize(
    ("flag", "message"),
    [(["--vllm-layers", "0,2"], "id 0 is the embeddings"), (["--format", "nope"], "invalid choice")],
)
def test_bad_options_fail_before_any_model_loads(tmp_path, flag, message):
    cmd = command(tmp_path / "no-model", tmp_path, tmp_path / "o.parquet", *flag)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr, done.stderr
