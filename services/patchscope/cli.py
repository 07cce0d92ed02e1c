"""`patchscope` command: serve, models, prepare, explain, mappings, fit-mapping, eval."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_int_list(spec: str, *, num_layers: int | None = None) -> list[int]:
    """Parse `0-10`, `1,3,5`, `-1`, `2-4,8` or `all` (needs `num_layers`) into a list of ints."""
    spec = spec.strip()
    if spec == "all":
        if num_layers is None:
            raise argparse.ArgumentTypeError("'all' is only valid for layers")
        return list(range(num_layers))
    values: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        head, sep, tail = part[1:].partition("-")  # a leading '-' is a sign, not a range
        if sep:
            start, end = int(part[0] + head), int(tail)
            if end < start:
                raise argparse.ArgumentTypeError(f"range {part!r} ends before it starts")
            values.extend(range(start, end + 1))
        else:
            values.append(int(part))
    return values


def _progress(message: str) -> None:
    print(f"[patchscope] {message}", file=sys.stderr, flush=True)


def cmd_models(args: argparse.Namespace) -> int:
    from patchscope.engine.models import ModelRegistry

    registry = ModelRegistry()
    statuses = [registry.status(i) for i in registry.ids()]
    if args.json:
        print(json.dumps([s.__dict__ for s in statuses], indent=2))
        return 0
    print(f"{'id':<16}{'ready':<7}{'layers':>7}{'hidden':>8}{'vocab':>9}  description")
    for s in statuses:
        ready = "yes" if s.ready else ("no" if s.installed else "absent")
        layers, hidden, vocab = (
            str(v) if v is not None else "-" for v in (s.num_layers, s.hidden_size, s.vocab_size)
        )
        print(f"{s.id:<16}{ready:<7}{layers:>7}{hidden:>8}{vocab:>9}  {s.description}")
        if s.problem:
            print(f"{'':<16}{s.problem}")
    print(f"cache: {registry.home / 'models'}  (`patchscope prepare ID` converts a model once)")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from patchscope.engine.models import ModelRegistry

    registry = ModelRegistry()
    for model_id in args.models or registry.ids():
        path = registry.prepare(model_id, progress=_progress)
        print(f"{model_id}: {path}")
    return 0


def registry_with_paths(*names: str):
    """The default registry, plus any name that is a local model directory or GGUF file (CLI only)."""
    from pathlib import Path

    from patchscope.engine.models import ModelRegistry

    registry = ModelRegistry()
    for name in names:
        if name not in registry.ids() and Path(name).exists():
            registry.register(name, name)
    return registry


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
        progress=_progress,
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
    _progress(f"source {t.source_s:.2f}s, prefill {t.prefill_s:.2f}s, decode {t.decode_s:.2f}s")
    return 0


def cmd_mappings(args: argparse.Namespace) -> int:
    from patchscope.mapping.registry import MappingRegistry

    registry = MappingRegistry(args.registry)
    listing = registry.scan()
    if args.json:
        print(json.dumps([m.__dict__ for m in listing.mappings], indent=2))
        return 0
    print(f"{'id':<48}{'method':<11}{'pairs':>7}{'R²':>7}{'R²/dim':>8}{'cos':>7}{'|y| mean':>10}")
    for m in listing.mappings:
        print(
            f"{m.id:<48}{m.method:<11}{m.pairs_train:>7}{m.r2:>7.3f}{m.r2_mean_dim:>8.3f}{m.cosine:>7.3f}"
            f"{m.target_norm_mean:>10.1f}"
        )
    for name, problem in listing.unreadable:
        print(f"unreadable: {name}: {problem}")
    print(f"registry: {registry.root}")
    return 0


def cmd_fit_mapping(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from patchscope.engine import load_model
    from patchscope.mapping import pipeline
    from patchscope.mapping.registry import MappingRegistry

    corpus = Path(args.corpus) if args.corpus else default_corpus()
    if not corpus.is_file():
        raise pipeline.InvalidArgument("corpus", "file not found", value=str(corpus))
    models = registry_with_paths(args.source, args.target)
    source = load_model(args.source, registry=models, progress=_progress)
    target = source  # tuned-lens maps a layer of the source to its own final layer
    if args.target != args.source and args.method != "tuned-lens":
        target = load_model(args.target, registry=models, progress=_progress)
    pairs = pipeline.parse_pairs(args.pairs, source, target)
    if args.method == "tuned-lens":
        pairs = sorted({(a, source.facts.num_layers - 1) for a, _ in pairs})
    registry = MappingRegistry(args.registry)
    if args.if_missing:
        have = {
            (m.source_model, m.target_model, m.source_layer, m.target_layer, m.method)
            for m in registry.scan().mappings
        }
        pairs = [(a, b) for a, b in pairs if (source.id, target.id, a, b, args.method) not in have]
        if not pairs:
            _progress("all requested mappings are registered already")
            return 0

    with Progress(
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=None,
        transient=False,
    ) as bar:

        class Bars(pipeline.Progress):
            def __init__(self) -> None:
                self.tasks: dict[str, int] = {}

            def start(self, phase: str, total: int) -> None:
                self.tasks[phase] = bar.add_task(phase, total=total)

            def advance(self, phase: str, done: int) -> None:
                bar.update(self.tasks[phase], completed=done)

        exclude = set(Path(args.exclude_words).read_text().split()) if args.exclude_words else set()
        report = pipeline.fit_mappings(
            source,
            target,
            pairs,
            args.method,
            corpus,
            registry,
            max_words=args.max_words or None,
            progress=Bars(),
            vocab_words=args.vocab_words,
            kl_weight=args.kl_weight,
            exclude_words=exclude,
        )
    print(f"pairs of states: {report.pairs}; extraction {report.extract_s:.1f}s, fit {report.solve_s:.1f}s")
    print(f"{'mapping':<48}{'R²':>7}{'R²/dim':>8}{'cos':>7}{'MSE':>10}")
    for m in report.infos:
        print(f"{m.id:<48}{m.r2:>7.3f}{m.r2_mean_dim:>8.3f}{m.cosine:>7.3f}{m.mse:>10.3g}")
    print(f"written to {registry.root}")
    return 0


def default_corpus():
    from pathlib import Path

    data = Path(os.environ.get("PATCHSCOPE_DATA", "../shared/data"))
    return data / "wikitext-2" / "valid.txt"


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import time

    from patchscope.serve.app import AUTH_OFF_WARNING
    from patchscope.serve.config import ServiceConfig
    from patchscope.serve.local import proxy_message_limit, read_config, start

    config_path = args.config or DEFAULT_SERVE_CONFIG
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"no Serve config at {config_path}: pass --config FILE (see deploy/config/)")
    config = read_config(config_path)
    settings = ServiceConfig.model_validate(config["applications"][0].get("args", {}))  # fail before Ray
    if not settings.auth.required:
        print(AUTH_OFF_WARNING, file=sys.stderr)
    service = start(
        config, grpc_port=args.port, http_port=args.http_port, num_cpus=args.num_cpus, progress=_progress
    )
    print(f"patchscope serving gRPC on {service.address} (Ctrl-C stops)", flush=True)
    front = None
    if args.tls_cert or args.tls_key:
        from pathlib import Path

        from patchscope.serve.tls import tls_front

        if not (args.tls_cert and args.tls_key):
            raise FileNotFoundError("--tls-cert and --tls-key go together")
        client_ca = Path(args.tls_client_ca) if args.tls_client_ca else None
        front = tls_front(service.address, args.tls_port, Path(args.tls_cert), Path(args.tls_key), client_ca)
        mtls = " (mTLS: client certificates required)" if client_ca else ""
        print(f"  TLS front on 0.0.0.0:{args.tls_port}{mtls}; keep the plaintext port private", flush=True)
    print(
        "  note: Serve's gRPC proxy listens on all interfaces in plaintext and buffers each whole message "
        f"(at most {proxy_message_limit(config)} bytes) before the ingress checks it; put a TLS front before "
        "it on anything but a trusted network",
        flush=True,
    )
    print(
        f"  sources: {', '.join(settings.sources)}; targets: {', '.join(settings.targets)}; "
        f"health: http://127.0.0.1:{service.http_port}/-/healthz",
        flush=True,
    )
    # Ctrl-C, and SIGTERM from a container runtime, both shut down cleanly (even where SIGINT was ignored).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", file=sys.stderr)
    finally:
        if front is not None:
            front.stop(grace=5)
        service.stop()
    return 0


DEFAULT_SERVE_CONFIG = "deploy/config/local.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchscope", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    srv = sub.add_parser("serve", help="start the gRPC service on a local Ray instance and stay up")
    srv.add_argument("--config", default=None, help=f"Ray Serve config file (default {DEFAULT_SERVE_CONFIG})")
    srv.add_argument("--port", type=int, default=None, help="gRPC port (default: the config's, 9000)")
    srv.add_argument("--http-port", type=int, default=None, help="HTTP port (health checks)")
    srv.add_argument("--num-cpus", type=float, default=None, help="CPUs Ray may use (default: all)")
    srv.add_argument("--tls-cert", default=None, help="PEM certificate: serve through a TLS front")
    srv.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    srv.add_argument("--tls-client-ca", default=None, help="PEM CA: require client certificates (mTLS)")
    srv.add_argument("--tls-port", type=int, default=9443, help="port of the TLS front (default 9443)")
    srv.set_defaults(func=cmd_serve)

    models = sub.add_parser("models", help="list the model registry and which models are ready")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=cmd_models)

    prepare = sub.add_parser("prepare", help="convert models into the safetensors cache (default: all)")
    prepare.add_argument("models", nargs="*", metavar="ID")
    prepare.set_defaults(func=cmd_prepare)

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

    maps = sub.add_parser("mappings", help="list registered mappings with their held-out metrics")
    maps.add_argument("--registry", default=None)
    maps.add_argument("--json", action="store_true")
    maps.set_defaults(func=cmd_mappings)

    fit = sub.add_parser("fit-mapping", help="fit source -> target maps on a corpus and register them")
    fit.add_argument("--source", required=True)
    fit.add_argument("--target", required=True)
    fit.add_argument("--pairs", default="depth", help="2:1,6:4,10:6 | depth (every source layer) | all")
    fit.add_argument("--method", default="affine", choices=["affine", "learned", "identity", "tuned-lens"])
    fit.add_argument(
        "--corpus", default=None, help="text file (default $PATCHSCOPE_DATA/wikitext-2/valid.txt)"
    )
    fit.add_argument("--max-words", type=int, default=20000, help="words read from the corpus (0 = all)")
    fit.add_argument("--registry", default=None)
    fit.add_argument("--if-missing", action="store_true", help="fit only pairs the registry lacks")
    fit.add_argument(
        "--vocab-words",
        type=int,
        default=20000,
        help="add up to N short training texts, each ending in a word both tokenizers have as one token "
        "(default 20000: every such word of the default pair; 0 = corpus only); see the README",
    )
    fit.add_argument("--exclude-words", default=None, help="file of words the vocabulary texts must not use")
    fit.add_argument(
        "--kl-weight",
        type=float,
        default=0.0,
        help="learned only: add W × KL between the target head's reading of true and mapped states",
    )
    fit.set_defaults(func=cmd_fit_mapping)

    from patchscope.eval.commands import add_parser as add_eval_parser

    add_eval_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from patchscope.engine.errors import PatchscopeError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (PatchscopeError, argparse.ArgumentTypeError, FileNotFoundError) as error:
        print(f"patchscope: error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # bad numbers in --layers / --position
        print(f"patchscope: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
