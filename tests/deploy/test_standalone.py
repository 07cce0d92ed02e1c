"""A clone on its own runs and tests: no path outside the repository, the data it reads packaged and licensed.

The checks run on a fresh `git clone` of the committed state in a temporary folder with no sibling
`shared/`, so an uncommitted file or a path into `../shared` fails here and not on a newcomer's machine.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ["services", "tests", "bench", "deploy", "clients", "Makefile", "pyproject.toml", ".ci"]
OUTSIDE = re.compile(r"\.\./shared|shared/data|shared/kuberay|parents\[2\]\s*/\s*\"shared\"")
MAX_FILE = 5 << 20
MAX_TOTAL = 4 << 20


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    path = tmp_path_factory.mktemp("solo") / "main"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(path)], check=True)
    assert not (path.parent / "shared").exists()
    return path


def committed(clone: Path) -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=clone, capture_output=True, text=True, check=True)
    return [clone / n for n in names.stdout.splitlines()]


def test_no_committed_file_refers_to_a_folder_beside_the_repository(clone):
    offenders = []
    for path in committed(clone):
        rel = path.relative_to(clone)
        if rel.parts[0] not in SCANNED or path.suffix in {".json", ".txt", ".binpb"}:
            continue
        if rel.as_posix() == "tests/deploy/test_standalone.py":  # its own patterns
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, "paths outside the repository:\n" + "\n".join(offenders)


def test_the_packaged_data_is_small_licensed_and_declared_as_package_data(clone):
    data = clone / "services" / "patchscope" / "data"
    files = [p for p in data.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    names = {p.relative_to(data).as_posix() for p in files}
    assert {"wikitext-2/valid.txt", "lre/LICENSE", "README.md"} <= names
    assert len(list((data / "lre").glob("*/*.json"))) >= 30
    sizes = {p.relative_to(clone).as_posix(): p.stat().st_size for p in files}
    assert max(sizes.values()) < MAX_FILE and sum(sizes.values()) < MAX_TOTAL, sizes
    readme = (data / "README.md").read_text()
    assert "CC BY-SA" in readme and "MIT" in readme
    assert "MIT License" in (data / "lre" / "LICENSE").read_text()
    crd = clone / "deploy" / "kuberay" / "crd"
    assert (crd / "LICENSE").exists() and (crd / "ray.io_rayservices.yaml").stat().st_size < MAX_FILE
    # Every data file (not the module) is matched by the server distribution's package-data globs.
    globs = tomllib.loads((clone / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = globs["patchscope.data"]
    for path in files:
        rel = path.relative_to(data).as_posix()
        if path.suffix != ".py":
            assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} is not package data"


def test_data_paths_resolve_inside_the_clone(clone):
    env = {k: v for k, v in os.environ.items() if k != "PATCHSCOPE_DATA"}
    env["PYTHONPATH"] = str(clone / "services")
    script = (
        "from patchscope.data import data_root; r = data_root(); "
        "print(r); assert (r / 'wikitext-2' / 'valid.txt').is_file() and (r / 'lre').is_dir()"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(clone), result.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_data_check_passes_in_the_clone_and_names_a_missing_folder(clone):
    env = {k: v for k, v in os.environ.items() if k not in {"PATCHSCOPE_DATA", "DATA", "MAKEFLAGS"}}
    ok = subprocess.run(["make", "-s", "data-check"], cwd=clone, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    missing = subprocess.run(
        ["make", "-s", "data-check", "DATA=/no/such/folder"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "/no/such/folder" in missing.stdout + missing.stderr
