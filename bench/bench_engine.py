"""Engine benchmark: a sweep over every layer of one prompt, against the baselines people use today.

(a) the reference notebooks' per-site loop: one source pass and one hooked `generate` per layer,
(b) one batched `generate` with a patch hook per row,
(c) the same batch unpatched (the floor any patching method sits on),
(d) the engine (`explain`): one source pass, prefix cache, lean decode loop; (d') the same without the cache.
All run in this process on the same model, in rotated order; the median of --repeats runs is reported.
Prints ratios, never asserts them. `make bench-engine` runs it on smollm2-135m.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

from patchscope.engine import ExplainRequest, GenerationConfig, explain, load_directory, load_model
from patchscope.engine.models import LoadedModel
from patchscope.engine.presets import PRESETS
from patchscope.engine.template import tokenize_prompt, tokenize_template

PROMPT = "Barack Obama"


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


def build(m: LoadedModel, new: int) -> dict[str, Callable[[], object]]:
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

    request = ExplainRequest(prompt=PROMPT, layers=layers, generation=GenerationConfig(max_new_tokens=new))

    def engine():
        return explain(m, m, request)

    def engine_no_cache():
        m.prefix_cache.clear()
        m.prefix_cache.capacity = 0
        try:
            return explain(m, m, request)
        finally:
            m.prefix_cache.capacity = 32

    return {
        "(a) per-site loop": per_site_loop,
        "(b) batched generate + hooks": batched_generate,
        "(c) unpatched batch (floor)": unpatched_batch,
        "(d) engine": engine,
        "(d') engine, no prefix cache": engine_no_cache,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", help="a registry id, or 'tinyllama-random'")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-loop", action="store_true", help="skip (a), the slowest baseline")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)

    if args.model == "tinyllama-random":
        m = tinyllama_random(args.device, args.dtype)
    else:
        m = load_model(args.model, dtype=args.dtype, device=args.device)
    cases = build(m, args.new_tokens)
    if args.skip_loop:
        cases.pop("(a) per-site loop")

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    device_name = torch.cuda.get_device_name() if m.device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"model {m.id} ({m.layout.num_layers} layers, {args.dtype}) on {device_name}; commit {commit}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"sweep of {m.layout.num_layers} sites, "
        f"{args.new_tokens} new tokens, median of {args.repeats}"
    )

    with torch.inference_mode():
        for fn in cases.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in cases}
        names = list(cases)
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotated order
                sync(m.device)
                start = time.perf_counter()
                cases[name]()
                sync(m.device)
                times[name].append(time.perf_counter() - start)
        breakdown = explain(
            m,
            m,
            ExplainRequest(
                prompt=PROMPT,
                layers=list(range(m.layout.num_layers)),
                generation=GenerationConfig(max_new_tokens=args.new_tokens),
            ),
        )
        reference = cases["(b) batched generate + hooks"]()

    med = {name: statistics.median(ts) for name, ts in times.items()}
    engine = med["(d) engine"]
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'method':<32}{'median s':>10}{'engine speed-up':>17}{'÷ floor (c)':>13}")
    for name, t in med.items():
        print(f"{name:<32}{t:>10.3f}{t / engine:>16.2f}×{t / med['(c) unpatched batch (floor)']:>12.2f}")
    t = breakdown.timings
    print(
        f"engine breakdown: source pass {t.source_s:.3f}s, prefill {t.prefill_s:.3f}s, "
        f"decode {t.decode_s:.3f}s"
    )
    prompt_len = len(tokenize_template(m.tokenizer, PRESETS["identity"].template, "?").ids)
    texts = [m.tokenizer.decode(row[prompt_len:], skip_special_tokens=True) for row in reference.tolist()]
    differ = sum(
        a.explanation != b[: len(a.explanation)] for a, b in zip(breakdown.results, texts, strict=True)
    )
    print(f"explanations differing from batched generate + hooks: {differ} of {len(texts)}")
    if "(a) per-site loop" in med:
        print(
            f"RESULT engine vs per-site loop: {med['(a) per-site loop'] / engine:.1f}× faster (target ≥ 12×)"
        )
    print(
        f"RESULT engine ÷ unpatched batch: {engine / med['(c) unpatched batch (floor)']:.2f} (target ≤ 0.8)"
    )


def tinyllama_random(device: str, dtype: str) -> LoadedModel:
    """A TinyLlama-shaped random model (hidden 2048, 22 layers) with SmolLM2's tokenizer, for GPU checks."""
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from patchscope.engine.models import ModelRegistry

    tok_dir = ModelRegistry().prepare("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    out = tempfile.mkdtemp(prefix="tinyllama-random-")
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return load_directory(
        "tinyllama-random", __import__("pathlib").Path(out), dtype=getattr(torch, dtype), device=device
    )


if __name__ == "__main__":
    main()
