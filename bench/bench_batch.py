"""`patchscope batch` against the service, on the default pair (smollm2-135m -> gemma3-270m).

N captured prompts × 2 source layers at the last position, one patchscope-client file per prompt (what
`patchscope-client extract --out` writes). Rows per second of:
  (a) the batch job in this process (`run_local`: rows of many files share one patched generation),
  (b) the same files through a real local service, one `ExplainActivations` per file, from 1 client,
  (c) the same from 4 concurrent clients (the service batches across their requests).
The issue's target is (a) >= 2x (b). Both sides use 2 torch threads and the pipeline's defaults (controls
on). Model loading is outside every timing; each side is warmed up first. Prints ratios, never asserts.
Cross-model mappings come from the default registry (`make run` fits them).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from patchscope.batch import BatchOptions, Worker, run_local
from patchscope.engine.hooks import extract
from patchscope.serve.local import free_port, read_config, start
from patchscope_client import Finished, PatchscopeClient, tensors

ROOT = Path(__file__).resolve().parents[1]
SOURCE, TARGET = "smollm2-135m", "gemma3-270m"
LAYERS, TARGET_LAYERS = (2, 6), {2: 1, 6: 4}
WORDS = (
    "Barack Obama|a glass of milk|the city of Paris|an old wooden boat|the Amazon river|a red apple|"
    "Albert Einstein|the piano concerto|a cold winter morning|the Eiffel Tower|a cup of coffee|"
    "the Roman Empire|a small black cat|the Pacific Ocean|a broken window|the Beatles"
).split("|")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def prompts(n: int) -> list[str]:
    return [f"{WORDS[k % len(WORDS)]} ({k // len(WORDS)})" if k >= len(WORDS) else WORDS[k] for k in range(n)]


def write_files(source, folder: Path, n: int) -> list[Path]:
    """One file per prompt, exactly as `patchscope-client extract --out` writes it."""
    files = []
    for k, prompt in enumerate(prompts(n)):
        hidden = extract(source, prompt, list(LAYERS), [-1])
        states = hidden.states.reshape(-1, hidden.states.shape[-1]).numpy()  # layer-major rows
        meta = {
            "model": source.id,
            "fingerprint": source.fingerprint,
            "layers": json.dumps(list(hidden.layers)),
            "positions": json.dumps([hidden.positions[0]] * len(LAYERS)),
            "tokens": json.dumps([hidden.tokens[hidden.positions[0]]] * len(LAYERS)),
        }
        path = folder / f"prompt-{k:04d}.safetensors"
        path.write_bytes(tensors.encode(states, metadata=meta))
        files.append(path)
    return files


def service_config() -> dict:
    cfg = copy.deepcopy(read_config(ROOT / "deploy" / "config" / "local.yaml"))
    cfg["applications"][0]["args"]["torch_threads"] = 2
    return cfg


def explain_file(client: PatchscopeClient, path: Path, max_new_tokens: int) -> int:
    data = path.read_bytes()
    meta = tensors.metadata(data)
    events = client.explain_activations(
        tensors.decode(data),
        source=SOURCE,
        layers=json.loads(meta["layers"]),
        positions=json.loads(meta["positions"]),
        tokens=json.loads(meta["tokens"]),
        fingerprint=meta["fingerprint"],
        target=TARGET,
        target_layers=[TARGET_LAYERS[layer] for layer in json.loads(meta["layers"])],
        max_new_tokens=max_new_tokens,
        timeout=600,
    )
    return sum(1 for e in events if isinstance(e, Finished))


def through_service(address: str, files: list[Path], clients: int, max_new_tokens: int) -> float:
    """Rows per second with `clients` threads sharing the files, one ExplainActivations per file."""
    errors: list[BaseException] = []
    done = [0] * clients

    def client(k: int) -> None:
        try:
            with PatchscopeClient(address, timeout=600) as c:
                for path in files[k::clients]:
                    done[k] += explain_file(c, path, max_new_tokens)
        except BaseException as e:  # reported below, never hidden
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    expected = len(files) * len(LAYERS)
    if sum(done) != expected:
        raise RuntimeError(f"the service finished {sum(done)} of {expected} rows")
    return sum(done) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=200, help="captured prompts (files), 2 rows each")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    print(
        f"# batch benchmark · commit {commit.stdout.strip()} · {cpu_name()} · {os.cpu_count()} CPUs · "
        f"2 torch threads each side · n = {args.prompts} prompts × {len(LAYERS)} layers = "
        f"{args.prompts * len(LAYERS)} rows · {args.max_new_tokens} new tokens"
    )
    options = BatchOptions(
        source=SOURCE, target=TARGET, target_layers=TARGET_LAYERS, max_new_tokens=args.max_new_tokens
    )
    worker = Worker.load(options)
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as scratch:
        folder = Path(scratch) / "in"
        folder.mkdir()
        files = write_files(worker.source, folder, args.prompts)
        run_local(options, [str(files[0])], str(Path(scratch) / "warm.parquet"), worker=worker)  # warm-up
        summary = run_local(options, [str(folder)], str(Path(scratch) / "out.parquet"), worker=worker)
        if summary.refusals or summary.rows != len(files) * len(LAYERS):
            raise RuntimeError(f"batch: {summary.rows} rows, refusals {summary.refusals}")
        batch_rate = summary.rows_per_s
        del worker
        service = start(service_config(), grpc_port=free_port(), http_port=free_port(), timeout_s=900)
        try:
            through_service(service.address, files[:2], 1, args.max_new_tokens)  # warm-up
            one = through_service(service.address, files, 1, args.max_new_tokens)
            four = through_service(service.address, files, 4, args.max_new_tokens)
        finally:
            service.stop()
    print(f"(a) patchscope batch, in process      {batch_rate:8.2f} rows/s")
    print(f"(b) service, 1 client, 1 call a file  {one:8.2f} rows/s")
    print(f"(c) service, 4 clients                {four:8.2f} rows/s")
    print(f"batch / service 1 client   {batch_rate / one:5.2f}x   (target >= 2x)")
    print(f"batch / service 4 clients  {batch_rate / four:5.2f}x")
    print(f"service 4 / 1 clients      {four / one:5.2f}x")


if __name__ == "__main__":
    main()
