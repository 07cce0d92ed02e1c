"""The service's metrics: the queued-rows gauge back at 0, rejections counted by reason, names by convention.

The gauge is read from TargetModel.generate itself (its deployment class built around a real batcher on a
tiny model, without Ray), the rejection counter through the servicer's own error path; the Ray metric
objects are swapped for recorders, so what is checked is what the code hands Ray.
"""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from patchscope.engine.errors import InvalidArgument, ModelNotFound
from patchscope.engine.generation import GenerationConfig
from patchscope.engine.hooks import extract
from patchscope.engine.streaming import GenerateRequest
from patchscope.explain.local import LocalBackend
from patchscope.mapping.registry import MappingNotFound
from patchscope.serve import metrics as service_metrics
from patchscope.serve import status
from patchscope.serve.batching import QueueFull
from patchscope.serve.config import ServiceConfig
from patchscope.serve.metrics import DECLARED, ServiceMetrics, exposed_names
from patchscope.serve.quotas import QuotaExceeded
from patchscope.serve.servicer import NoMetrics, Servicer
from patchscope.serve.target import TargetModel, make_batcher
from patchscope.wire import pb

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide.md"
BASE = {"sources": ["tiny-llama"], "targets": ["tiny-llama"], "auth": {"required": False}}
TEMPLATE = "cat -> cat\n1135 -> 1135\nhello -> hello\n{}"


class Recorder:
    """Stands in for a Ray metric: keeps every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, dict]] = []

    def set(self, value, tags=None) -> None:
        self.calls.append(("set", value, tags or {}))

    def inc(self, value=1, tags=None) -> None:
        self.calls.append(("inc", value, tags or {}))

    def observe(self, value, tags=None) -> None:
        self.calls.append(("observe", value, tags or {}))

    def values(self) -> list[float]:
        return [value for _, value, _ in self.calls]


class Hosted:
    def __init__(self, model) -> None:
        self._model = model

    def model(self, model_id: str):
        if model_id != self._model.id:
            raise ModelNotFound(model_id, [self._model.id])
        return self._model


@pytest.fixture(params=[True, False], ids=["continuous", "per-template"])
def target(request, llama_runtime):
    """A TargetModel replica's object over the tiny llama, its queued-rows gauge recorded."""
    config = ServiceConfig.model_validate({**BASE, "batching": {"continuous": request.param}})
    cls = TargetModel.func_or_class
    replica = cls.__new__(cls)
    with ThreadPoolExecutor(1) as executor:
        replica.hosted = Hosted(llama_runtime.model)
        replica.config = config
        replica.executor = executor
        replica.metrics = ServiceMetrics()
        replica.metrics._queue = gauge = Recorder()
        replica.runtimes = {"tiny-llama": llama_runtime}
        replica.batcher = make_batcher(config, replica.runtimes, executor, replica.metrics.batch)
        yield replica, gauge


def generate_request(llama, max_new_tokens: int = 6) -> GenerateRequest:
    hidden = extract(llama, "The river runs past the old mill", [1, 2], [1, -1])
    vectors = list(hidden.states.reshape(-1, hidden.states.shape[-1]))  # 4 rows
    return GenerateRequest(
        "tiny-llama", TEMPLATE, "?", [1, 2, 1, 2], vectors, GenerationConfig(max_new_tokens=max_new_tokens)
    )


def test_the_queued_rows_gauge_returns_to_zero_when_a_request_finishes(target, llama):
    replica, gauge = target

    async def main():
        steps = [events async for events in replica.generate(generate_request(llama))]
        return steps

    steps = asyncio.run(main())
    assert steps and any(e.finished for e in steps[-1])
    assert gauge.values()[0] == 4, "the rows are counted in as the request arrives"
    assert gauge.values()[-1] == 0 and replica.batcher.queued_rows == 0


def test_the_queued_rows_gauge_returns_to_zero_when_the_caller_leaves_or_is_cancelled(target, llama):
    replica, gauge = target

    async def leave():
        stream = replica.generate(generate_request(llama, max_new_tokens=32))
        await anext(stream)
        assert gauge.values()[-1] == 4
        await stream.aclose()

    async def cancelled():
        first = asyncio.Event()

        async def consume():
            async for _ in replica.generate(generate_request(llama, max_new_tokens=32)):
                first.set()

        task = asyncio.ensure_future(consume())
        started = asyncio.ensure_future(first.wait())
        await asyncio.wait([task, started], return_when=asyncio.FIRST_COMPLETED)
        assert started.done(), f"the request ended before its first step: {task}"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(leave())
    assert gauge.values()[-1] == 0
    asyncio.run(cancelled())
    assert gauge.values()[-1] == 0 and replica.batcher.queued_rows == 0


def test_the_queued_rows_gauge_is_put_back_when_the_target_refuses_a_request(target, llama):
    replica, gauge = target
    replica.batcher.max_queued_rows = 2  # the request's 4 rows are over it: QUEUE_FULL at once

    async def main():
        async for _ in replica.generate(generate_request(llama)):
            pass

    with pytest.raises(QueueFull):
        asyncio.run(main())
    assert gauge.values()[-1] == 0


@pytest.fixture
def rejections(monkeypatch):
    counter = Recorder()
    monkeypatch.setattr(service_metrics.rejections, "_counter", counter)
    return counter


class Context:
    def __init__(self) -> None:
        self.code = None

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, metadata) -> None: ...

    def invocation_metadata(self):
        return []

    def request_id(self) -> str:
        return "test-request"


def test_a_rejected_call_counts_once_with_its_code_reason_and_field(rejections, llama, llama_runtime):
    config = ServiceConfig.model_validate(BASE)
    servicer = Servicer(LocalBackend([llama], [llama_runtime]), config, metrics=NoMetrics())
    request = pb.ExplainRequest(
        source="tiny-llama", prompt="The river", layers=[99], target=pb.TargetSpec(model="tiny-llama")
    )
    context = Context()

    async def main():
        async for _ in servicer.Explain(request, context):
            pass

    with pytest.raises(InvalidArgument):
        asyncio.run(main())
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert rejections.calls == [
        ("inc", 1, {"code": "INVALID_ARGUMENT", "reason": "invalid_argument", "field": "layers"})
    ]


@pytest.mark.parametrize(
    ("error", "code", "reason"),
    [
        (QueueFull("target model queue is full"), "RESOURCE_EXHAUSTED", "queue_full"),
        (QuotaExceeded("over 1 request per minute; retry in 2 s"), "RESOURCE_EXHAUSTED", "quota"),
        (status.Unauthenticated("no token"), "UNAUTHENTICATED", "unauthenticated"),
        (ModelNotFound("nope", ["tiny-llama"]), "NOT_FOUND", "model_not_found"),
        (MappingNotFound("nope"), "NOT_FOUND", "mapping_not_found"),
        (RuntimeError("secret detail 0xdeadbeef"), "INTERNAL", "internal"),
    ],
)
def test_each_error_class_counts_under_its_own_reason_never_its_message(rejections, error, code, reason):
    assert status.status_of(error)[0].name == code
    assert rejections.calls == [("inc", 1, {"code": code, "reason": reason, "field": ""})]


@given(st.text(max_size=40))
def test_the_field_label_stays_in_a_closed_set_whatever_the_field_says(field):
    assert status.field_label(field) in status.REQUEST_FIELDS | {status.OTHER_FIELD}


def test_field_labels_drop_indices_and_keep_at_most_two_names_of_the_request():
    assert status.field_label("target.generation.max_new_tokens") == "target.generation"
    assert status.field_label("layers[3]") == "layers"
    assert status.field_label("vectors[0].shape") == "other"  # an internal name, not the API's


def test_every_reason_in_the_table_is_a_short_snake_case_word():
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", r) for r in status.REASONS)
    assert {r.code for r in status.RULES} <= set(grpc.StatusCode)


def test_metric_names_follow_prometheus_conventions():
    names = [spec.name for spec in DECLARED]
    assert len(set(names)) == len(names)
    for spec in DECLARED:
        assert re.fullmatch(r"patchscope(_[a-z]+)+", spec.name), spec.name
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        assert not re.search(r"_(s|ms|us|secs?|millis|milliseconds)$", spec.name), "units spelled out"
        if re.search(r"time|latency|duration", spec.name):
            assert spec.name.endswith("_seconds"), spec.name
        assert spec.kind != "histogram" or list(spec.boundaries) == sorted(set(spec.boundaries))
        assert not set(spec.tags) & {"deployment", "replica", "application", "route"}, "Serve's own tags"
        assert not set(spec.tags) & {"prompt", "text", "message", "error", "request_id"}, "unbounded"


def test_every_declared_metric_builds_without_a_running_ray():
    ServiceMetrics().queue_rows(0)
    for spec in DECLARED:
        assert spec.build() is not None


def test_the_guide_lists_every_exposed_name():
    guide = GUIDE.read_text(encoding="utf-8")
    missing = [name for spec in DECLARED for name in exposed_names(spec) if f"`{name}`" not in guide]
    assert not missing, f"docs/guide.md's Observability table lacks {missing}"
