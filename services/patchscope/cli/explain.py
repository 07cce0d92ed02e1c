"""`patchscope explain`: explain a source prompt's hidden states through a target model, in process."""

from __future__ import annotations

import argparse
import functools
import json

from patchscope.cli.args import parse_int_list, progress
from patchscope.cli.models import registry_with_paths


def cmd_explain(args: argparse.Namespace) -> int:
    import torch

    from patchscope.engine import ExplainRequest, GenerationConfig, explain, load_model
    from patchscope.mapping.pipeline import depth_proportional
    from patchscope.mapping.registry import MappingRegistry
    from patchscope.mapping.resolve import AUTO, resolve_mappings

    torch.manual_seed(0)
    registry = registry_with_paths(args.source, args.target)
    load_by_id = functools.partial(
        load_model,
        registry=registry,
        dtype=args.dtype,
        device=args.device,
        progress=progress,
        gemm=args.gemm,
        forward=args.forward,
    )
    source = load_by_id(args.source)
    target = load_by_id(args.target) if args.target != args.source else source
    if args.decode != "eager":
        from patchscope.engine.static_decode import DECODE_MODES, enable_static_decode

        enable_static_decode(target, **DECODE_MODES[args.decode])
    layers = parse_int_list(args.layers, num_layers=source.facts.num_layers)
    same_model = source.fingerprint == target.fingerprint
    if args.target_layers != "same":
        target_layers = parse_int_list(args.target_layers)
    elif same_model:
        target_layers = None
    else:  # the target layer at the same relative depth
        L, L_star = source.facts.num_layers, target.facts.num_layers
        target_layers = [depth_proportional(layer % L, L, L_star) for layer in layers]
    request = ExplainRequest(
        prompt=args.prompt,
        layers=layers,
        positions=parse_int_list(args.position),
        target_layers=target_layers,
        preset=args.preset,
        template=args.template,
        generation=GenerationConfig(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
        ),
        top_k=args.top_k,
    )
    mapping = None
    if not same_model or args.mapping != AUTO:
        from patchscope.engine.explain import plan_sites

        pairs = {(s.source_layer, s.target_layer) for s in plan_sites(source, target, request)}
        mapping = resolve_mappings(MappingRegistry(args.registry), source, target, pairs, args.mapping)
    result = explain(source, target, request, mapping)
    if args.json:
        print(json.dumps([r.to_json() for r in result.results], indent=2, ensure_ascii=False))
        return 0
    print(f"{'src':>4} {'tgt':>4} {'pos':>4}  {'source token':<16}{'answer':<20}{'R²':>6}  explanation")
    for r in result.results:
        s = r.site
        r2 = f"{r.mapping_r2:.2f}" if r.mapping_r2 is not None else "-"
        print(
            f"{s.source_layer:>4} {s.target_layer:>4} {s.position:>4}  "
            f"{r.source_token!r:<16}{r.answer!r:<20}{r2:>6}  {r.explanation!r}"
        )
    t = result.timings
    progress(f"source {t.source_s:.2f}s, prefill {t.prefill_s:.2f}s, decode {t.decode_s:.2f}s")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("explain", help="explain a source prompt's hidden states through a target model")
    ex.add_argument("prompt")
    ex.add_argument("--source", required=True, help="source model id (or a local model directory / .gguf)")
    ex.add_argument("--target", required=True, help="target model id (same as --source for same-model)")
    ex.add_argument("--preset", default="identity", help="identity | description | attribute | logit-lens")
    ex.add_argument(
        "--template", default=None, help="override the preset's target prompt; {} marks the placeholder"
    )
    ex.add_argument("--layers", default="all", help="source layers: 0-10, 1,3,5 or all (default)")
    ex.add_argument("--position", default="-1", help="source token positions, BOS counted; default -1 (last)")
    ex.add_argument("--target-layers", default="same", help="'same', one layer, or one per source layer")
    ex.add_argument("--max-new-tokens", type=int, default=10)
    ex.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ex.add_argument("--top-p", type=float, default=1.0)
    ex.add_argument("--seed", type=int, default=None)
    ex.add_argument("--top-k", type=int, default=5, help="pairs reported by the logit-lens preset")
    ex.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ex.add_argument("--device", default="cpu")
    ex.add_argument(
        "--gemm",
        default="auto",
        choices=["auto", "onednn", "aten"],
        help="linear-layer kernel: auto = oneDNN-packed weights for float32 on a CPU, else ATen's",
    )
    ex.add_argument(
        "--forward",
        default="auto",
        choices=["auto", "lean", "transformers"],
        help="forward of patched generation: auto = the lean (written-out) forward for Llama, Mistral, "
        "Qwen2/3 and Gemma 3 on a CPU, else transformers'",
    )
    ex.add_argument(
        "--decode",
        default="eager",
        choices=["eager", "static", "graph", "compiled-graph"],
        help="greedy sweeps: static cache + compiled step (static), or the whole sweep as one CUDA graph, "
        "eager (graph) or compiled (compiled-graph); compiling takes a minute; see the README",
    )
    ex.add_argument("--json", action="store_true", help="print a list of JSON objects, one per site")
    ex.add_argument(
        "--mapping", default="auto", help="'auto' (best held-out R² per layer pair) or a mapping id"
    )
    ex.add_argument(
        "--registry", default=None, help="mapping registry directory (default $PATCHSCOPE_HOME/mappings)"
    )
    ex.set_defaults(func=cmd_explain)
