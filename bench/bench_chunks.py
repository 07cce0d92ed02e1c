"""What chunking the source pass and the logit lens costs, and how long an abandoned call holds the thread.

`python bench/bench_chunks.py` (real models from the conversion cache, in this process, no Ray):
- the source pass of a long prompt in one forward against chunks of `--chunk-tokens` over a KV cache,
  paired and alternated: the ratio chunked / one-pass with a 95 % interval over `--repeats` pairs;
- a huge source pass whose caller leaves after its first chunk, then an ordinary call on the same worker
  thread: how long the ordinary call takes from its submission, one-pass against chunked (the one-pass
  call cannot be stopped; the chunked one frees the thread after the chunk in flight);
- the logit lens of `--sites` states, per chunk of `LENS_CHUNK_SITES`, on each model.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from paired import interval
from patchscope.engine.hooks import drain, iter_extract
from patchscope.engine.lens import LENS_CHUNK_SITES, iter_logit_lens
from patchscope.engine.models import load_model
from patchscope.serve.chunked import run_chunked

ROOT = Path(__file__).resolve().parents[1]
SENTENCE = "The river runs past the old mill, and the miller counts his sacks of grain by lamplight. "


def long_prompt(model, tokens: int) -> str:
    text = ""
    while len(model.tokenizer(text).input_ids) < tokens:
        text += SENTENCE
    ids = model.tokenizer(text, add_special_tokens=False).input_ids[: tokens - 1]
    return model.tokenizer.decode(ids)


def pass_cost(model, prompt: str, chunk_tokens: int, repeats: int) -> None:
    layers = [model.facts.num_layers - 1]
    timings: dict[str, list[float]] = {"one": [], "chunked": []}
    for r in range(repeats + 1):
        order = ["one", "chunked"] if r % 2 else ["chunked", "one"]
        for kind in order:
            started = time.perf_counter()
            drain(iter_extract(model, prompt, layers, chunk_tokens=None if kind == "one" else chunk_tokens))
            if r:  # the first pair warms up
                timings[kind].append(time.perf_counter() - started)
    ratios = [c / o for c, o in zip(timings["chunked"], timings["one"], strict=True)]
    print(
        f"  source pass: one forward {statistics.median(timings['one']) * 1000:.0f} ms, chunks of "
        f"{chunk_tokens} {statistics.median(timings['chunked']) * 1000:.0f} ms (medians); "
        f"chunked / one-pass {interval(ratios)}"
    )


async def abandoned(model, prompt: str, chunk_tokens: int | None) -> tuple[float, float]:
    """(seconds the ordinary call took from submission, seconds alone) after a huge call left."""
    executor = ThreadPoolExecutor(max_workers=1)
    layers = [model.facts.num_layers - 1]
    started = time.perf_counter()
    await run_chunked(executor, iter_extract(model, "a short ordinary prompt", layers))
    alone = time.perf_counter() - started
    huge = asyncio.ensure_future(
        run_chunked(executor, iter_extract(model, prompt, layers, chunk_tokens=chunk_tokens))
    )
    await asyncio.sleep(0.05)  # the huge call is on the thread
    huge.cancel()
    started = time.perf_counter()
    await run_chunked(executor, iter_extract(model, "a short ordinary prompt", layers))
    waited = time.perf_counter() - started
    executor.shutdown(wait=True)
    return waited, alone


def lens_cost(model, sites: int, repeats: int) -> None:
    torch.manual_seed(0)
    vectors = [torch.randn(model.facts.hidden_size) for _ in range(sites)]
    per_chunk = []
    for _ in range(repeats):
        work = iter_logit_lens(model, vectors, 10)
        while True:
            started = time.perf_counter()
            try:
                next(work)
            except StopIteration:
                per_chunk.append(time.perf_counter() - started)
                break
            per_chunk.append(time.perf_counter() - started)
    per_chunk.sort()
    print(
        f"  logit lens, {sites} states top-10: {len(per_chunk)} chunks of {LENS_CHUNK_SITES}, median "
        f"{statistics.median(per_chunk) * 1000:.0f} ms, max {per_chunk[-1] * 1000:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--tokens", type=int, default=2048, help="the long prompt's tokens (the limit)")
    parser.add_argument("--chunk-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--sites", type=int, default=64)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    print(
        f"bench_chunks at {commit.stdout.strip()} on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    )
    for model_id in args.models.split(","):
        model = load_model(model_id)
        prompt = long_prompt(model, args.tokens)
        print(f"{model_id}: a {len(model.tokenizer(prompt).input_ids)}-token prompt")
        pass_cost(model, prompt, args.chunk_tokens, args.repeats)
        for chunk_tokens in (None, args.chunk_tokens):
            waits = [asyncio.run(abandoned(model, prompt, chunk_tokens)) for _ in range(3)]
            what = "one forward" if chunk_tokens is None else f"chunks of {chunk_tokens}"
            print(
                f"  after an abandoned huge pass ({what}): the next call took "
                f"{' / '.join(f'{w * 1000:.0f}' for w, _ in waits)} ms "
                f"(alone {' / '.join(f'{a * 1000:.0f}' for _, a in waits)} ms)"
            )
        lens_cost(model, args.sites, args.repeats)


if __name__ == "__main__":
    main()
