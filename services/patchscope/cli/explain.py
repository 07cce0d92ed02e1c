"""`patchscope explain`: explain a source prompt's hidden states through a target model, in process."""

from __future__ import annotations

import argparse
import functools
import json

from patchscope.cli.args import parse_int_list, progress
from patchscope.cli.models import registry_with_paths
from patchscope.engine.generation import GenerationConfig
from patchscope.engine.presets import DEFAULT_PRESET, DEFAULT_TOP_K

SAME_AS_UNPATCHED = "= unpatched"  # `patchscope-client explain` prints the same markers
SAME_AS_MEAN_STATE = "= mean state"  # with --mean-state-control, where the unpatched one does not apply


def control_cells(control) -> tuple[str, str]:
    """The confidence and control cells of a row: "-" where there is no value, the marker when equal."""
    confidence = f"{control.confidence:.2f}" if control and control.confidence is not None else "-"
    if control is None:
        return confidence, "-"
    if control.same_as_unpatched:
        return confidence, SAME_AS_UNPATCHED
    return confidence, SAME_AS_MEAN_STATE if control.same_as_mean_state else ""


def cmd_explain(args: argparse.Namespace) -> int:
    import torch

    from patchscope.calibration.registry import CalibrationRegistry
    from patchscope.engine import load_model
    from patchscope.engine.runtime import TargetRuntime
    from patchscope.explain import ExplainRequest, LocalBackend, TargetSpec, explain
    from patchscope.mapping.registry import MappingRegistry
    from patchscope.mapping.resolve import registry_resolver

    torch.manual_seed(0)
    registry = registry_with_paths(args.source, args.target)
    load_by_id = functools.partial(
        load_model, registry=registry, dtype=args.dtype, device=args.device, progress=progress
    )
    source = load_by_id(args.source)
    target = load_by_id(args.target) if args.target != args.source else source
    request = ExplainRequest(
        source=source.id,
        prompt=args.prompt,
        layers=tuple(parse_int_list(args.layers, num_layers=source.facts.num_layers)),
        positions=tuple(parse_int_list(args.position)),
        target=TargetSpec(
            model=target.id,
            preset=args.preset,
            template=args.template,
            layers=() if args.target_layers == "same" else tuple(parse_int_list(args.target_layers)),
            mapping=args.mapping,
            generation=GenerationConfig(
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
                stop=tuple(args.stop or ()),
            ),
            top_k=args.top_k,
            controls=args.controls,
            mean_state_control=args.mean_state_control,
        ),
    )
    backend = LocalBackend([source], [TargetRuntime.build(target)])
    mappings = MappingRegistry(args.registry)
    calibrations = CalibrationRegistry(mappings.root)
    result = explain(backend, request, registry_resolver(mappings), calibrators=calibrations.lookup)
    if args.json:
        print(json.dumps([r.to_json() for r in result.results], indent=2, ensure_ascii=False))
        return 0
    print(
        f"{'src':>4} {'tgt':>4} {'pos':>4}  {'source token':<16}{'answer':<20}{'R²':>6} {'conf.':>6}  "
        f"{'control':<12}explanation"
    )
    for r in result.results:
        s = r.site
        r2 = f"{r.mapping_r2:.2f}" if r.mapping_r2 is not None else "-"
        confidence, marker = control_cells(r.control)
        print(
            f"{s.source_layer:>4} {s.target_layer:>4} {s.position:>4}  "
            f"{r.source_token!r:<16}{r.answer!r:<20}{r2:>6} {confidence:>6}  {marker:<12}{r.explanation!r}"
        )
    t = result.timings
    progress(f"source {t.source_s:.2f}s, prefill {t.prefill_s:.2f}s, decode {t.decode_s:.2f}s")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("explain", help="explain a source prompt's hidden states through a target model")
    ex.add_argument("prompt")
    ex.add_argument("--source", required=True, help="source model id (or a local model directory / .gguf)")
    ex.add_argument("--target", required=True, help="target model id (same as --source for same-model)")
    ex.add_argument(
        "--preset", default=DEFAULT_PRESET, help="identity | description | attribute | logit-lens"
    )
    ex.add_argument(
        "--template", default=None, help="override the preset's target prompt; {} marks the placeholder"
    )
    ex.add_argument("--layers", default="all", help="source layers: 0-10, 1,3,5 or all (default)")
    ex.add_argument(
        "--position",
        "--positions",
        default="-1",
        help="source token positions, BOS counted; default -1 (last)",
    )
    ex.add_argument("--target-layers", default="same", help="'same', one layer, or one per source layer")
    ex.add_argument("--max-new-tokens", type=int, default=GenerationConfig.max_new_tokens)
    ex.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ex.add_argument("--top-p", type=float, default=1.0)
    ex.add_argument("--seed", type=int, default=None)
    ex.add_argument(
        "--stop",
        action="append",
        metavar="TEXT",
        help="end a row when its text contains TEXT (repeatable); the explanation stops before it",
    )
    ex.add_argument(
        "--top-k", type=int, default=DEFAULT_TOP_K, help="pairs reported by the logit-lens preset"
    )
    ex.add_argument(
        "--no-controls",
        dest="controls",
        action="store_false",
        help="skip the unpatched control row: no unpatched_answer, same_as_unpatched, patch_effect, "
        "dependence or confidence (they print as null / '-')",
    )
    ex.add_argument(
        "--mean-state-control",
        action="store_true",
        help="also patch each target layer's mean state in a row of its own: mean_state_answer and "
        "same_as_mean_state (needs the controls)",
    )
    ex.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ex.add_argument("--device", default="cpu")
    ex.add_argument("--json", action="store_true", help="print a list of JSON objects, one per site")
    ex.add_argument(
        "--mapping", default="auto", help="'auto' (best held-out R² per layer pair) or a mapping id"
    )
    ex.add_argument(
        "--registry", default=None, help="mapping registry directory (default $PATCHSCOPE_HOME/mappings)"
    )
    ex.set_defaults(func=cmd_explain)
