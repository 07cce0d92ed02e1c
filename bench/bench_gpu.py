"""GPU fast path: a sweep through the static decoder against the eager engine and transformers `generate`.

A TinyLlama-shaped random model (hidden 2048, 22 layers, bf16; built from a config, since packaged weights
do not travel to the GPU host) and a word-level tokenizer over its 32k ids. One 22-site sweep (one row
per layer, same model), a 24-token template, 20 new tokens, greedy. Cases, in one process:
  HF generate + hooks    one batched `generate`, each row patched by a hook during the prompt pass,
  HF generate unpatched  the same batch with no patch (the floor of the hooked way),
  engine eager           `patched_generate` as the service runs it (prefix cache, per-step loop),
  static A               eager patched prefill into a static cache, compiled decode step (CUDA graphs),
  static B               A with the prefill compiled too, the patch an input of its graph,
  static C               B's functions compiled without per-step graphs, the whole sweep (prefill and
                         every decode step) captured as one CUDA graph and replayed,
  static D               C with nothing compiled: the eager forward captured as one CUDA graph,
  static E               D with the decode step compiled by inductor's max-autotune (its own GEMM
                         kernels, chosen by timing them; minutes of compile), the sweep captured.
It checks before timing that every row's first token equals the eager engine's (without the prefix cache,
so both prompt passes compute the same thing) and counts later tokens that differ; it measures the
device's copy bandwidth and prints the time per decode step against the bound of reading every weight
once per step. The slot hooks of B, C and D stay on the blocks (idle outside their prefill: one Python call
per block per forward), so every case is timed with them present alike. `--shape smoke` runs the same on
a tiny model (for the CPU). Prints, never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bench_engine import hooked_generate, sync  # bench/ is the script's own directory
from patchscope.engine import GenerationConfig, PatchedRow, RowPatch, extract, patched_generate
from patchscope.engine.models import LoadedModel
from patchscope.engine.models.layout import discover
from patchscope.engine.runtime import TargetRuntime
from patchscope.engine.static_decode import StaticDecoder
from patchscope.engine.template import tokenize_template
from patchscope.engine.timings import Timings

SHAPES = {
    "tinyllama": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
    ),
    "smoke": dict(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """Words `w3` .. `w{vocab-1}` are ids 3 .. vocab-1; `<s>` (1) starts every text, `</s>` (2) ends it."""
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def random_model(shape: str, device: str, dtype: torch.dtype) -> LoadedModel:
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, **SHAPES[shape])
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    model.generation_config.pad_token_id = 2
    tokenizer = word_tokenizer(config.vocab_size)
    return LoadedModel(
        id=f"{shape}-random", model=model, tokenizer=tokenizer, layout=discover(model), fingerprint="random"
    )


def copy_bandwidth(device: torch.device) -> float | None:
    """Bytes read plus written per second by a large device-to-device copy (median of 10)."""
    if device.type != "cuda":
        return None
    src = torch.randn(256 * 2**20, device=device, dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    times = []
    for _ in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / statistics.median(times[3:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="tinyllama", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--mode", default="reduce-overhead", help="torch.compile mode of the static cases")
    parser.add_argument(
        "--variants",
        default="",
        help="static variants to run, e.g. 'A,D,E' (default: A-D on CUDA, A,B on CPU)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda" and args.shape != "smoke":
        print(
            "GPU: not measured (no CUDA device here; bench/results-h100.md has an H100 run); "
            "`--shape smoke` runs the same code on the CPU"
        )
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; torch {torch.__version__}; transformers {transformers.__version__}", flush=True)

    m = random_model(args.shape, args.device, getattr(torch, args.dtype))
    layers = list(range(m.layout.num_layers))
    words = [f"w{i}" for i in torch.randint(3, m.model.config.vocab_size, (30,)).tolist()]
    template = " ".join(words[:20]) + " {} " + " ".join(words[20:22])
    tokens = tokenize_template(m.tokenizer, template, "w7")
    states = extract(m, " ".join(words[22:30]), layers).states[:, 0]  # [L, d]: the last token at every layer
    rows = [
        PatchedRow(template=template, filler="w7", patches=(RowPatch(layer=layer, vector=states[layer]),))
        for layer in layers
    ]
    config = GenerationConfig(max_new_tokens=args.new_tokens)
    weight_bytes = sum(
        p.numel() * p.element_size() for n, p in m.model.named_parameters() if "embed" not in n
    )
    print(
        f"model {m.id}: {sum(p.numel() for p in m.model.parameters()) / 1e9:.2f} B parameters, {args.dtype}; "
        f"sweep of {len(rows)} sites, template {len(tokens.ids)} tokens, {args.new_tokens} new tokens",
        flush=True,
    )

    runtime = TargetRuntime(m)  # transformers' forward: the GPU's default

    def generate(decoder: StaticDecoder | None, prefix_cache: bool = True, timings: Timings | None = None):
        runtime.static_decoder = decoder
        try:
            out = patched_generate(runtime, rows, config, use_prefix_cache=prefix_cache, timings=timings)
        finally:
            runtime.static_decoder = None
        return [r.token_ids for r in out]

    # Eager references first, then each static decoder's first call (its compile), then the checks.
    reference = generate(None, prefix_cache=False)
    unpatched = patched_generate(
        runtime, [PatchedRow(template, "w7", ())] * len(rows), config, use_prefix_cache=False
    )
    changed = sum(a != b.token_ids for a, b in zip(reference, unpatched, strict=True))
    print(f"the patch changes the continuation of {changed} of {len(rows)} rows", flush=True)
    decoders: dict[str, StaticDecoder] = {}
    compile_s: dict[str, float] = {}
    agreement: dict[str, dict[str, float]] = {}
    variants = {
        "static A": (args.mode, False, False),
        "static B": (args.mode, True, False),
        "static C": ("default", True, True),
        "static D": (None, False, True),
        "static E": ("max-autotune-no-cudagraphs", False, True),
    }
    chosen = args.variants.split(",") if args.variants else list("AB" if device.type != "cuda" else "ABCD")
    variants = {label: v for label, v in variants.items() if label.removeprefix("static ") in chosen}
    noise = generate(None)
    print(
        "eager engine with its prefix cache vs without (bf16 rounding alone): whole rows equal "
        f"{sum(a == b for a, b in zip(reference, noise, strict=True))} of {len(rows)}",
        flush=True,
    )
    for label, (mode, compile_prefill, capture) in variants.items():
        started = time.perf_counter()
        try:
            decoders[label] = StaticDecoder(m, mode, compile_prefill=compile_prefill, capture=capture)
            got = generate(decoders[label])
        except Exception as error:  # a variant that fails to compile is reported, the others still run
            print(f"{label}: failed: {type(error).__name__}: {str(error)[:400]}", flush=True)
            decoders.pop(label, None)
            continue
        sync(device)
        compile_s[label] = time.perf_counter() - started
        first_equal = sum(a[:1] == b[:1] for a, b in zip(reference, got, strict=True))
        rows_equal = sum(a == b for a, b in zip(reference, got, strict=True))
        pairs = [(x, y) for a, b in zip(reference, got, strict=True) for x, y in zip(a, b, strict=False)]
        agreement[label] = {
            "first_token_equal_rows": first_equal,
            "rows_equal": rows_equal,
            "tokens_equal_fraction": sum(x == y for x, y in pairs) / max(1, len(pairs)),
        }
        print(
            f"{label}: first call (compile, capture) {compile_s[label]:.1f} s; first token equals eager in "
            f"{first_equal} of {len(rows)} rows; whole rows equal {rows_equal} of {len(rows)}; "
            f"tokens equal {agreement[label]['tokens_equal_fraction']:.3f}",
            flush=True,
        )

    tpl = torch.tensor([tokens.ids], device=device).expand(len(rows), -1)
    vecs = states.to(device, m.dtype)
    cases: dict[str, Callable[[], object]] = {
        "HF generate + hooks": lambda: hooked_generate(
            m, tpl, layers, vecs, tokens.placeholder, args.new_tokens
        ),
        "HF generate unpatched": lambda: m.model.generate(
            tpl,
            attention_mask=torch.ones_like(tpl),
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
        ),
        "engine eager": lambda: generate(None),
    }
    for label, decoder in decoders.items():
        cases[label] = lambda decoder=decoder: generate(decoder)
    with torch.inference_mode():
        for fn in cases.values():
            fn()
        times: dict[str, list[float]] = {label: [] for label in cases}
        labels = list(cases)
        for r in range(args.repeats):
            for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
                sync(device)
                started = time.perf_counter()
                cases[label]()
                sync(device)
                times[label].append(time.perf_counter() - started)
        splits: dict[str, tuple[float, float]] = {}
        for label, decoder in {"engine eager": None, **decoders}.items():
            prefill, decode = [], []
            for _ in range(args.repeats):
                t = Timings()
                generate(decoder, timings=t)
                prefill.append(t.prefill_s)
                decode.append(t.decode_s)
            splits[label] = (statistics.median(prefill), statistics.median(decode))

    print(f"dynamo: {dict(torch._dynamo.utils.counters['stats'])}", flush=True)
    bandwidth = copy_bandwidth(device)
    bound_step = weight_bytes / bandwidth if bandwidth else None
    med = {label: statistics.median(ts) for label, ts in times.items()}
    steps = args.new_tokens - 1
    print(f"\n{'case':<24}{'median s':>10}{'prefill s':>11}{'decode s':>10}{'ms/step':>9}{'vs hooks':>10}")
    for label, t in med.items():
        prefill, decode = splits.get(label, (float("nan"), float("nan")))
        print(
            f"{label:<24}{t:>10.4f}{prefill:>11.4f}{decode:>10.4f}{decode / steps * 1e3:>9.2f}"
            f"{med['HF generate + hooks'] / t:>9.1f}×"
        )
    if bound_step:
        print(
            f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; weights read per step {weight_bytes / 1e9:.2f} GB; "
            f"bound per step {bound_step * 1e3:.3f} ms, per sweep of {args.new_tokens} tokens "
            f"{bound_step * args.new_tokens:.4f} s"
        )
        for label in decoders:
            per_step = splits[label][1] / steps
            print(
                f"RESULT {label}: sweep {med[label]:.4f} s (target <= 0.04 s) = "
                f"{med[label] / (bound_step * args.new_tokens):.1f}× the bound"
                + (
                    ""
                    if decoders[label].capture
                    else f"; decode {per_step * 1e3:.3f} ms/step = "
                    f"{per_step / bound_step:.1f}× the per-step bound"
                )
            )
    record = {
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shape": args.shape,
        "dtype": args.dtype,
        "sites": len(rows),
        "template_tokens": len(tokens.ids),
        "new_tokens": args.new_tokens,
        "median_s": med,
        "prefill_decode_s": splits,
        "compile_s": compile_s,
        "agreement": agreement,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "weight_bytes": weight_bytes,
    }
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_gpu.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
