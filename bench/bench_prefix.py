"""Prefix cache: one sweep's patched generation with the template prefix's KV cache shared vs recomputed.

Templates of about 20, 100 and 500 tokens (real text from wikitext-2 before the placeholder), 10 rows
(layers 1..10 of smollm2-135m patched at the placeholder), 10 new tokens, fp32 on this CPU. Cached runs
start from an empty cache each time (the prefix is computed once per call, shared by the rows); a warm
cache across calls is the service's steady state and is reported too. Median of --repeats, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from patchscope.data import data_root
from patchscope.engine import GenerationConfig, load_model
from patchscope.engine.generation import PatchedRow, RowPatch, patched_generate
from patchscope.engine.hooks import extract
from patchscope.engine.runtime import TargetRuntime
from patchscope.engine.template import tokenize_template

DATA = data_root()


def template_of(model, text: str, tokens: int) -> str:
    words, prefix = text.split(), ""
    for word in words:
        candidate = (prefix + " " + word).strip()
        if len(tokenize_template(model.tokenizer, candidate + " {}", " x").ids) > tokens:
            break
        prefix = candidate
    return prefix + "\n{} ->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = load_model("smollm2-135m")
    runtime = TargetRuntime.build(model)
    text = (DATA / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:20000].replace("@-@", "-")
    hidden = extract(model, "Barack Obama", list(range(1, 11)), [-1])
    config = GenerationConfig(max_new_tokens=10)
    print(f"# prefix cache on smollm2-135m, 10 rows, 10 new tokens, {torch.get_num_threads()} threads")
    head = ["template", "no cache", "cache (cold)", "cache (warm)", "speed-up", "warm"]
    print(" ".join(f"{h:>13}" for h in head))
    for size in (20, 100, 500):
        template = template_of(model, text, size)
        n = len(tokenize_template(model.tokenizer, template, " x").ids)
        rows = [
            PatchedRow(template, " x", (RowPatch(layer=layer, vector=hidden.states[i, 0]),))
            for i, layer in enumerate(range(1, 11))
        ]

        def run(cache: bool, cold: bool, rows: list[PatchedRow] = rows) -> float:
            if cold:
                runtime.prefix_cache.clear()
            started = time.perf_counter()
            patched_generate(runtime, rows, config, use_prefix_cache=cache)
            return time.perf_counter() - started

        off, cold, warm = [], [], []
        for _ in range(args.repeats):
            off.append(run(False, True))
            cold.append(run(True, True))
            warm.append(run(True, False))
        o, c, w = (statistics.median(v) for v in (off, cold, warm))
        cells = [f"{n} tok", f"{o:.3f}s", f"{c:.3f}s", f"{w:.3f}s", f"{o / c:.2f}x", f"{o / w:.2f}x"]
        print(" ".join(f"{cell:>13}" for cell in cells))


if __name__ == "__main__":
    main()
