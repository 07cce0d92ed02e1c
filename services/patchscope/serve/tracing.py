"""OpenTelemetry spans for an explanation's stages, carried by Ray Serve's own tracing.

Ray Serve traces each gRPC call at its proxy and each call a replica handles, and passes the trace
context along deployment handles. It is on when the Serve config has a `tracing_config` (or every Ray
process has `RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH`): each Serve process then installs a
TracerProvider whose span processors come from that import path, and `otlp_span_processors` here sends
them to an OTLP collector (`OTEL_EXPORTER_OTLP_ENDPOINT`). docs/guide.md, "Observability", has the config.

The spans here start under whichever span is current. In the Explainer that is Serve's span of the call,
so a trace reads: proxy → Explainer → `patchscope.source_pass` (the SourceModel call made inside it is
its child) → `patchscope.map` → `patchscope.prefill` → `patchscope.decode`, with model ids, layers,
sites, rows and tokens as attributes — never a prompt or an activation.

Prefill and decode are measured where the pipeline sees them: prefill from the generation request to its
first token (queueing on the target included), decode from there to the stream's end. They are not made
current, because the pipeline yields events while they are open and a context attached across a
`yield` would leak into its consumer.

Without OpenTelemetry installed every helper does nothing; with it installed but no TracerProvider set
(tracing off, the CLI in process) OpenTelemetry's default hands out spans that record nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

try:
    from opentelemetry import trace
except ImportError:  # the `tracing` extra is not installed: spans are no-ops
    trace = None

TRACER = "patchscope"
SOURCE_PASS = "patchscope.source_pass"
MAP = "patchscope.map"
PREFILL = "patchscope.prefill"
DECODE = "patchscope.decode"
SPANS = (SOURCE_PASS, MAP, PREFILL, DECODE)
INSTALL = "pip install 'patchscope[tracing]'"

Attribute = str | int | float | bool | Sequence[int] | Sequence[str] | None


def enabled() -> bool:
    """Whether OpenTelemetry is importable (spans may still record nothing: no provider set)."""
    return trace is not None


def tracer() -> Any:
    """The tracer of the current TracerProvider, looked up at each use: Serve sets the provider late."""
    return trace.get_tracer(TRACER)


def attributes(values: dict[str, Attribute]) -> dict[str, Any]:
    """Span attributes under `patchscope.`, without the unset ones (OpenTelemetry warns on None)."""
    return {
        f"patchscope.{key}": value if isinstance(value, str | int | float | bool) else list(value)
        for key, value in values.items()
        if value is not None
    }


@contextlib.contextmanager
def span(name: str, **values: Attribute) -> Iterator[Any]:
    """A current span around a block without a `yield` inside; errors end it with status ERROR."""
    if trace is None:
        yield None
        return
    with tracer().start_as_current_span(name, attributes=attributes(values)) as current:
        yield current


class Generation:
    """The prefill and decode spans of one patched generation, as the pipeline sees its stream.

    Opened on construction; `tokens` is told every step's token count, and the first step with a token
    ends prefill and opens decode. Used as a context manager (plain or async, to sit beside the stream's
    `aclosing`) it ends whichever span is open, however the block ends.
    """

    def __init__(self, **values: Attribute) -> None:
        self.values = values
        self.generated = 0
        self._prefill = self._start(PREFILL) if trace is not None else None
        self._decode: Any = None

    def _start(self, name: str) -> Any:
        return tracer().start_span(name, attributes=attributes(self.values))

    def tokens(self, count: int) -> None:
        self.generated += count
        if count and self._prefill is not None:
            self._prefill.end()
            self._prefill = None
            self._decode = self._start(DECODE)

    def close(self, error: BaseException | None = None) -> None:
        """End whichever span is open; with `error`, mark it failed (not for a caller who left)."""
        for open_span in (self._prefill, self._decode):
            if open_span is None:
                continue
            open_span.set_attribute("patchscope.tokens", self.generated)
            if error is not None:
                open_span.record_exception(error)
                open_span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))
            open_span.end()
        self._prefill = self._decode = None

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: object) -> None:
        self.close(error if isinstance(error, Exception) else None)

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: object
    ) -> None:
        self.close(error if isinstance(error, Exception) else None)


def generation(**values: Attribute) -> Generation:
    """The spans of a patched generation about to be requested, with `values` as their attributes."""
    return Generation(**values)


def otlp_span_processors() -> list[Any]:
    """Ray Serve's `tracing_config.exporter_import_path`: spans batched to an OTLP collector over gRPC.

    Serve calls it with no arguments in each of its processes; the exporter reads the standard
    `OTEL_EXPORTER_OTLP_*` variables (endpoint, headers, TLS), so the config names only this function.
    """
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as error:
        raise ImportError(f"tracing to an OTLP collector needs the tracing extra: {INSTALL}") from error
    return [BatchSpanProcessor(OTLPSpanExporter())]
