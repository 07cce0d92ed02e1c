"""Deployment artefacts validated offline: KubeRay's CRD schema, Kubernetes' own schemas, Ray's Serve schema,
real Helm rendering (Helm's Go engine through helm-python-sdk) and hadolint."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from ray.serve._private.utils import import_attr
from ray.serve.schema import ServeDeploySchema

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# KubeRay v1.7's RayService CRD, slimmed (deploy/kuberay/crd2jsonschema.py --slim) and committed.
CRD = DEPLOY / "kuberay" / "crd" / "ray.io_rayservices.yaml"
BIN = Path(sys.executable).parent
K8S_VERSION = "1.33.0"


@pytest.fixture(scope="module")
def rayservice_schema(tmp_path_factory) -> Path:
    if not CRD.exists():
        pytest.fail(f"KubeRay CRD missing at {CRD}")
    sys.path.insert(0, str(DEPLOY / "kuberay"))
    from crd2jsonschema import convert

    path = tmp_path_factory.mktemp("schema") / "rayservice.schema.json"
    path.write_text(json.dumps(convert(CRD, "v1")))
    return path


def render(values: dict | None = None) -> list[dict]:
    import helm_python as helm

    chart = helm.Chart.load(str(DEPLOY / "helm" / "patchscope"))
    files = chart.render(values, name="patchscope", namespace="default", is_install=True)
    docs = []
    for name, text in sorted(files.items()):
        if name.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def manifests() -> dict[str, list[dict]]:
    example = yaml.safe_load((DEPLOY / "helm" / "examples" / "gpu-pair.yaml").read_text())
    return {
        "kuberay/rayservice.yaml": [
            d for d in yaml.safe_load_all((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
        ],
        "chart, default values": render(),
        "chart, gpu-pair example": render(example),
        "chart, auth off": render({"auth": {"required": False}}),
        "chart, TLS edge with mTLS": render({"tls": {"enabled": True, "clientCaKey": "ca.crt"}}),
    }


def check_rayservice(doc: dict, schema: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "rayservice.json"
    path.write_text(json.dumps(doc))
    return subprocess.run(
        [str(BIN / "check-jsonschema"), "--schemafile", str(schema), str(path)],
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize("source", list(manifests()))
def test_every_object_validates_against_its_schema(source, rayservice_schema, tmp_path):
    docs = manifests()[source]
    kinds = sorted(d["kind"] for d in docs)
    assert "RayService" in kinds and "PersistentVolumeClaim" in kinds and "Job" in kinds, kinds
    for doc in docs:
        if doc["kind"] == "RayService":
            result = check_rayservice(doc, rayservice_schema, tmp_path)
            assert result.returncode == 0, result.stdout + result.stderr
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_crd_check_rejects_a_misspelt_field(rayservice_schema, tmp_path):
    (doc,) = [d for d in manifests()["kuberay/rayservice.yaml"] if d["kind"] == "RayService"]
    broken = copy.deepcopy(doc)
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    result = check_rayservice(broken, rayservice_schema, tmp_path)
    assert result.returncode != 0 and "rayStartParam" in result.stdout + result.stderr


@pytest.mark.parametrize("source", list(manifests()))
def test_serve_config_parses_and_its_import_paths_import(source):
    (doc,) = [d for d in manifests()[source] if d["kind"] == "RayService"]
    config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    for function in config.grpc_options.grpc_servicer_functions:
        assert callable(import_attr(function))
    (app,) = config.applications
    assert callable(import_attr(app.import_path.replace(":", ".")))
    gpus = {d.name: d.ray_actor_options.num_gpus or 0 for d in app.deployments}
    assert gpus["SourceModel"] == 1 and gpus["TargetModel"] == 1 and gpus["Explainer"] == 0
    from patchscope.serve.config import ServiceConfig

    settings = ServiceConfig.model_validate(app.args)
    assert settings.auth.required == (source != "chart, auth off")


def test_the_plain_manifest_serves_deploy_config_gpu_yaml():
    (doc,) = [d for d in manifests()["kuberay/rayservice.yaml"] if d["kind"] == "RayService"]
    assert yaml.safe_load(doc["spec"]["serveConfigV2"]) == yaml.safe_load(
        (DEPLOY / "config" / "gpu.yaml").read_text()
    )


@pytest.mark.parametrize("source", list(manifests()))
def test_the_head_exposes_grpc_as_serve_grpc_and_replicas_mount_models_read_only(source):
    docs = manifests()[source]
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["serve-grpc"] == 9000 and ports["serve"] == 8000
    for pod in [cluster["headGroupSpec"]["template"]["spec"]] + [
        w["template"]["spec"] for w in cluster["workerGroupSpecs"]
    ]:
        (models,) = [v for v in pod["volumes"] if v["name"] == "models"]
        assert models["persistentVolumeClaim"]["readOnly"] is True
    pods = [cluster["headGroupSpec"]["template"]["spec"], cluster["workerGroupSpecs"][0]["template"]["spec"]]
    for pod in pods:  # the proxy buffers whole messages: payload limit + 1 MiB on every Ray process
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        limits = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]["limits"]
        assert int(env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]) == limits["max_activation_bytes"] + (1 << 20)
    (worker,) = cluster["workerGroupSpecs"]
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    (job,) = [d for d in docs if d["kind"] == "Job"]
    assert "patchscope prepare" in job["spec"]["template"]["spec"]["containers"][0]["args"][0]


def test_the_tls_edge_proxies_http2_to_the_serve_service_and_requires_client_certificates():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in manifests()["chart, TLS edge with mTLS"]}
    envoy = yaml.safe_load(docs[("ConfigMap", "patchscope-envoy")]["data"]["envoy.yaml"])
    (listener,) = envoy["static_resources"]["listeners"]
    tls = listener["filter_chains"][0]["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True and tls["common_tls_context"]["alpn_protocols"] == ["h2"]
    (cluster,) = envoy["static_resources"]["clusters"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ]
    assert endpoint == {"address": "patchscope-serve-svc", "port_value": 9000}
    service = docs[("Service", "patchscope-tls")]
    assert service["spec"]["ports"][0]["port"] == 9443
    assert not any(kind == "Deployment" for kind, _ in {(d["kind"], 0) for d in render()}), "off by default"


def test_chart_hooks_create_the_volume_before_the_prepare_job():
    docs = {d["kind"]: d for d in render()}
    pvc, job = (
        docs["PersistentVolumeClaim"]["metadata"]["annotations"],
        docs["Job"]["metadata"]["annotations"],
    )
    assert "pre-install" in pvc["helm.sh/hook"] and pvc["helm.sh/resource-policy"] == "keep"
    assert "pre-install" in job["helm.sh/hook"] and int(pvc["helm.sh/hook-weight"]) < int(
        job["helm.sh/hook-weight"]
    )


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles_pass_hadolint(dockerfile):
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    result = subprocess.run(
        [
            hadolint,
            "--config",
            str(DEPLOY / "docker" / ".hadolint.yaml"),
            str(DEPLOY / "docker" / dockerfile),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
