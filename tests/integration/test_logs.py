"""What the service's logs hold after the tests before this one ran: JSON lines, and never a prompt or a
bearer token (those tests sent both)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
SECRETS = [
    "The river runs past the old mill",  # the prompt most integration tests send
    "alpha-secret",
    "beta-secret-2",
    "gamma-secret-3",  # bearer tokens of test_auth_and_quotas.py
]


def log_files(service) -> list[Path]:
    root = Path(service.temp_dir) / "session_latest" / "logs"
    return [p for p in root.rglob("*") if p.is_file() and p.suffix in {".log", ".out", ".err", ".txt"}]


def test_replica_logs_are_json_lines(tiny_service):
    replicas = [p for p in log_files(tiny_service) if p.name.startswith("replica_patchscope_")]
    assert {p.name.split("_")[2] for p in replicas} >= {"Explainer", "SourceModel", "TargetModel"}
    for path in replicas:
        for line in path.read_text(errors="replace").splitlines():
            if line.strip():
                assert isinstance(json.loads(line), dict), f"{path.name}: {line[:120]}"


def test_no_log_holds_a_prompt_or_a_token(tiny_service):
    files = log_files(tiny_service)
    assert files
    for path in files:
        text = path.read_text(errors="replace")
        for secret in SECRETS:
            assert secret not in text, f"{path.name} contains {secret[:12]}…"
