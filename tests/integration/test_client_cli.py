"""`patchscope-client` from the shell: JSON like `patchscope explain --json`, pictures a person can read,
and a client installed in a virtual environment that has no torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from patchscope_client import tensors
from patchscope_client.cli import main

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The river runs past the old mill"


def run_cli(capsys, *args: str) -> str:
    assert main(list(args)) == 0
    return capsys.readouterr().out


def ndjson(text: str) -> list[dict]:
    """The objects of `--json` output, in site order where they are sites (they arrive as they finish)."""
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return sorted(records, key=lambda r: r.get("site", 0))


def test_explain_json_matches_the_server_cli_and_writes_pictures(tiny_service, capsys, tmp_path):
    html, png = tmp_path / "sweep.html", tmp_path / "sweep.png"
    out = run_cli(
        capsys,
        "--address",
        tiny_service.address,
        "explain",
        PROMPT,
        "--source",
        "tiny-llama",
        "--target",
        "tiny-llama",
        "--layers",
        "0-3",
        "--positions",
        "1,3,-1",
        "--max-new-tokens",
        "4",
        "--json",
        "--html",
        str(html),
        "--png",
        str(png),
    )
    rows = [json.loads(line) for line in out.splitlines()]  # NDJSON: one finished site a line
    assert len(rows) == 12 and sorted(r["site"] for r in rows) == list(range(12))
    assert all(r["reproduction"] for r in rows)
    assert set(rows[0]) - {"site", "reproduction"} == {
        "source_layer",
        "target_layer",
        "position",
        "source_token",
        "explanation",
        "answer",
        "mapping_id",
        "mapping_r2",
        "unpatched_answer",
        "same_as_unpatched",
        "patch_effect",
        "dependence",
        "confidence",
        "mean_state_answer",
        "same_as_mean_state",
    }
    page = html.read_text()
    assert (
        page.count('class="site"') == 12 and "<script" not in page and "http" not in page.split("<body>")[1]
    )
    from PIL import Image

    image = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert image.shape[0] > 200 and image.shape[1] > 400
    assert image.std() > 10, "the PNG is blank"


@pytest.mark.browser
def test_the_html_grid_shows_every_site_in_headless_chromium(tiny_service, capsys, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium missing: `make browser-deps` installs Debian's chromium"
    html = tmp_path / "sweep.html"
    run_cli(
        capsys,
        "--address",
        tiny_service.address,
        "explain",
        PROMPT,
        "--source",
        "tiny-llama",
        "--target",
        "tiny-qwen2",
        "--layers",
        "1-3",
        "--positions",
        "2,-1",
        "--max-new-tokens",
        "4",
        "--html",
        str(html),
    )
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", html.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert dom.count('class="site"') == 6 and 'id="sweep"' in dom
    for layer in (1, 2, 3):
        assert dom.count(f'data-layer="{layer}"') == 2
    shot = tmp_path / "sweep-shot.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1200,500",
            html.as_uri(),
        ],
        capture_output=True,
        timeout=120,
    )
    assert shot.exists() and shot.stat().st_size > 5000


CONTROL_KEYS = ("unpatched_answer", "same_as_unpatched", "patch_effect", "dependence", "confidence")


def test_controls_reach_the_json_and_the_table_and_no_controls_removes_them(
    tiny_service, tiny_dirs, capsys, monkeypatch, tmp_path
):
    from patchscope.cli import main as server_main

    flags = ["--target", "tiny-llama", "--layers", "1-3", "--positions", "2,-1", "--max-new-tokens", "4"]
    explain = ["--address", tiny_service.address, "explain", PROMPT, "--source", "tiny-llama", *flags]
    on = ndjson(run_cli(capsys, *explain, "--json"))
    assert len(on) == 6
    for r in on:
        assert isinstance(r["unpatched_answer"], str) and isinstance(r["same_as_unpatched"], bool)
        assert r["same_as_unpatched"] == (r["answer"].lower() == r["unpatched_answer"].lower())
        assert 0.0 <= r["patch_effect"] <= 1.0 and isinstance(r["dependence"], float)
        assert r["confidence"] is None  # no calibrator registered for the tiny models
    off = ndjson(run_cli(capsys, *explain, "--json", "--no-controls"))
    assert [{k: r[k] for k in CONTROL_KEYS} for r in off] == [dict.fromkeys(CONTROL_KEYS)] * 6
    assert [r["explanation"] for r in off] == [r["explanation"] for r in on]

    monkeypatch.setenv("COLUMNS", "400")  # rich wraps a narrow table's cells
    table = run_cli(capsys, *explain)
    assert "conf." in table and "control" in table
    assert table.count("= unpatched") == sum(r["same_as_unpatched"] for r in on)
    assert "= unpatched" not in run_cli(capsys, *explain, "--no-controls")

    # `patchscope explain`, in process on the same weights, takes the same flags and prints the same keys.
    model = str(tiny_dirs["llama"])
    server = [*flags, "--registry", str(tmp_path / "registry"), "--json"]
    server = ["explain", PROMPT, "--source", model, *[model if f == "tiny-llama" else f for f in server]]
    for argv, client_rows in ((server, on), ([*server, "--no-controls"], off)):
        assert server_main(argv) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [sorted(r) for r in rows] == [sorted(set(r) - {"site", "reproduction"}) for r in client_rows]
        for mine, theirs in zip(rows, client_rows, strict=True):
            exact = ("explanation", "answer", "unpatched_answer", "same_as_unpatched", "confidence")
            assert {k: mine[k] for k in exact} == {k: theirs[k] for k in exact}
            for k in ("patch_effect", "dependence"):  # the service's batch may hold other rows
                assert mine[k] == theirs[k] or mine[k] == pytest.approx(theirs[k], abs=1e-4)


def test_extract_then_explain_activations_from_the_file(tiny_service, capsys, tmp_path):
    states = tmp_path / "states.safetensors"
    run_cli(
        capsys,
        "--address",
        tiny_service.address,
        "extract",
        PROMPT,
        "--model",
        "tiny-llama",
        "--layers",
        "1,3",
        "--positions",
        "2,-1",
        "--out",
        str(states),
    )
    data = states.read_bytes()
    assert tensors.decode(data).shape == (4, 64)
    assert json.loads(tensors.metadata(data)["layers"]) == [1, 1, 3, 3]
    from_file = ndjson(
        run_cli(
            capsys,
            "--address",
            tiny_service.address,
            "explain-activations",
            str(states),
            "--source",
            "tiny-llama",
            "--target",
            "tiny-llama",
            "--max-new-tokens",
            "4",
            "--json",
        )
    )
    from_prompt = ndjson(
        run_cli(
            capsys,
            "--address",
            tiny_service.address,
            "explain",
            PROMPT,
            "--source",
            "tiny-llama",
            "--target",
            "tiny-llama",
            "--layers",
            "1,3",
            "--positions",
            "2,-1",
            "--max-new-tokens",
            "4",
            "--json",
        )
    )
    assert [r["explanation"] for r in from_file] == [r["explanation"] for r in from_prompt]
    assert [r["source_token"] for r in from_file] == [r["source_token"] for r in from_prompt]


def test_errors_are_one_line_and_a_rejection_exits_3(tiny_service, capsys):
    code = main(
        [
            "--address",
            tiny_service.address,
            "explain",
            PROMPT,
            "--source",
            "nope",
            "--target",
            "tiny-llama",
            "--layers",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 3 and err.startswith("patchscope-client: error: Explain failed with NOT_FOUND")
    assert err.count("\n") == 1


def test_the_client_installs_and_works_in_a_venv_without_torch(tiny_service, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt")]
    subprocess.run(
        [*pip, str(ROOT / "clients" / "python")],
        check=True,
        timeout=600,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    script = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('torch') is None, 'torch leaked into the client venv'\n"
        "from patchscope_client import PatchscopeClient\n"
        "with PatchscopeClient(sys.argv[1]) as c:\n"
        "    x = c.extract('tiny-llama', 'hello world', [1], dtype='bfloat16')\n"
        "    t = c.explain_table('tiny-llama', 'hello world', [1], target='tiny-llama', max_new_tokens=2)\n"
        "    print(x.layers[0].states.dtype, len(t.rows))\n"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", script, tiny_service.address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["float32", "1"]
    cli = subprocess.run(
        [str(venv / "bin" / "patchscope-client"), "--address", tiny_service.address, "models", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0 and {m["id"] for m in ndjson(cli.stdout)} == {"tiny-llama", "tiny-qwen2"}
