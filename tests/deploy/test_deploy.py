"""Deployment artefacts validated offline: KubeRay's CRD schema, Kubernetes' own schemas, Ray's Serve schema,
real Helm rendering and `helm lint --strict` with the values schema (Helm's Go engine, helm-python-sdk),
the NetworkPolicy and PodMonitor, the preparation's order, and the Dockerfiles (hadolint, layer order)."""

from __future__ import annotations

import copy
import json
import re
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


def example(name: str) -> dict:
    return yaml.safe_load((DEPLOY / "helm" / "examples" / f"{name}.yaml").read_text())


EVERYTHING_ON = {
    "networkPolicy": {"enabled": True, "metrics": [{"namespaceSelector": {"matchLabels": {"team": "obs"}}}]},
    "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "gcsFaultTolerance": {
        "enabled": True,
        "redisAddress": "redis:6379",
        "redisPasswordSecret": {"name": "redis", "key": "password"},
    },
    "tls": {"enabled": True},
    "quotas": {"requests_per_minute": 600, "concurrent_streams": 8},
    "image": {"repository": "r/p", "tag": "t", "pullSecrets": [{"name": "regcred"}]},
}

VALUES = {
    "chart, default values": None,
    "chart, gpu-pair example": example("gpu-pair"),
    "chart, single-node-rwo example": example("single-node-rwo"),
    "chart, emptydir example": example("emptydir"),
    "chart, auth off": {"auth": {"required": False}},
    "chart, TLS edge with mTLS": {"tls": {"enabled": True, "clientCaKey": "ca.crt"}},
    "chart, every option on": EVERYTHING_ON,
}


def manifests() -> dict[str, list[dict]]:
    return {
        "kuberay/rayservice.yaml": [
            d for d in yaml.safe_load_all((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
        ],
        **{name: render(values) for name, values in VALUES.items()},
    }


def pods(service: dict) -> list[dict]:
    cluster = service["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [w["template"] for w in cluster["workerGroupSpecs"]]


def check_rayservice(doc: dict, schema: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return check_json(doc, schema, tmp_path)


def check_json(doc: dict, schema: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / f"{doc['kind'].lower()}.json"
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
    assert "RayService" in kinds, kinds
    if "emptydir" not in source:
        assert "PersistentVolumeClaim" in kinds and "Job" in kinds, kinds
    for doc in docs:
        if doc["kind"] == "RayService":
            result = check_rayservice(doc, rayservice_schema, tmp_path)
            assert result.returncode == 0, result.stdout + result.stderr
        elif doc["kind"] == "PodMonitor":  # a Prometheus Operator CRD: its schema (the fields used) is here
            result = check_json(doc, Path(__file__).parent / "podmonitor.schema.json", tmp_path)
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
    share = 0.5 if "single-node-rwo" in source else 1
    assert gpus["SourceModel"] == share and gpus["TargetModel"] == share and gpus["Explainer"] == 0
    # Replacements start before the replicas they replace stop: an args change keeps one replica serving.
    assert all(d.max_surge_percent == 100 for d in app.deployments)
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
        if "emptydir" in source:
            assert "emptyDir" in models
        else:
            assert models["persistentVolumeClaim"]["readOnly"] is True
        assert all(m["readOnly"] for m in pod["containers"][0]["volumeMounts"] if m["name"] == "models")
    specs = [cluster["headGroupSpec"]["template"]["spec"], cluster["workerGroupSpecs"][0]["template"]["spec"]]
    for pod in specs:  # the proxy buffers whole messages: payload limit + 1 MiB on every Ray process
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        limits = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]["limits"]
        assert int(env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]) == limits["max_activation_bytes"] + (1 << 20)
    (worker,) = cluster["workerGroupSpecs"]
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    if "emptydir" in source:
        assert not [d for d in docs if d["kind"] in {"Job", "PersistentVolumeClaim"}]
        for pod in pods(service):
            (init,) = pod["spec"]["initContainers"]
            assert "patchscope prepare" in init["args"][0]
    else:
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


MARKER = re.compile(r"/models/\.prepared/([\w-]+)")


@pytest.mark.parametrize("source", [s for s in manifests() if "emptydir" not in s])
def test_ray_pods_wait_for_the_marker_the_prepare_job_writes_last(source):
    docs = manifests()[source]
    (job,) = [d for d in docs if d["kind"] == "Job"]
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert script.strip().splitlines()[-1].startswith("mkdir -p /models/.prepared && touch ")
    (written,) = set(MARKER.findall(script))
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    for pod in pods(service):
        (init,) = pod["spec"]["initContainers"]
        assert "until [ -f /models/.prepared/" in init["args"][0] and set(
            MARKER.findall(init["args"][0])
        ) == {written}
        assert all(m.get("readOnly") for m in init["volumeMounts"])


def test_the_fit_reads_the_corpus_packaged_in_the_image_and_no_configmap_nears_the_limit():
    for source, docs in manifests().items():
        for doc in docs:
            if doc["kind"] == "ConfigMap":
                size = sum(len(v.encode()) for v in doc.get("data", {}).values())
                assert size < 1 << 20, f"{source}: ConfigMap {doc['metadata']['name']} is {size} bytes"
        for job in [d for d in docs if d["kind"] == "Job"]:
            script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
            assert "data_root()" in script and '--corpus "$CORPUS"' in script
            assert not [v for v in job["spec"]["template"]["spec"]["volumes"] if "configMap" in v]


def test_nothing_is_a_hook_and_the_volume_outlives_the_release():
    for source, values in VALUES.items():
        for doc in render(values):
            assert "helm.sh/hook" not in doc["metadata"].get("annotations", {}), (source, doc["kind"])
    (pvc,) = [d for d in render() if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert not [
        d for d in render({"storage": {"existingClaim": "mine"}}) if d["kind"] == "PersistentVolumeClaim"
    ]
    (service,) = [d for d in render({"storage": {"existingClaim": "mine"}}) if d["kind"] == "RayService"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for p in pods(service)
        for v in p["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"mine"}


def test_a_changed_preparation_is_a_new_job_and_an_unchanged_one_keeps_its_name():
    def job_name(values):
        (job,) = [d for d in render(values) if d["kind"] == "Job"]
        return job["metadata"]["name"]

    assert job_name(None) == job_name({"explainer": {"replicas": 3}})
    assert job_name(None) != job_name({"targets": ["gemma3-270m"]})


@pytest.mark.parametrize("values", [None, *[v for v in VALUES.values() if v]], ids=lambda v: str(v)[:40])
def test_helm_lint_strict_passes_with_the_values_schema(values):
    import helm_python as helm

    assert (DEPLOY / "helm" / "patchscope" / "values.schema.json").exists()
    report = helm.lint(
        str(DEPLOY / "helm" / "patchscope"), values, strict=True, kube_version=f"v{K8S_VERSION}"
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


@pytest.mark.parametrize(
    "values",
    [
        {"sorces": ["smollm2-135m"]},
        {"storage": {"mode": "nfs", "size": "1Gi"}},
        {"gcsFaultTolerance": {"enabled": True}},
    ],
)
def test_the_values_schema_rejects_typos_and_missing_settings(values):
    import helm_python as helm

    report = helm.lint(str(DEPLOY / "helm" / "patchscope"), values, strict=True)
    assert report["errors"], values


def test_the_network_policy_admits_clients_ray_peers_the_operator_and_scrapes():
    docs = render(EVERYTHING_ON)
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    selector = policy["spec"]["podSelector"]
    for pod in pods(service):
        labels = pod["metadata"]["labels"]
        assert selector["matchLabels"].items() <= labels.items()
        assert labels["app.kubernetes.io/component"] in selector["matchExpressions"][0]["values"]
    rules = policy["spec"]["ingress"]
    ports = [{p["port"] for p in r.get("ports", [])} for r in rules]
    assert ports[0] == set() and rules[0]["from"][0]["podSelector"]["matchLabels"] == selector["matchLabels"]
    assert {9000, 8000} == ports[1] and any(
        p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "tls-edge"
        for p in rules[1]["from"]
    )
    assert {8265, 52365} <= ports[2] and ports[3] == {8080}
    assert not [d for d in render() if d["kind"] in {"NetworkPolicy", "PodMonitor"}], "off by default"


def test_the_pod_monitor_selects_the_ray_pods_and_names_their_metrics_port():
    docs = render(EVERYTHING_ON)
    (monitor,) = [d for d in docs if d["kind"] == "PodMonitor"]
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for pod in pods(service):
        assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        names = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
        assert names[endpoint["port"]] == 8080


def test_every_option_reaches_the_pods_and_the_service():
    (service,) = [d for d in render(EVERYTHING_ON) if d["kind"] == "RayService"]
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["gcsFaultToleranceOptions"]["redisAddress"] == "redis:6379"
    assert (
        "gcsFaultToleranceOptions"
        not in next(d for d in render() if d["kind"] == "RayService")["spec"]["rayClusterConfig"]
    )
    for pod in pods(service):
        spec = pod["spec"]
        assert (
            spec["imagePullSecrets"] == [{"name": "regcred"}] and spec["serviceAccountName"] == "patchscope"
        )
        assert spec["securityContext"]["fsGroup"] == 100
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["quotas"] == {"requests_per_minute": 600, "concurrent_streams": 8}
    rwo = [d for d in render(example("single-node-rwo")) if d["kind"] in {"RayService", "Job"}]
    for doc in rwo:
        templates = pods(doc) if doc["kind"] == "RayService" else [doc["spec"]["template"]]
        for pod in templates:
            (term,) = pod["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "ray-head"


def test_source_model_scales_like_target_model():
    (service,) = [
        d
        for d in render({"source": {"minReplicas": 1, "maxReplicas": 3, "gpusPerReplica": 0.5}})
        if d["kind"] == "RayService"
    ]
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    (source,) = [d for d in app["deployments"] if d["name"] == "SourceModel"]
    assert (
        source["autoscaling_config"]["max_replicas"] == 3 and source["ray_actor_options"]["num_gpus"] == 0.5
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


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles_install_dependencies_before_the_source_and_own_models(dockerfile):
    lines = [line.strip() for line in (DEPLOY / "docker" / dockerfile).read_text().splitlines()]
    deps = next(i for i, line in enumerate(lines) if "requirements.py >" in line)
    copies = [line for line in lines[:deps] if line.startswith("COPY")]
    assert copies and all(
        any(name in line for name in ("constraints.txt", "pyproject.toml", "requirements.py"))
        for line in copies
    ), copies
    later = [line for line in lines[deps:] if line.startswith("COPY")]
    assert any("services" in line for line in later) and any("README.md" in line for line in later)
    assert "RUN mkdir -p /models && chown ray:users /models" in lines
    users = [line for line in lines if line.startswith("USER")]
    assert users[-1] == "USER 1000:100"
    if dockerfile == "Dockerfile.cpu":
        assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in lines
        assert any('--index-url "$TORCH_INDEX" torch==' in line for line in lines)


def test_documented_docker_runs_publish_on_localhost_only():
    for path in [DEPLOY / "README.md", DEPLOY / "docker" / "Dockerfile.cpu"]:
        for run in re.findall(r"docker run[^\n]*", path.read_text()):
            published = re.findall(r"-p\s+(\S+)", run)
            assert published and all(p.startswith("127.0.0.1:") for p in published), (path.name, run)


API_SERVICER = "patchscope.serve.proxy.add_patchscope_servicer"
HEALTH_SERVICER = "patchscope.serve.health.add_health_servicer"
CONFIGS = sorted((DEPLOY / "config").glob("*.yaml"))


def serve_configs() -> dict[str, dict]:
    """Every Serve config that ships: deploy/config/*.yaml and each manifest's serveConfigV2."""
    configs = {f"config/{p.name}": yaml.safe_load(p.read_text()) for p in CONFIGS}
    for source, docs in manifests().items():
        (doc,) = [d for d in docs if d["kind"] == "RayService"]
        configs[source] = yaml.safe_load(doc["spec"]["serveConfigV2"])
    return configs


def test_every_serve_config_names_the_api_and_the_health_servicer():
    """The API's function (which registers patchscope_client._proto's add_PatchscopeServicer_to_server on
    Serve's proxy) and the health service beside it, as serve/local.py starts them."""
    import inspect

    from patchscope.serve import local, proxy

    assert local.HEALTH_SERVICER == HEALTH_SERVICER
    assert "add_PatchscopeServicer_to_server(servicer, server)" in inspect.getsource(
        proxy.add_patchscope_servicer
    )
    configs = serve_configs()
    assert {"config/local.yaml", "config/gpu.yaml", "config/container.yaml"} <= set(configs)
    for source, config in configs.items():
        functions = config["grpc_options"]["grpc_servicer_functions"]
        assert functions == [API_SERVICER, HEALTH_SERVICER], (source, functions)
        assert all(callable(import_attr(f)) for f in functions)


def cpu_image_command() -> str:
    lines = (DEPLOY / "docker" / "Dockerfile.cpu").read_text().splitlines()
    (cmd,) = [line for line in lines if line.startswith("CMD ")]
    shell, flag, script = json.loads(cmd.removeprefix("CMD "))
    assert (shell, flag) == ("sh", "-c")
    return script


def run_cpu_image_command(tmp_path: Path, tokens: str | None) -> tuple[subprocess.CompletedProcess, list]:
    """The image's CMD under sh, the tokens path moved to tmp_path and a `patchscope` that records calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    fake = bin_dir / "patchscope"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    fake.chmod(0o755)
    path = tmp_path / "tokens"
    if tokens is not None:
        path.write_text(tokens)
    script = cpu_image_command().replace("/etc/patchscope/tokens", str(path))
    result = subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, env={"PATH": f"{bin_dir}:/usr/bin:/bin"}
    )
    return result, calls.read_text().splitlines() if calls.exists() else []


def test_the_cpu_image_starts_only_with_a_tokens_file_and_then_requires_tokens(tmp_path):
    from patchscope.cli.serve import ALL_INTERFACES, plaintext_host
    from patchscope.serve.config import ServiceConfig

    for tokens in (None, ""):  # no file, or an empty one: exit before Ray starts, saying why
        result, calls = run_cpu_image_command(tmp_path, tokens)
        assert result.returncode == 2 and not calls, (result, calls)
        assert "no tokens file" in result.stderr and "mount one" in result.stderr
    result, calls = run_cpu_image_command(tmp_path, "a-long-enough-bearer-token-0123456789\n")
    assert result.returncode == 0, result.stderr
    assert calls == [
        "prepare smollm2-135m gemma3-270m",
        "serve --config deploy/config/container.yaml --host 0.0.0.0",
    ]
    # What it serves: local.yaml with auth on, reading the file the documented run mounts.
    config = yaml.safe_load((DEPLOY / "config" / "container.yaml").read_text())
    local = yaml.safe_load((DEPLOY / "config" / "local.yaml").read_text())
    args = config["applications"][0]["args"]
    settings = ServiceConfig.model_validate(args)
    assert settings.auth.required and settings.auth.tokens_file == "/etc/patchscope/tokens"
    assert {k: v for k, v in args.items() if k not in ("auth", "quotas")} == {
        k: v for k, v in local["applications"][0]["args"].items() if k != "auth"
    }
    assert config["applications"][0]["deployments"] == local["applications"][0]["deployments"]
    # Auth off would bind loopback (unreachable through a published port); auth on binds every interface.
    assert plaintext_host(None, tls=False, auth=False) == "127.0.0.1"
    assert plaintext_host("0.0.0.0", tls=False, auth=settings.auth.required) == ALL_INTERFACES
    for path in [DEPLOY / "README.md", DEPLOY / "docker" / "Dockerfile.cpu"]:
        runs = re.findall(r"docker run[^\n]*", path.read_text())
        assert runs and all(":/etc/patchscope/tokens:ro" in run for run in runs), (path.name, runs)
