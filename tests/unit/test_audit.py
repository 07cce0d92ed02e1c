"""The code's syntax tree holds no pickle, no `torch.load` without `weights_only=True`, no remote code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(
    p
    for folder in ("services", "clients/python/patchscope_client", "bench", "deploy")
    for p in (ROOT / folder).rglob("*.py")
    if "_proto" not in p.parts
)


def findings(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [
                f"imports {n}" for n in names if n and n.split(".")[0] in {"pickle", "cloudpickle", "dill"}
            ]
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            torch_load = name.endswith("torch.load") and not name.startswith("safetensors")
            if torch_load or (name == "load" and isinstance(node.func, ast.Name)):
                weights_only = keywords.get("weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append(f"{name}() without weights_only=True")
            remote = keywords.get("trust_remote_code")
            if remote is not None and not (isinstance(remote, ast.Constant) and remote.value is False):
                found.append(f"{name}(trust_remote_code=...)")
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pickle_no_unsafe_torch_load_no_remote_code(path):
    assert findings(ast.parse(path.read_text(), str(path))) == []


def test_the_audit_catches_what_it_looks_for():
    bad = (
        "import pickle\nfrom cloudpickle import dumps\nimport torch\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\n"
        "AutoModel.from_pretrained('m', trust_remote_code=True)\n"
    )
    assert len(findings(ast.parse(bad))) == 5
    assert findings(ast.parse("import torch\ntorch.load('x', weights_only=True)\n")) == []
