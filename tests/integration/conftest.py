"""A real local Ray instance running the service from deploy/config/local.yaml, on tiny random models.

One service per test session (Ray takes ~15 s to start): tiny-llama is the source and a target, and
tiny-qwen2 a second target reached through an affine mapping fitted on real text into a temporary
registry. Deployments ask for 0.5 + 1 + 0.25 CPUs of the 2 Ray gets.
"""

from __future__ import annotations

import copy
from pathlib import Path

import grpc
import pytest

from patchscope.mapping.pipeline import fit_mappings
from patchscope.mapping.registry import MappingRegistry
from patchscope.serve.local import LocalService, free_port, read_config, start
from patchscope.wire import pb_grpc
from tests.conftest import data_dir

ROOT = Path(__file__).resolve().parents[2]
LOCAL_CONFIG = ROOT / "deploy" / "config" / "local.yaml"
PAIRS = [(1, 1), (2, 2), (3, 3)]
CPUS = {"SourceModel": 0.5, "TargetModel": 1.0, "Explainer": 0.25}


# Run last among the modules that share the session's service, in this order: test_faults.py kills its
# processes and leaves it redeployed with tokens and quotas, and test_logs.py then reads every module's logs.
LAST = ("test_faults.py", "test_logs.py")


def pytest_collection_modifyitems(session, config, items) -> None:
    here = Path(__file__).parent
    moved = [i for name in LAST for i in items if i.path.parent == here and i.path.name == name]
    if not moved:
        return
    rest = [i for i in items if i not in moved]
    ours = [k for k, i in enumerate(rest) if i.path.parent == here]
    at = ours[-1] + 1 if ours else len(rest)
    items[:] = rest[:at] + moved + rest[at:]


def service_config(args: dict, deployments: dict[str, float] = CPUS) -> dict:
    """local.yaml with other application args and explicit CPUs per deployment."""
    config = copy.deepcopy(read_config(LOCAL_CONFIG))
    app = config["applications"][0]
    app["args"].update(args)
    for deployment in app["deployments"]:
        deployment["ray_actor_options"]["num_cpus"] = deployments[deployment["name"]]
    return config


@pytest.fixture(scope="session")
def mapping_registry(tiny_models, tmp_path_factory) -> MappingRegistry:
    registry = MappingRegistry(tmp_path_factory.mktemp("mappings"))
    corpus = data_dir() / "wikitext-2" / "valid.txt"
    fit_mappings(
        tiny_models["llama"], tiny_models["qwen2"], PAIRS, "affine", corpus, registry, max_words=2000
    )
    return registry


@pytest.fixture(scope="session")
def tiny_service(tiny_dirs, mapping_registry) -> LocalService:
    args = {
        "sources": ["tiny-llama"],
        "targets": ["tiny-llama", "tiny-qwen2"],
        "models": {"tiny-llama": str(tiny_dirs["llama"]), "tiny-qwen2": str(tiny_dirs["qwen2"])},
        "registry": str(mapping_registry.root),
        # A wide batching window so that concurrent test clients land in one batch.
        "batching": {"enabled": True, "wait_ms": 300, "max_rows": 256},
        "limits": {"max_sites": 64, "max_new_tokens": 500, "max_activation_bytes": 1 << 20},
    }
    service = start(
        service_config(args), grpc_port=free_port(), http_port=free_port(), num_cpus=2, timeout_s=300
    )
    yield service
    service.stop()


@pytest.fixture(scope="session")
def channel(tiny_service) -> grpc.Channel:
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(tiny_service.address, options=options) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield ch


@pytest.fixture(scope="session")
def stub(channel) -> pb_grpc.PatchscopeStub:
    return pb_grpc.PatchscopeStub(channel)
