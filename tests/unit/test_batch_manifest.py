"""deploy/kuberay/rayjob-batch.yaml validated offline, without committing KubeRay's 0.7 MB RayJob CRD.

A RayJob's `rayClusterSpec` is KubeRay's RayClusterSpec, the type of a RayService's `rayClusterConfig`
(the two CRDs of v1.7 hold the same schema for it), so it is checked against the committed RayService
CRD, strictly; the RayJob's own fields against the names and types v1.7's CRD gives them; the other
objects against Kubernetes' schemas; the entrypoint against the real `patchscope batch` parser.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kuberay" / "rayjob-batch.yaml"
CRD = ROOT / "deploy" / "kuberay" / "crd" / "ray.io_rayservices.yaml"
# RayJob v1 `spec` in KubeRay v1.7's ray.io_rayjobs.yaml: property -> JSON type (objects checked elsewhere).
RAYJOB_SPEC = {
    "activeDeadlineSeconds": int,
    "backoffLimit": int,
    "clusterSelector": dict,
    "deletionStrategy": dict,
    "entrypoint": str,
    "entrypointNumCpus": (int, float),
    "entrypointNumGpus": (int, float),
    "entrypointResources": str,
    "jobId": str,
    "managedBy": str,
    "metadata": dict,
    "preRunningDeadlineSeconds": int,
    "rayClusterSpec": dict,
    "runtimeEnvYAML": str,
    "shutdownAfterJobFinishes": bool,
    "submissionMode": str,
    "submitterConfig": dict,
    "submitterPodTemplate": dict,
    "suspend": bool,
    "ttlSecondsAfterFinished": int,
}


def documents() -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def rayjob() -> dict:
    (doc,) = [d for d in documents() if d["kind"] == "RayJob"]
    return doc


@pytest.fixture(scope="module")
def cluster_schema(tmp_path_factory) -> Path:
    sys.path.insert(0, str(ROOT / "deploy" / "kuberay"))
    from crd2jsonschema import convert

    schema = convert(CRD, "v1")
    cluster = schema["properties"]["spec"]["properties"]["rayClusterConfig"]
    path = tmp_path_factory.mktemp("schema") / "raycluster.schema.json"
    path.write_text(json.dumps({"$schema": schema["$schema"], **cluster}))
    return path


def check(doc: dict, schema: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(doc))
    return subprocess.run(
        [str(Path(sys.executable).parent / "check-jsonschema"), "--schemafile", str(schema), str(path)],
        capture_output=True,
        text=True,
    )


def test_the_cluster_spec_validates_strictly_and_a_typo_fails(cluster_schema, tmp_path):
    spec = rayjob()["spec"]["rayClusterSpec"]
    result = check(spec, cluster_schema, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    spec["headGroupSpec"]["rayStartParam"] = {}
    assert check(spec, cluster_schema, tmp_path).returncode != 0


def test_rayjob_fields_are_v1_7_fields_and_the_other_objects_kubernetes_objects():
    doc = rayjob()
    assert doc["apiVersion"] == "ray.io/v1" and set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    for key, value in doc["spec"].items():
        assert key in RAYJOB_SPEC, key
        assert isinstance(value, RAYJOB_SPEC[key]), (key, value)
    assert doc["spec"]["submissionMode"] in {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
    for other in documents():
        if other["kind"] != "RayJob":
            kubernetes_validate.validate(other, "1.33.0", strict=True)


def test_the_entrypoint_parses_and_runs_on_the_cluster_it_starts():
    from patchscope.cli import build_parser

    argv = shlex.split(rayjob()["spec"]["entrypoint"])
    assert argv[:2] == ["patchscope", "batch"]
    args = build_parser().parse_args(argv[1:])
    assert args.ray == "auto" and args.out.startswith("/data/")
    workers = rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(int(w["rayStartParams"].get("num-gpus", 0)) * w["replicas"] for w in workers)
    assert args.actors * args.gpus_per_actor <= gpus  # the actor pool fits the cluster
    for pod in [rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"], *workers]:
        mounts = {m["mountPath"] for c in pod["template"]["spec"]["containers"] for m in c["volumeMounts"]}
        assert {"/models", "/data"} <= mounts  # inputs, parts and table on storage every node sees
