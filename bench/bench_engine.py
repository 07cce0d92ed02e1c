"""Engine benchmark: a sweep over every layer of one prompt, against the baselines people use today.

(a) the reference notebooks' per-site loop: one source pass and one hooked `generate` per layer,
(b) one batched `generate` with a patch hook per row,
(c) the same batch unpatched (the floor any patching method sits on),
(d) the engine (`explain`, controls off): one source pass, prefix cache, lean decode loop, default options
    (engine/options.py; `--gemm auto` packs the linears for oneDNN on the CPU kinds where that wins),
    with the lean forward (engine/models/lean.py) on a CPU; (d0) with the unpatched control row and its
    signals (the service's default); (d') the same without the cache; (d'') with transformers' forward;
    (d''') on the peers' stock load,
(e) nnsight's per-site loop: one source trace and one intervened `generate` per layer,
(f) nnsight batched: one source trace, then one `generate` with one invoke per layer.
(e) and (f) need nnsight (`pip install nnsight==0.8.1`, or the `bench` extra) and are skipped without it;
nnsight runs on its own copy of the module tree (sharing the weights), so its instrumented forwards never
slow the other cases. Their explanations are checked against the engine's before timing.
All run in this process on the same weights (the peers on a stock load, the engine on its own), in
rotated order, each case between two runs of the engine: a speed-up is the case's time over the mean of
its two neighbours, the median over --repeats rounds (this CPU's speed drifts within minutes; paired
ratios cancel that). "explanations differing" compares the engine with the peers' fp32 ATen outputs.
Prints ratios, never asserts them. `make bench-engine` runs it on smollm2-135m.
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from types import ModuleType

import torch

from patchscope.engine import GenerationConfig, load_model
from patchscope.engine.cpu import detect, onednn_isa
from patchscope.engine.models import LoadedModel
from patchscope.engine.models.packed import resolve_gemm
from patchscope.engine.options import DEFAULTS, GEMMS, EngineOptions
from patchscope.engine.presets import PRESETS
from patchscope.engine.runtime import TargetRuntime
from patchscope.engine.template import tokenize_prompt, tokenize_template
from patchscope.explain import ExplainRequest, Explanation, LocalBackend, TargetSpec, explain

PROMPT = "Barack Obama"


def sweep(runtime: TargetRuntime, new: int, prompt: str = PROMPT, controls: bool = False) -> Explanation:
    """The engine's same-model sweep of every layer of `prompt` on `runtime`, identity preset.

    Controls off unless asked: the peers run none, so the comparison is like for like; "(d0)" prices them.
    """
    model = runtime.model
    request = ExplainRequest(
        source=model.id,
        prompt=prompt,
        layers=tuple(range(model.layout.num_layers)),
        target=TargetSpec(model.id, generation=GenerationConfig(max_new_tokens=new), controls=controls),
    )
    return explain(LocalBackend.of(model, runtime), request)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def source_states(m: LoadedModel, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The notebooks' way to get states: `output_hidden_states` of the whole model."""
    return m.model(ids, output_hidden_states=True).hidden_states


def hooked_generate(
    m: LoadedModel, batch_ids: torch.Tensor, layers: list[int], vectors: torch.Tensor, at: int, new: int
):
    """One `generate` whose row r is patched at block layers[r] during the prompt pass only."""
    handles = []
    for row, layer in enumerate(layers):

        def hook(_mod, _args, out, row=row, vec=vectors[row]):
            hidden = out[0] if isinstance(out, tuple) else out
            if hidden.shape[1] > 1:  # prompt pass only; decoding sees the patch through the KV cache
                hidden[row, at] = vec
            return out

        handles.append(m.layout.blocks[layer].register_forward_hook(hook))
    try:
        return m.model.generate(
            batch_ids,
            attention_mask=torch.ones_like(batch_ids),
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=m.tokenizer.eos_token_id,
            min_new_tokens=new,
        )
    finally:
        for h in handles:
            h.remove()


def build(
    m: LoadedModel, engine: TargetRuntime, engine_transformers: TargetRuntime, stock: TargetRuntime, new: int
) -> dict[str, Callable[[], object]]:
    """The sweep's cases: the peers on `m`, the engine on `engine`.

    `m` is a stock load (ATen linears and transformers' forward, as a transformers user has them); the
    engine runs with its options, on `engine_transformers` (its kernels, transformers' forward) and on
    `stock` (`m` with transformers' forward), to show what the lean forward and the kernels are each worth.
    """
    layers = list(range(m.layout.num_layers))
    preset = PRESETS["identity"]
    tt = tokenize_template(m.tokenizer, preset.template, preset.filler)
    device = m.device
    src = torch.tensor([tokenize_prompt(m.tokenizer, PROMPT)], device=device)
    tpl = torch.tensor([tt.ids], device=device)
    # Block ℓ's raw output is hidden_states[ℓ + 1], except the last: transformers returns it normed.

    def states() -> torch.Tensor:
        raw_last = []
        handle = m.layout.blocks[-1].register_forward_hook(lambda _m, _a, out: raw_last.append(out[0, -1]))
        try:
            hs = source_states(m, src)
        finally:
            handle.remove()
        return torch.stack([hs[layer + 1][0, -1] for layer in layers[:-1]] + raw_last)

    def per_site_loop():
        for layer in layers:
            vec = states()[layer : layer + 1]
            hooked_generate(m, tpl, [layer], vec, tt.placeholder, new)

    def batched_generate():
        vecs = states()
        return hooked_generate(m, tpl.expand(len(layers), -1), layers, vecs, tt.placeholder, new)

    def unpatched_batch():
        return m.model.generate(
            tpl.expand(len(layers), -1),
            attention_mask=torch.ones_like(tpl.expand(len(layers), -1)),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=m.tokenizer.eos_token_id,
        )

    def engine_default():
        return sweep(engine, new)

    def engine_controls():
        return sweep(engine, new, controls=True)

    def engine_no_cache():
        engine.prefix_cache.clear()
        engine.prefix_cache.capacity = 0
        try:
            return sweep(engine, new)
        finally:
            engine.prefix_cache.capacity = 32

    def engine_transformers_forward():
        return sweep(engine_transformers, new)

    def engine_stock():
        return sweep(stock, new)

    return {
        "(a) per-site loop": per_site_loop,
        "(b) batched generate + hooks": batched_generate,
        "(c) unpatched batch (floor)": unpatched_batch,
        ENGINE: engine_default,
        CONTROLS: engine_controls,
        "(d') engine, no prefix cache": engine_no_cache,
        "(d'') engine, transformers forward": engine_transformers_forward,
        "(d''') engine, stock load": engine_stock,
    }


ENGINE = "(d) engine"
BATCHED = "(b) batched generate + hooks"
CONTROLS = "(d0) engine, controls on"  # its ratio is what the controls cost (issue bar: <= 1.2x)
NNSIGHT_LOOP = "(e) nnsight per-site loop"
NNSIGHT_BATCHED = "(f) nnsight batched"


def import_nnsight() -> ModuleType | None:
    """The optional peer (the `bench` extra): without nnsight, (e) and (f) are skipped, not failed."""
    try:
        import nnsight
    except ImportError:
        return None
    return nnsight


def build_nnsight(nnsight: ModuleType, m: LoadedModel, new: int) -> dict[str, Callable[..., torch.Tensor]]:
    """The sweep as an nnsight 0.8 user writes it; each case returns the generated ids, one row per layer.

    nnsight installs its own `forward` on every module it wraps, permanently, so it wraps a copy of the module
    tree whose parameters and buffers are the original's (pre-seeded in deepcopy's memo): no extra weights,
    and the other cases keep running the untouched model. The tokenizer is copied because nnsight sets its
    padding side. Inputs are token ids (the template's, as the engine builds them), so nothing is
    re-tokenised. In transformers ≥ 5 a decoder block's `.output` is the hidden-state tensor itself, the raw
    residual the engine reads and patches, also at the last block.
    """
    shared = {id(t): t for t in itertools.chain(m.model.parameters(), m.model.buffers())}
    lm = nnsight.TransformersModel(
        copy.deepcopy(m.model, shared), tokenizer=copy.deepcopy(m.tokenizer), task="text-generation"
    )
    blocks = functools.reduce(getattr, m.layout.paths.blocks.split("."), lm)  # e.g. lm.model.layers
    all_layers = list(range(m.layout.num_layers))
    preset = PRESETS["identity"]
    tt = tokenize_template(m.tokenizer, preset.template, preset.filler)
    src, tpl, at = tokenize_prompt(m.tokenizer, PROMPT), list(tt.ids), tt.placeholder
    gen = {
        "max_new_tokens": new,
        "min_new_tokens": new,
        "do_sample": False,
        "pad_token_id": m.tokenizer.eos_token_id,
    }

    def per_site_loop(layers: list[int] = all_layers) -> torch.Tensor:
        rows = []
        for layer in layers:
            with lm.trace(src):
                vec = blocks[layer].output[0, -1].save()
            # Outside `tracer.iter`, `.output` is the module's first call: the prompt pass only.
            with lm.generate(tpl, **gen) as tracer:
                blocks[layer].output[0, at] = vec
                ids = tracer.result.save()
            rows.append(ids)
        return torch.cat(rows)

    def batched(layers: list[int] = all_layers) -> torch.Tensor:
        with lm.trace(src):
            vecs = torch.stack([blocks[layer].output[0, -1] for layer in layers]).save()
        with lm.generate(**gen) as tracer:
            for row, layer in enumerate(layers):
                with tracer.invoke(tpl):  # one batch row per invoke, each patching its own layer
                    blocks[layer].output[0, at] = vecs[row]
            with tracer.invoke():  # an empty invoke sees the whole batch's result
                ids = tracer.result.save()
        return ids

    return {NNSIGHT_LOOP: per_site_loop, NNSIGHT_BATCHED: batched}


def count_differing(m: LoadedModel, explanation: Explanation, generated: torch.Tensor) -> tuple[int, int]:
    """How many of the generated rows (template + continuation, row r = layer r) disagree with the engine.

    A row agrees when it starts with the engine's explanation, which may be shorter (the engine stops at EOS).
    """
    prompt_len = len(tokenize_template(m.tokenizer, PRESETS["identity"].template, "?").ids)
    texts = [m.tokenizer.decode(row[prompt_len:], skip_special_tokens=True) for row in generated.tolist()]
    differ = sum(
        a.explanation != b[: len(a.explanation)] for a, b in zip(explanation.results, texts, strict=False)
    )
    return differ, len(texts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", help="a registry id (GPU: bench/bench_gpu.py)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-loop", action="store_true", help="skip (a), the slowest baseline")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: one per CPU)")
    parser.add_argument(
        "--controls-only",
        action="store_true",
        help="time only (d) and (d0): what the controls cost, without the peers (nnsight skipped too)",
    )
    parser.add_argument(
        "--skip-nnsight-loop",
        action="store_true",
        help="skip timing (e), nnsight's per-site loop (its first 3 layers are still checked)",
    )
    parser.add_argument(
        "--gemm", default=DEFAULTS.gemm, choices=GEMMS, help="the engine's linear kernels (the peers': ATen)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    load_weights = functools.partial(load_model, args.model, dtype=args.dtype, device=args.device)
    m = load_weights(options=EngineOptions(gemm="aten"))
    options = EngineOptions(gemm=args.gemm)
    engine = TargetRuntime.build(load_weights(options=options), options)
    transformers_forward = EngineOptions(gemm=args.gemm, forward="transformers")
    engine_transformers = TargetRuntime.build(engine.model, transformers_forward)
    stock = TargetRuntime.build(m, EngineOptions(gemm="aten", forward="transformers"))
    cases = build(m, engine, engine_transformers, stock, args.new_tokens)
    if args.skip_loop:
        cases.pop("(a) per-site loop")
    if args.controls_only:
        cases = {name: cases[name] for name in (ENGINE, CONTROLS)}
    nnsight = None if args.controls_only else import_nnsight()
    nnsight_cases = build_nnsight(nnsight, m, args.new_tokens) if nnsight else {}
    if nnsight is None and not args.controls_only:
        print("nnsight not installed: pip install nnsight==0.8.1 (or .[bench])")
    cases.update(nnsight_cases)
    if args.skip_nnsight_loop:
        cases.pop(NNSIGHT_LOOP, None)

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    device_name = torch.cuda.get_device_name() if m.device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"model {m.id} ({m.layout.num_layers} layers, {args.dtype}) on {device_name}; commit {commit}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"sweep of {m.layout.num_layers} sites, "
        f"{args.new_tokens} new tokens, median of {args.repeats}; engine gemm {args.gemm} "
        f"(runs {resolve_gemm(args.gemm, m.device, m.model.dtype)})"
    )
    if m.device.type == "cpu":  # the loop ÷ engine ratio moves with the CPU kind: name it beside every figure
        print(f"{detect().summary()}; oneDNN ISA: {onednn_isa()}")

    with torch.inference_mode():
        if nnsight_cases:  # a peer only counts if it explains the same thing: check before timing
            expected = sweep(engine, args.new_tokens)
            checked = {
                "batched": nnsight_cases[NNSIGHT_BATCHED](),
                # the loop is checked on its first layers even when its timing is skipped
                "per-site loop": nnsight_cases[NNSIGHT_LOOP](list(range(min(3, m.layout.num_layers)))),
            }
            counts = {name: count_differing(m, expected, ids) for name, ids in checked.items()}
            print(
                f"nnsight explanations differing from the engine: {sum(k for k, _ in counts.values())} of "
                f"{sum(n for _, n in counts.values())} ("
                + ", ".join(f"{name} {k} of {n}" for name, (k, n) in counts.items())
                + ")"
            )
        for fn in cases.values():  # warm-up
            fn()

        cpu_seconds: list[float] = []  # this process's CPU time of the latest `timed` call

        def timed(fn: Callable[[], object]) -> float:
            sync(m.device)
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            sync(m.device)
            cpu_seconds[:] = [time.process_time() - cpu]
            return time.perf_counter() - start

        # Each case runs between two engine runs and is divided by their mean: this CPU's speed drifts by
        # up to 1.5x over minutes, which medians of separately timed cases do not cancel.
        times: dict[str, list[float]] = {name: [] for name in cases}
        ratios: dict[str, list[float]] = {name: [] for name in cases if name != ENGINE}
        # The same pairs in this process's CPU seconds: on a shared machine other processes' load moves
        # wall times by more than the controls cost, CPU time much less (for the controls' ratio).
        cpu_ratios: list[float] = []
        others = list(ratios)
        for r in range(args.repeats):
            before = timed(cases[ENGINE])
            cpu_before = cpu_seconds[0]
            times[ENGINE].append(before)
            for name in others[r % len(others) :] + others[: r % len(others)]:  # rotated order
                took = timed(cases[name])
                cpu_took = cpu_seconds[0]
                after = timed(cases[ENGINE])
                times[name].append(took)
                times[ENGINE].append(after)
                ratios[name].append(took / ((before + after) / 2))
                if name == CONTROLS:
                    cpu_ratios.append(cpu_took / ((cpu_before + cpu_seconds[0]) / 2))
                before, cpu_before = after, cpu_seconds[0]
        breakdown = sweep(engine, args.new_tokens)
        reference = build(m, engine, engine_transformers, stock, args.new_tokens)[BATCHED]()

    med = {name: statistics.median(ts) for name, ts in times.items()}
    speedup = {name: statistics.median(rs) for name, rs in ratios.items()} | {ENGINE: 1.0}
    floor = "(c) unpatched batch (floor)"
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'method':<36}{'median s':>10}{'engine speed-up':>17}{'÷ floor (c)':>13}")
    for name, t in med.items():
        versus = f"{speedup[name] / speedup[floor]:>12.2f}" if floor in speedup else f"{'-':>12}"
        print(f"{name:<36}{t:>10.3f}{speedup[name]:>16.2f}×{versus}")
    t = breakdown.timings
    print(
        f"engine breakdown: source pass {t.source_s:.3f}s, prefill {t.prefill_s:.3f}s, "
        f"decode {t.decode_s:.3f}s"
    )
    differ, n = count_differing(m, breakdown, reference)
    print(f"explanations differing from batched generate + hooks: {differ} of {n}")
    if "(a) per-site loop" in speedup:
        loop = ratios["(a) per-site loop"]
        print(
            f"RESULT engine vs per-site loop: {speedup['(a) per-site loop']:.1f}× faster (target ≥ 20×; "
            f"per round {min(loop):.1f}–{max(loop):.1f}×)"
        )
    if floor in speedup:
        print(f"RESULT engine ÷ unpatched batch: {1 / speedup[floor]:.2f} (target ≤ 0.8)")
    cost = ratios[CONTROLS]
    print(
        f"RESULT controls on ÷ off: {speedup[CONTROLS]:.2f}× (target ≤ 1.2×; per round "
        f"{min(cost):.2f}–{max(cost):.2f}×, n = {len(cost)}; rounds "
        + ", ".join(f"{c:.3f}" for c in cost)
        + ")"
    )
    print(
        f"RESULT controls on ÷ off, CPU time: {statistics.median(cpu_ratios):.2f}× (per round "
        + ", ".join(f"{c:.3f}" for c in cpu_ratios)
        + f"; {torch.get_num_threads()} threads)"
    )
    nnsight_timed = [name for name in nnsight_cases if name in speedup]
    if nnsight_timed:
        best = min(nnsight_timed, key=lambda name: speedup[name])
        print(
            f"RESULT engine vs nnsight best: {speedup[best]:.1f}× faster (target ≥ 2×; "
            f"per round {min(ratios[best]):.1f}–{max(ratios[best]):.1f}×)"
        )


if __name__ == "__main__":
    main()
