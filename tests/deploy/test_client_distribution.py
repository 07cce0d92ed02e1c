"""The client distribution carries the generated code in its sdist and in a wheel built from that sdist.

Built offline from a copy of `clients/python` and `proto/` whose generated modules were deleted, so the
build hooks have to write them: the sdist through setuptools' PEP 517 hook, the wheel by pip from the
unpacked sdist (no `proto/` beside it), both without build isolation.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = {"patchscope_pb2.py", "patchscope_pb2_grpc.py", "patchscope_pb2.pyi"}


@pytest.fixture(scope="module")
def sdist_and_wheel(tmp_path_factory) -> tuple[Path, Path]:
    pytest.importorskip("grpc_tools")
    work = tmp_path_factory.mktemp("dist")
    shutil.copytree(ROOT / "proto", work / "proto")
    client = work / "clients" / "python"
    shutil.copytree(
        ROOT / "clients" / "python",
        client,
        ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"),
    )
    for name in GENERATED:
        (client / "patchscope_client" / "_proto" / name).unlink(missing_ok=True)
    build = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    out = subprocess.run(
        [sys.executable, "-c", build, str(work / "sdist")],
        cwd=client,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    sdist = work / "sdist" / out.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as archive:
        archive.extractall(work / "unpacked", filter="data")
    (unpacked,) = (work / "unpacked").iterdir()
    wheels = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(work / "wheel"),
            str(unpacked),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert wheels.returncode == 0, wheels.stderr
    (wheel,) = (work / "wheel").glob("patchscope_client-*.whl")
    return sdist, wheel


def test_the_sdist_carries_the_generated_code(sdist_and_wheel):
    sdist, _ = sdist_and_wheel
    with tarfile.open(sdist) as archive:
        names = {Path(n).name for n in archive.getnames() if "/_proto/" in n}
    assert GENERATED <= names, names


def test_a_wheel_built_from_the_sdist_carries_the_generated_code(sdist_and_wheel):
    _, wheel = sdist_and_wheel
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert {f"patchscope_client/_proto/{n}" for n in GENERATED} <= names
    requires = [
        line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")
    ]
    assert not any(r.startswith("safetensors") for r in requires), "tensors.py reads safetensors itself"
    assert "protobuf>=7.35.1" in requires and "grpcio>=1.85.1" in requires


def test_the_protobuf_floor_is_the_runtime_the_generated_code_checks_for():
    generated = (
        ROOT / "clients" / "python" / "patchscope_client" / "_proto" / "patchscope_pb2.py"
    ).read_text()
    start = generated.index("ValidateProtobufRuntimeVersion(")
    numbers = [p.strip().rstrip(",") for p in generated[start:].splitlines()[2:5]]
    floor = ".".join(numbers)
    deps = tomllib.loads((ROOT / "clients" / "python" / "pyproject.toml").read_text())["project"][
        "dependencies"
    ]
    assert f"protobuf>={floor}" in deps, (floor, deps)


def test_patchscope_client_version():
    from patchscope_client import __version__

    out = subprocess.run(
        [sys.executable, "-m", "patchscope_client.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.strip() == f"patchscope-client {__version__}", out


def test_every_cli_option_has_help_and_connection_options_go_either_side():
    from patchscope_client.cli import build_parser

    parser = build_parser()
    parsers = [parser, *next(a for a in parser._actions if a.dest == "command").choices.values()]
    for p in parsers:
        for action in p._actions:
            assert action.help, f"{p.prog}: {action.option_strings or action.dest} has no help"
    before = parser.parse_args(["--address", "h:1", "models"])
    after = parser.parse_args(["models", "--address", "h:1", "--tls-cert", "c.pem", "--tls-key", "k.pem"])
    assert before.address == after.address == "h:1" and after.tls_cert == "c.pem"
    assert parser.parse_args(["models"]).address == "127.0.0.1:9000"


def test_errors_fall_into_status_families_with_request_ids_and_exit_codes():
    import grpc

    from patchscope_client import errors
    from patchscope_client.cli import exit_code

    class Fake(grpc.RpcError):
        def __init__(self, code, details, trailers=()):
            self._c, self._d, self._t = code, details, trailers

        def code(self):
            return self._c

        def details(self):
            return self._d

        def trailing_metadata(self):
            return self._t

    quota = errors.from_rpc_error(
        "Explain",
        Fake(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota: retry in 12 s", (("patchscope-request-id", "r1"),)),
    )
    assert (
        isinstance(quota, errors.ResourceExhausted) and quota.retry_after == 12 and quota.request_id == "r1"
    )
    assert "request r1" in str(quota)
    pushed = errors.from_rpc_error(
        "Explain", Fake(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", (("grpc-retry-pushback-ms", "250"),))
    )
    assert pushed.retry_after == 0.25
    cases = {
        grpc.StatusCode.INVALID_ARGUMENT: (errors.InvalidArgument, 3),
        grpc.StatusCode.NOT_FOUND: (errors.NotFound, 3),
        grpc.StatusCode.UNAUTHENTICATED: (errors.Unauthenticated, 3),
        grpc.StatusCode.PERMISSION_DENIED: (errors.PermissionDenied, 3),
        grpc.StatusCode.UNAVAILABLE: (errors.Unavailable, 4),
        grpc.StatusCode.DEADLINE_EXCEEDED: (errors.DeadlineExceeded, 4),
        grpc.StatusCode.INTERNAL: (errors.ServerError, 5),
    }
    for code, (family, exit_status) in cases.items():
        error = errors.from_rpc_error("Explain", Fake(code, "x"))
        assert (
            type(error) is family and isinstance(error, errors.CallError) and exit_code(error) == exit_status
        )
    assert exit_code(ValueError("bad flag")) == 2


def test_the_retry_policy_is_grpc_s_own_and_spares_explain():
    import json

    from patchscope_client.client import retry_policy

    (config,) = json.loads(retry_policy(retries=6, backoff_s=0.2))["methodConfig"]
    assert {n["method"] for n in config["name"]} == {"ListModels", "ListMappings", "ExtractHiddenStates"}
    assert config["retryPolicy"]["maxAttempts"] == 5 and config["retryPolicy"]["retryableStatusCodes"] == [
        "UNAVAILABLE"
    ]
    source = (ROOT / "clients" / "python" / "patchscope_client" / "client.py").read_text()
    assert "time.sleep" not in source
