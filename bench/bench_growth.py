"""How a sweep's time grows with the number of sites, the source prompt's length and the new tokens.

smollm2-135m → itself, identity preset, fp32 on this CPU, one process; each point is the median of
--repeats `explain` calls. Defaults: 30 sites (every layer, last position), a 12-token prompt, 10 new
tokens; each curve varies one of them. Prints the points and writes one plot per curve to --out.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from patchscope.engine import GenerationConfig, load_model
from patchscope.engine.runtime import TargetRuntime
from patchscope.engine.template import tokenize_prompt
from patchscope.explain import ExplainRequest, LocalBackend, TargetSpec, explain

BASE = "The river runs past the old mill where the baker sells bread every morning"


def prompt_of(model, tokens: int) -> str:
    words = (BASE + " ") * (tokens // 8 + 2)
    text = ""
    for word in words.split():
        if len(tokenize_prompt(model.tokenizer, (text + " " + word).strip())) > tokens:
            break
        text = (text + " " + word).strip()
    return text


def timed(runtime: TargetRuntime, prompt: str, layers, new: int, repeats: int, positions=(-1,)) -> float:
    """Median seconds of a same-model sweep of `prompt` (the prefix cache cleared before each)."""
    model = runtime.model
    target = TargetSpec(model.id, generation=GenerationConfig(max_new_tokens=new))
    request = ExplainRequest(model.id, prompt, tuple(layers), target, tuple(positions))
    times = []
    for _ in range(repeats):
        runtime.prefix_cache.clear()
        started = time.perf_counter()
        explain(LocalBackend.of(model, runtime), request)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    model = load_model("smollm2-135m")
    runtime = TargetRuntime.build(model)
    layers = list(range(model.facts.num_layers))
    curves: dict[str, list[tuple[int, float]]] = {"sites": [], "prompt tokens": [], "new tokens": []}

    long_prompt = prompt_of(model, 40)
    for num_layers, num_positions in ((1, 1), (8, 1), (16, 4), (16, 32)):  # 1, 8, 64, 512 sites
        positions = range(1, num_positions + 1)
        took = timed(runtime, long_prompt, layers[:num_layers], 10, args.repeats, positions)
        curves["sites"].append((num_layers * num_positions, took))
    for tokens in (8, 64, 256, 512):
        curves["prompt tokens"].append(
            (tokens, timed(runtime, prompt_of(model, tokens), [6], 10, args.repeats))
        )
    for new in (1, 8, 32, 64):
        curves["new tokens"].append((new, timed(runtime, BASE, layers, new, args.repeats)))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, points in curves.items():
        print(f"{name:>14}: " + "  ".join(f"{x}→{t:.2f}s" for x, t in points))
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        xs, ts = zip(*points, strict=True)
        ax.plot(xs, ts, marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(name)
        ax.set_ylabel("seconds per explain")
        ax.set_title(f"smollm2-135m sweep time vs {name}", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"growth_{name.replace(' ', '_')}.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
