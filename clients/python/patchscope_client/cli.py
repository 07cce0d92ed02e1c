"""`patchscope-client`: call a patchscope service from the shell.

    patchscope-client --address 127.0.0.1:9000 explain "Barack Obama" --source smollm2-135m
        --target gemma3-270m --layers 0-12 [--json] [--html sweep.html] [--png sweep.png]

A live display follows the stream (sites started, tokens so far); then a table of layer → answer and
explanation with the mapping's R², the calibrated confidence ("-" without a calibrator) and "= unpatched"
beside a site whose answer is what the target says with nothing patched (its explanation says nothing
about the state). `--json` prints NDJSON: one object per line as it arrives (for explain, one per
finished site, with the keys of `patchscope explain --json` — unpatched_answer, same_as_unpatched,
patch_effect, dependence and confidence among them, None with `--no-controls` — its `site` index and the
`reproduction` record). Connection options go before or after the subcommand.

Exit codes: 0 success; 2 a usage error (bad flags, an unreadable file, a value the client rejects);
3 the server rejected the request (invalid argument, not found, quota or limit, authentication, an API
version this client cannot speak); 4 the server could not be reached in time (unavailable, deadline);
5 the server failed (internal error); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from patchscope_client import __version__, tensors
from patchscope_client.client import PatchscopeClient
from patchscope_client.errors import (
    CallError,
    DeadlineExceeded,
    IncompatibleServer,
    PatchscopeError,
    ServerError,
    Unavailable,
)
from patchscope_client.types import Finished, ResultTable, SiteResult, Token, collect

EXIT_USAGE, EXIT_REJECTED, EXIT_UNREACHABLE, EXIT_SERVER, EXIT_INTERRUPTED = 2, 3, 4, 5, 130
SAME_AS_UNPATCHED = "= unpatched"  # `patchscope explain` prints the same markers
SAME_AS_MEAN_STATE = "= mean state"  # with --mean-state-control, where the unpatched one does not apply


def int_list(spec: str) -> list[int]:
    """`0-12`, `1,3,5`, `-1` or `2-4,8`."""
    values: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        head, sep, tail = part[1:].partition("-")  # a leading '-' is a sign
        if sep:
            values.extend(range(int(part[0] + head), int(tail) + 1))
        else:
            values.append(int(part))
    return values


def _client(args: argparse.Namespace) -> PatchscopeClient:
    tls: bool | bytes | None = None
    if args.tls_ca:
        tls = Path(args.tls_ca).read_bytes()
    elif args.tls:
        tls = True
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together (mTLS)")
    cert = (Path(args.tls_cert).read_bytes(), Path(args.tls_key).read_bytes()) if args.tls_cert else None
    return PatchscopeClient(args.address, token=args.token, tls=tls, client_cert=cert, timeout=args.timeout)


def ndjson(record: object) -> None:
    print(json.dumps(record, ensure_ascii=False), flush=True)


def stream_json(events) -> ResultTable:
    """Print each finished site as one NDJSON line as it arrives; return the collected table."""
    seen, started = [], {}
    for event in events:
        seen.append(event)
        if isinstance(event, Finished):
            row = collect([started[event.site.index], event] if event.site.index in started else [event])
            ndjson({**row.rows[0].to_json(), "site": event.site.index, "reproduction": event.reproduction})
        elif not isinstance(event, Token):
            started[event.site.index] = event
    return collect(seen)


def _options(args: argparse.Namespace) -> dict:
    return {
        "preset": args.preset,
        "template": args.template,
        "target_layers": int_list(args.target_layers) if args.target_layers else None,
        "mapping": args.mapping,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop": tuple(args.stop or ()),
        "top_k": args.top_k,
        "controls": args.controls,
        "mean_state_control": args.mean_state_control,
    }


def _live_table(rows: dict[int, dict]) -> Table:
    table = Table(title="streaming", expand=False)
    for column in ("src", "tgt", "pos", "token", "so far", ""):
        table.add_column(column)
    for index in sorted(rows):
        r = rows[index]
        table.add_row(
            str(r["src"]), str(r["tgt"]), str(r["pos"]), repr(r["token"]), repr(r["text"]), r["state"]
        )
    return table


def follow(events, console: Console, quiet: bool) -> ResultTable:
    """Show the stream live (unless quiet or not a terminal) and return the collected table."""
    if quiet:
        return collect(events)
    seen = []
    rows: dict[int, dict] = {}
    with Live(_live_table(rows), console=console, transient=True) as live:
        for event in events:
            seen.append(event)
            s = event.site
            row = rows.setdefault(
                s.index,
                {
                    "src": s.source_layer,
                    "tgt": s.target_layer,
                    "pos": s.position,
                    "token": s.source_token,
                    "text": "",
                    "state": "started",
                },
            )
            if isinstance(event, Token):
                row["text"] += event.text
            elif isinstance(event, Finished):
                row["text"], row["state"] = event.explanation, "done"
            live.update(_live_table(rows))
    return collect(seen)


def control_cells(row: SiteResult) -> tuple[str, str]:
    """The confidence and control cells of a row: "-" where there is no value, the marker when equal."""
    c = row.control
    confidence = f"{c.confidence:.2f}" if c is not None and c.confidence is not None else "-"
    if c is None:
        return confidence, "-"
    if c.same_as_unpatched:
        return confidence, SAME_AS_UNPATCHED
    return confidence, SAME_AS_MEAN_STATE if c.same_as_mean_state else ""


def print_table(table: ResultTable, console: Console) -> None:
    out = Table()
    columns = ("src", "tgt", "pos", "source token", "answer", "R²", "conf.", "control", "explanation")
    for column in columns:
        out.add_column(column, justify="right" if column in ("src", "tgt", "pos", "R²", "conf.") else "left")
    for r in table.rows:
        r2 = f"{r.mapping_r2:.2f}" if r.mapping_r2 is not None else "-"
        confidence, marker = control_cells(r)
        out.add_row(
            str(r.site.source_layer),
            str(r.site.target_layer),
            str(r.site.position),
            repr(r.site.source_token),
            repr(r.answer),
            r2,
            confidence,
            marker,
            repr(r.explanation),
        )
    console.print(out)


def write_pictures(table: ResultTable, args: argparse.Namespace, title: str) -> None:
    from patchscope_client import render

    if args.html:
        Path(args.html).write_text(render.to_html(table, title), encoding="utf-8")
    if args.png:
        render.to_png(table, title, args.png)


def cmd_explain(args: argparse.Namespace, console: Console) -> int:
    with _client(args) as client:
        events = client.explain(
            args.source,
            args.prompt,
            int_list(args.layers),
            target=args.target,
            positions=int_list(args.positions),
            **_options(args),
        )
        table = stream_json(events) if args.json else follow(events, console, quiet=not console.is_terminal)
    title = f"{args.source} → {args.target}: {args.prompt!r} ({args.preset})"
    write_pictures(table, args, title)
    if not args.json:
        print_table(table, console)
    return 0


def cmd_models(args: argparse.Namespace, console: Console) -> int:
    with _client(args) as client:
        models = client.models()
    if args.json:
        for m in models:
            ndjson(m.__dict__)
        return 0
    table = Table()
    for column in ("id", "role", "layers", "hidden", "vocab", "parameters", "dtype", "ready"):
        table.add_column(column)
    for m in models:
        role = "+".join(r for r, on in (("source", m.source), ("target", m.target)) if on)
        table.add_row(
            m.id,
            role,
            str(m.num_layers),
            str(m.hidden_size),
            str(m.vocab_size),
            f"{m.num_parameters / 1e6:.0f}M",
            m.dtype,
            "yes" if m.ready else "no",
        )
    console.print(table)
    return 0


def cmd_mappings(args: argparse.Namespace, console: Console) -> int:
    with _client(args) as client:
        mappings = client.mappings(args.source or "", args.target or "")
    if args.json:
        for m in mappings:
            ndjson(m.__dict__)
        return 0
    table = Table()
    for column in ("id", "pair", "method", "R²", "R² per dim", "cosine", "pairs"):
        table.add_column(column)
    for m in mappings:
        table.add_row(
            m.id,
            f"{m.source_layer}→{m.target_layer}",
            m.method,
            f"{m.r2:.3f}",
            f"{m.r2_mean_dim:.3f}",
            f"{m.cosine:.3f}",
            str(m.num_pairs),
        )
    console.print(table)
    return 0


def cmd_extract(args: argparse.Namespace, console: Console) -> int:
    import numpy as np

    with _client(args) as client:
        result = client.extract(
            args.model, args.prompt, int_list(args.layers), int_list(args.positions), dtype=args.dtype
        )
    states = np.concatenate([layer.states for layer in result.layers])  # layer-major rows
    meta = {
        "model": result.model,
        "fingerprint": result.fingerprint,
        "layers": json.dumps([layer.layer for layer in result.layers for _ in layer.positions]),
        "positions": json.dumps([p for layer in result.layers for p in layer.positions]),
        "tokens": json.dumps([result.tokens[p] for layer in result.layers for p in layer.positions]),
    }
    Path(args.out).write_bytes(tensors.encode(states, metadata=meta))
    console.print(f"wrote {states.shape[0]} states × {states.shape[1]} to {args.out} ({result.model})")
    return 0


def cmd_explain_activations(args: argparse.Namespace, console: Console) -> int:
    data = Path(args.file).read_bytes()
    meta = tensors.metadata(data)
    states = tensors.decode(data)
    layers = int_list(args.layers) if args.layers else json.loads(meta.get("layers", "[]"))
    if not layers:
        raise PatchscopeError(f"{args.file} names no layers in its metadata: pass --layers")
    with _client(args) as client:
        events = client.explain_activations(
            states,
            source=args.source,
            layers=layers,
            target=args.target,
            positions=json.loads(meta.get("positions", "[]")),
            tokens=json.loads(meta.get("tokens", "[]")),
            model=meta.get("model", ""),
            fingerprint=meta.get("fingerprint", ""),
            **_options(args),
        )
        table = stream_json(events) if args.json else follow(events, console, quiet=not console.is_terminal)
    write_pictures(table, args, f"{args.file} via {args.source} → {args.target}")
    if not args.json:
        print_table(table, console)
    return 0


def _generation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="target model id (same as --source for same-model)")
    p.add_argument("--preset", default="identity", help="identity | description | attribute | logit-lens")
    p.add_argument("--template", default=None, help="custom target prompt; {} marks the placeholder")
    p.add_argument("--target-layers", default=None, help="one layer, or one per source layer")
    p.add_argument("--mapping", default="auto", help="'auto' or a mapping id")
    p.add_argument("--max-new-tokens", type=int, default=10, help="tokens generated per site (default 10)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when temperature > 0")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible with temperature > 0)")
    p.add_argument(
        "--stop", action="append", metavar="TEXT", help="end a row when its text contains TEXT (repeatable)"
    )
    p.add_argument("--top-k", type=int, default=5, help="(token, probability) pairs kept for logit-lens")
    p.add_argument(
        "--no-controls",
        dest="controls",
        action="store_false",
        help="skip the unpatched control row: no unpatched_answer, same_as_unpatched, patch_effect, "
        "dependence or confidence (they print as null / '-')",
    )
    p.add_argument(
        "--mean-state-control",
        action="store_true",
        help="also patch each target layer's mean state in a row of its own: mean_state_answer and "
        "same_as_mean_state (needs the controls; a 1.3 server)",
    )
    _json_flag(p, "one JSON object per finished site, as it arrives (NDJSON), with its reproduction record")
    p.add_argument("--html", default=None, help="write the sweep as a self-contained HTML grid")
    p.add_argument("--png", default=None, help="write the sweep as a PNG grid (needs [png])")


def _json_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true", help=f"print {what}")


def _connection_flags(p: argparse.ArgumentParser, defaults: bool) -> None:
    """On the main parser with defaults, on each subcommand with defaults suppressed: either place works."""

    def d(value):
        return value if defaults else argparse.SUPPRESS

    p.add_argument(
        "--address",
        default=d(os.environ.get("PATCHSCOPE_ADDRESS", "127.0.0.1:9000")),
        help="host:port of the service (or $PATCHSCOPE_ADDRESS; default 127.0.0.1:9000)",
    )
    p.add_argument(
        "--token", default=d(os.environ.get("PATCHSCOPE_TOKEN")), help="bearer token (or $PATCHSCOPE_TOKEN)"
    )
    p.add_argument(
        "--tls", action="store_true", default=d(False), help="TLS with the system's root certificates"
    )
    p.add_argument("--tls-ca", default=d(None), help="TLS with this PEM root certificate")
    p.add_argument(
        "--tls-cert", default=d(None), help="PEM client certificate chain for mTLS (with --tls-key)"
    )
    p.add_argument("--tls-key", default=d(None), help="PEM private key of --tls-cert")
    p.add_argument(
        "--timeout", type=float, default=d(300.0), help="deadline of each call, retries included (s)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patchscope-client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"patchscope-client {__version__}")
    _connection_flags(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True, help="what to do (each takes --help)")
    _add = sub.add_parser

    def add_parser(*args, **kwargs):
        command = _add(*args, **kwargs)
        _connection_flags(command, defaults=False)
        return command

    sub.add_parser = add_parser

    ex = sub.add_parser("explain", help="explain a prompt's states at layers × positions")
    ex.add_argument("prompt", help="the source prompt")
    ex.add_argument("--source", required=True, help="source model id")
    ex.add_argument("--layers", required=True, help="source layers: 0-12, 1,3,5")
    ex.add_argument(
        "--positions", "--position", default="-1", help="source positions, BOS counted (default -1)"
    )
    _generation_flags(ex)
    ex.set_defaults(func=cmd_explain)

    models = sub.add_parser("models", help="hosted models")
    _json_flag(models, "one JSON object per model (NDJSON)")
    models.set_defaults(func=cmd_models)

    maps = sub.add_parser("mappings", help="registered mappings with held-out metrics")
    maps.add_argument("--source", default=None, help="only mappings from this source model")
    maps.add_argument("--target", default=None, help="only mappings into this target model")
    _json_flag(maps, "one JSON object per mapping (NDJSON)")
    maps.set_defaults(func=cmd_mappings)

    ext = sub.add_parser("extract", help="save a prompt's states as one safetensors file")
    ext.add_argument("prompt", help="the prompt to run")
    ext.add_argument("--model", required=True, help="hosted source model id")
    ext.add_argument("--layers", required=True, help="layers: 0-12, 1,3,5")
    ext.add_argument("--positions", default="-1", help="positions, BOS counted (default -1)")
    ext.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="wire dtype of the states",
    )
    ext.add_argument("--out", required=True, help="safetensors file to write")
    ext.set_defaults(func=cmd_extract)

    act = sub.add_parser("explain-activations", help="explain states from a safetensors file (see extract)")
    act.add_argument("file", help="safetensors file written by extract (or with the same metadata)")
    act.add_argument("--source", required=True, help="hosted model with the states' architecture")
    act.add_argument("--layers", default=None, help="each row's layer (default: the file's metadata)")
    _generation_flags(act)
    act.set_defaults(func=cmd_explain_activations)
    return parser


def exit_code(error: BaseException) -> int:
    """The documented exit code of a failure (module docstring)."""
    if isinstance(error, Unavailable | DeadlineExceeded):
        return EXIT_UNREACHABLE
    if isinstance(error, ServerError):
        return EXIT_SERVER
    if isinstance(error, CallError | IncompatibleServer):
        return EXIT_REJECTED
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=False)
    try:
        return args.func(args, console)
    except (PatchscopeError, ValueError, OSError) as error:
        print(f"patchscope-client: error: {error}", file=sys.stderr)
        return exit_code(error)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
