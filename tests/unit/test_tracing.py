"""Tracing: the span helpers are no-ops without OpenTelemetry, and the pipeline emits its named spans.

Spans are collected by OpenTelemetry's in-memory exporter on a provider of the test's own (the global
provider can be set once per process, and Ray Serve sets it in its own processes); the pipeline runs on
the tiny llama in process, the same `Pipeline` the Explainer replica runs.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys

import pytest

from patchscope.explain.local import LocalBackend, explain
from patchscope.explain.request import ExplainRequest, TargetSpec
from patchscope.serve import tracing

sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="OpenTelemetry SDK not installed")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402


@pytest.fixture
def spans(monkeypatch):
    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "tracer", lambda: provider.get_tracer(tracing.TRACER))
    return exporter


def without_opentelemetry(monkeypatch):
    """A fresh copy of serve/tracing.py imported where `import opentelemetry` fails."""
    for name in [m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    spec = importlib.util.spec_from_file_location("tracing_without_otel", tracing.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_opentelemetry_every_helper_is_a_no_op(monkeypatch):
    bare = without_opentelemetry(monkeypatch)
    assert not bare.enabled()
    with bare.span(bare.SOURCE_PASS, source="m") as current:
        assert current is None
    with bare.generation(target="m", rows=2) as generation:
        generation.tokens(3)
    with pytest.raises(ImportError, match=r"patchscope\[tracing\]"):
        bare.otlp_span_processors()


def test_an_error_inside_a_span_ends_it_with_status_error(spans):
    with pytest.raises(ValueError), tracing.span(tracing.MAP, target="t"):
        raise ValueError("bad")
    (span,) = spans.get_finished_spans()
    assert span.name == tracing.MAP and span.status.status_code.name == "ERROR"
    assert span.attributes["patchscope.target"] == "t"


def test_prefill_ends_at_the_first_token_and_decode_counts_the_rest(spans):
    with tracing.span("parent"), tracing.generation(target="t", rows=3) as generation:
        generation.tokens(0)  # a step without a token: still prefill
        generation.tokens(3)
        generation.tokens(2)
    prefill, decode, parent = spans.get_finished_spans()
    assert [prefill.name, decode.name] == [tracing.PREFILL, tracing.DECODE]
    assert prefill.end_time <= decode.start_time
    assert decode.attributes["patchscope.tokens"] == 5 and decode.attributes["patchscope.rows"] == 3
    assert prefill.parent.span_id == decode.parent.span_id == parent.context.span_id


def test_a_caller_who_leaves_ends_the_open_span_without_an_error(spans):
    async def main():
        async with tracing.generation(target="t") as generation:
            generation.tokens(1)
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(main())
    _, decode = spans.get_finished_spans()
    assert decode.status.status_code.name == "UNSET"


def test_an_explain_emits_source_pass_map_prefill_and_decode(spans, llama, llama_runtime):
    request = ExplainRequest(
        source="tiny-llama",
        prompt="The river runs past the mill",
        layers=(1, 2),
        target=TargetSpec("tiny-llama"),
    )
    result = explain(LocalBackend([llama], [llama_runtime]), request)
    finished = {s.name: s for s in spans.get_finished_spans()}
    assert list(finished) == list(tracing.SPANS)
    assert finished[tracing.SOURCE_PASS].attributes["patchscope.source"] == "tiny-llama"
    assert finished[tracing.MAP].attributes["patchscope.identity"] is True
    decode = finished[tracing.DECODE].attributes
    assert decode["patchscope.sites"] == len(result.results) == 2
    assert decode["patchscope.rows"] == 3, "two sites and the unpatched control"
    assert decode["patchscope.tokens"] > 0


def test_the_otlp_exporter_passes_ray_serves_own_checks():
    pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc", reason="the tracing extra is not installed")
    from ray.serve._private.tracing_utils import (
        _validate_tracing_exporter,
        _validate_tracing_exporter_processors,
    )
    from ray.serve.schema import TracingConfig

    _validate_tracing_exporter(tracing.otlp_span_processors)
    processors = tracing.otlp_span_processors()
    _validate_tracing_exporter_processors(processors)
    for processor in processors:
        processor.shutdown()
    config = TracingConfig(exporter_import_path="patchscope.serve.tracing:otlp_span_processors", enabled=True)
    assert config.sampling_ratio <= 1.0
