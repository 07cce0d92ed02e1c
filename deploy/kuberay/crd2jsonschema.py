"""Turn a CRD's openAPIV3Schema into a strict JSON schema for check-jsonschema.

    python deploy/kuberay/crd2jsonschema.py deploy/kuberay/crd/ray.io_rayservices.yaml v1 > rs.schema.json
    check-jsonschema --schemafile rs.schema.json deploy/kuberay/rayservice.yaml

`deploy/kuberay/crd/ray.io_rayservices.yaml` is KubeRay's CRD slimmed by `slim` (one version, no
descriptions: the schema is unchanged, the file half the size):

    python deploy/kuberay/crd2jsonschema.py --slim CRD.yaml v1 > deploy/kuberay/crd/ray.io_rayservices.yaml

Strict means what a server with strict field validation does: an object that lists its properties (and
does not say x-kubernetes-preserve-unknown-fields) rejects any other key, so a typo fails here and not on
the cluster. `x-kubernetes-int-or-string` becomes "integer or string".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml


def strict(node: Any) -> Any:
    if isinstance(node, list):
        return [strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict(v) for k, v in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def without_descriptions(node: Any) -> Any:
    if isinstance(node, list):
        return [without_descriptions(n) for n in node]
    if not isinstance(node, dict):
        return node
    # A property named "description" is a dict; only the prose (a string) goes.
    return {
        k: without_descriptions(v) for k, v in node.items() if not (k == "description" and isinstance(v, str))
    }


def slim(crd_path: Path, version: str) -> dict[str, Any]:
    """The CRD with only `version` and no descriptions: what validation needs, small enough to commit."""
    crd = yaml.safe_load(crd_path.read_text())
    crd["spec"]["versions"] = [
        without_descriptions(v) for v in crd["spec"]["versions"] if v["name"] == version
    ]
    return crd


def convert(crd_path: Path, version: str) -> dict[str, Any]:
    crd = yaml.safe_load(crd_path.read_text())
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strict(entry["schema"]["openAPIV3Schema"])
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    schema["properties"]["apiVersion"] = {"const": f"{group}/{version}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    schema.get("properties", {}).pop("status", None)  # written by the operator, never by us
    draft = "http://json-schema.org/draft-07/schema#"
    return {"$schema": draft, "title": f"{kind} {group}/{version}", **schema}


if __name__ == "__main__":
    if sys.argv[1] == "--slim":
        yaml.safe_dump(
            slim(Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "v1"), sys.stdout, sort_keys=False
        )
    else:
        json.dump(convert(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "v1"), sys.stdout)
