"""The service's spans inside Ray Serve's own traces, on a Serve instance with tracing on.

A child process (its own Ray instance: in the suite this process may hold the service's cluster) starts
Serve with `tracing_config` and its default exporter (spans as JSON in the session's log directory), and
deploys two deployments that call each other the way the Explainer calls SourceModel and TargetModel:
a source call inside `patchscope.source_pass`, then a streamed generation under prefill and decode.
"""

from __future__ import annotations

import pytest

from patchscope.serve import tracing
from patchscope.serve.local import free_port
from tests.integration.ray_child import run_ray_child

pytestmark = pytest.mark.ray
pytest.importorskip("opentelemetry.sdk.trace", reason="OpenTelemetry SDK not installed")

CHILD = r"""
import glob, json, sys, time, urllib.request
import ray
from ray import serve
from ray.serve.schema import TracingConfig

temp_dir, port = sys.argv[1], int(sys.argv[2])
ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir)
serve.start(http_options={"port": port}, tracing_config=TracingConfig(enabled=True, sampling_ratio=1.0))

@serve.deployment
class Model:
    async def extract(self, x: int) -> int:
        return x + 1

    async def generate(self, n: int):
        for i in range(n):
            yield i

@serve.deployment
class Ingress:
    def __init__(self, model):
        self.model = model

    async def __call__(self, request) -> str:
        from patchscope.serve import tracing
        with tracing.span(tracing.SOURCE_PASS, source="s", sites=2):
            await self.model.extract.remote(1)
        with tracing.span(tracing.MAP, source="s", target="t", identity=True):
            pass
        spans = tracing.generation(target="t", sites=2, rows=3)
        async with spans:
            async for _ in self.model.options(stream=True).generate.remote(4):
                spans.tokens(1)
        return "ok"

serve.run(Ingress.bind(Model.bind()), route_prefix="/")
reply = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=120).read().decode()
serve.shutdown()  # flushes the exporters
spans, decoder = [], json.JSONDecoder()
for path in glob.glob(f"{temp_dir}/session_latest/logs/serve/spans/*"):
    text, i = open(path).read(), 0
    while rest := text[i:].lstrip():
        span, i = decoder.raw_decode(text, len(text) - len(rest))
        spans.append({"name": span["name"], "id": span["context"]["span_id"], "parent": span["parent_id"],
                      "trace": span["context"]["trace_id"], "attributes": span["attributes"]})
print(json.dumps({"reply": reply, "spans": spans}))
ray.shutdown()
"""


def test_the_stage_spans_join_serves_trace_and_parent_the_calls_made_inside_them():
    result = run_ray_child(CHILD, str(free_port()), prefix="ray-tr-", timeout_s=400)
    assert result["reply"] == "ok"
    spans = result["spans"]
    by_id = {s["id"]: s for s in spans}
    named = {s["name"]: s for s in spans if s["name"] in tracing.SPANS}
    assert set(named) == set(tracing.SPANS)
    (ingress,) = [s for s in spans if s["name"].startswith("replica_handle_request Ingress")]
    assert {s["parent"] for s in named.values()} == {ingress["id"]}, "under Serve's span of the call"
    assert {s["trace"] for s in named.values()} == {ingress["trace"]}
    routed = [s for s in spans if s["name"].startswith("route_to_replica") and "extract" in s["name"]]
    assert [by_id[s["parent"]]["name"] for s in routed] == [tracing.SOURCE_PASS]
    assert named[tracing.DECODE]["attributes"]["patchscope.tokens"] == 4
    assert named[tracing.PREFILL]["attributes"]["patchscope.rows"] == 3
