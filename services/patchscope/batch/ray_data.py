"""The batch job on a Ray cluster: Ray Data maps its parts over a fixed pool of actors.

Each actor loads the source, target and mappings once (`Worker.load`) and runs `Worker.run_part` on one
part at a time, writing the part itself through `PartStore`: the same code as the in-process run, so the
parts and the table are the same. Inputs and `--out` must be on storage every node sees (the RayJob
mounts one volume). A part is written under a temporary name and renamed, so an actor killed mid-part
leaves nothing half-written: Ray Data retries the part on a restarted actor, and a rerun of a failed job
with the same `--out` skips every part already on disk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from patchscope.batch.job import Report, Summary, finish, prepare
from patchscope.batch.options import BatchOptions
from patchscope.batch.parts import PartStore

# Every Ray process: hidden states cross processes as CPU tensors, and no hub is ever reached.
ENV = {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1", "HF_HUB_OFFLINE": "1"}


class PartActor:
    """A Ray Data actor: the job's models, loaded once, and the parts it is handed."""

    def __init__(self, options: dict, out: str, torch_threads: int = 0) -> None:
        import torch

        from patchscope.batch.worker import Worker

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.worker = Worker.load(BatchOptions.model_validate(options))
        self.store = PartStore(out)

    def __call__(self, batch: dict) -> dict:
        rows, refused = [], []
        for index, files in zip(batch["part"], batch["files"], strict=True):
            files = json.loads(files)
            part, refusals = self.worker.run_part(files)
            self.store.write(int(index), part, files, refusals)
            rows.append(part.num_rows)
            refused.append(len(refusals))
        return {"part": list(batch["part"]), "rows": rows, "refused": refused}


def run_ray(
    options: BatchOptions,
    inputs: Sequence[str],
    out: str,
    *,
    address: str,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    resume: bool = False,
    report: Report = lambda done, total, rows: None,
    init_options: dict | None = None,
) -> Summary:
    """Run the parts not yet on disk on `actors` Ray Data actors at `address`, then merge here."""
    import time

    import ray

    prepared = prepare(options, inputs, out, resume=resume)
    total = len(prepared.parts)
    done, rows_run = total - len(prepared.pending), 0
    started = time.perf_counter()
    if prepared.pending:
        if not ray.is_initialized():
            runtime_env = {
                "env_vars": ENV | {k: os.environ[k] for k in ("PATCHSCOPE_HOME",) if k in os.environ}
            }
            ray.init(address=address, runtime_env=runtime_env, **(init_options or {}))
        items = [{"part": i, "files": json.dumps(prepared.parts[i])} for i in prepared.pending]
        dataset = ray.data.from_items(items, override_num_blocks=len(items))
        results = dataset.map_batches(
            PartActor,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={
                "options": options.model_dump(mode="json"),
                "out": str(prepared.store.out.resolve()),
                "torch_threads": max(1, int(cpus_per_actor)),
            },
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor,
        )
        started = time.perf_counter()
        report(done, total, rows_run)
        for row in results.iter_rows():
            done += 1
            rows_run += int(row["rows"])
            report(done, total, rows_run)
    return finish(prepared, len(prepared.pending), rows_run, time.perf_counter() - started)
