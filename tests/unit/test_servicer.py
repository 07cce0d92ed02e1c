"""The servicer without Ray: status codes, streaming order and cancellation, over tiny in-process models.

The backend is the pipeline's in-process one (real engine calls on tiny random models) with the card
listing the Ray backend adds; the context records what the servicer sets on it, as Serve's would.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from patchscope.engine.errors import PatchscopeError
from patchscope.explain.local import LocalBackend
from patchscope.serve.config import ServiceConfig
from patchscope.serve.hosting import warm_up
from patchscope.serve.servicer import NoMetrics, Servicer
from patchscope.wire import encode_tensor, pb

CONFIG = {"sources": ["tiny-llama"], "targets": ["tiny-llama"], "auth": {"required": False}}


class CountingBackend(LocalBackend):
    """The in-process backend, counting model work and noticing when a token stream is closed early."""

    def __init__(self, models, runtimes) -> None:
        super().__init__(models, runtimes)
        self.model_calls = 0
        self.closed_streams = 0
        self._cards = ({m.id: warm_up(m) for m in models}, {r.model.id: warm_up(r.model) for r in runtimes})

    async def cards(self):
        return self._cards

    async def source_card(self, model_id):
        await self.source_info(model_id)
        return self._cards[0][model_id]

    async def extract(self, *args):
        self.model_calls += 1
        return await super().extract(*args)

    async def generate(self, request):
        self.model_calls += 1
        finished = False
        try:
            async for events in super().generate(request):
                yield events
            finished = True
        finally:
            self.closed_streams += not finished


class Context:
    """What Serve's gRPC context offers the servicer."""

    def __init__(self, metadata=()) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.metadata = list(metadata)

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing = metadata

    def invocation_metadata(self):
        return self.metadata

    def request_id(self) -> str:
        return "test-request"


@pytest.fixture
def service(llama, llama_runtime):
    backend = CountingBackend([llama], [llama_runtime])
    return Servicer(backend, ServiceConfig.model_validate(CONFIG), metrics=NoMetrics()), backend


def explain_request(**target) -> pb.ExplainRequest:
    spec = pb.TargetSpec(model="tiny-llama", generation=pb.GenerationOptions(max_new_tokens=4), **target)
    return pb.ExplainRequest(
        source="tiny-llama", prompt="The river runs past the mill", layers=[1, 2], target=spec
    )


def run_stream(stream, stop_after: int | None = None) -> list:
    async def go():
        out = []
        async for message in stream:
            out.append(message)
            if stop_after is not None and len(out) >= stop_after:
                await stream.aclose()
                break
        return out

    return asyncio.run(go())


def test_explain_streams_started_then_tokens_then_one_finished_per_site(service):
    servicer, _ = service
    context = Context()
    events = run_stream(servicer.Explain(explain_request(), context))
    kinds = [e.WhichOneof("event") for e in events]
    assert context.code is None
    assert kinds[:2] == ["started", "started"]
    finished = [e for e in events if e.HasField("finished")]
    assert sorted(e.site.index for e in finished) == [0, 1]
    for f in finished:
        tokens = "".join(e.token.text for e in events if e.HasField("token") and e.site.index == f.site.index)
        assert f.finished.explanation == tokens
        assert f.finished.reproduction.request_id == "test-request"
        assert f.finished.reproduction.preset == "identity"
    assert [e.site.source_layer for e in events[:2]] == [1, 2]


@pytest.mark.parametrize(
    ("request_", "code", "field"),
    [
        (
            pb.ExplainRequest(
                source="nope", prompt="x", layers=[0], target=pb.TargetSpec(model="tiny-llama")
            ),
            grpc.StatusCode.NOT_FOUND,
            "tiny-llama",
        ),
        (
            explain_request().__class__(
                source="tiny-llama", prompt="x", layers=[99], target=pb.TargetSpec(model="tiny-llama")
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "layers",
        ),
        (explain_request(template="{}" + "x" * 5000), grpc.StatusCode.INVALID_ARGUMENT, "target.template"),
        (explain_request(template="no placeholder"), grpc.StatusCode.INVALID_ARGUMENT, "template"),
        (explain_request(top_k=10_000), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
        (explain_request(preset="nope"), grpc.StatusCode.INVALID_ARGUMENT, "preset"),
        (
            pb.ExplainRequest(
                source="tiny-llama",
                prompt="a b",
                layers=[0],
                positions=[40],
                target=pb.TargetSpec(model="tiny-llama"),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "positions",
        ),
        (
            pb.ExplainRequest(
                source="tiny-llama",
                prompt="word " * 3000,
                layers=[0],
                target=pb.TargetSpec(model="tiny-llama"),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "prompt",
        ),
    ],
)
def test_bad_explain_is_refused_with_its_field_before_any_model_runs(service, request_, code, field):
    servicer, backend = service
    context = Context()
    with pytest.raises(PatchscopeError):
        run_stream(servicer.Explain(request_, context))
    assert context.code == code
    assert field in context.details
    assert backend.model_calls == 0


def test_a_caller_leaving_mid_stream_closes_the_target_stream(service):
    servicer, backend = service
    run_stream(servicer.Explain(explain_request(), Context()), stop_after=3)
    assert backend.closed_streams == 1
    # and the servicer keeps serving
    assert run_stream(servicer.Explain(explain_request(), Context()))


def test_activations_of_the_wrong_width_are_invalid(service, llama):
    servicer, backend = service
    import torch

    request = pb.ExplainActivationsRequest(
        source="tiny-llama",
        safetensors=encode_tensor(torch.zeros(2, llama.facts.hidden_size + 1)),
        provenance=pb.Provenance(layers=[1]),
        target=pb.TargetSpec(model="tiny-llama"),
    )
    context = Context()
    with pytest.raises(PatchscopeError):
        run_stream(servicer.ExplainActivations(request, context))
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT and "safetensors.shape" in context.details
    assert backend.model_calls == 0


def test_long_provenance_tokens_are_refused(service, llama):
    servicer, _ = service
    import torch

    request = pb.ExplainActivationsRequest(
        source="tiny-llama",
        safetensors=encode_tensor(torch.zeros(1, llama.facts.hidden_size)),
        provenance=pb.Provenance(layers=[1], tokens=["x" * 100_000]),
        target=pb.TargetSpec(model="tiny-llama"),
    )
    context = Context()
    with pytest.raises(PatchscopeError):
        run_stream(servicer.ExplainActivations(request, context))
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT and "provenance.tokens[0]" in context.details


def test_extract_with_too_many_layers_is_refused_before_the_source_runs(service):
    servicer, backend = service
    context = Context()
    request = pb.ExtractHiddenStatesRequest(model="tiny-llama", prompt="hello there", layers=[0] * 2000)
    with pytest.raises(PatchscopeError):
        run_stream(servicer.ExtractHiddenStates(request, context))
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT and "layers" in context.details
    assert backend.model_calls == 0


def test_without_a_token_a_protected_service_is_unauthenticated(llama, llama_runtime, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("secret-token\n")
    config = ServiceConfig.model_validate({**CONFIG, "auth": {"tokens_file": str(tokens)}})
    servicer = Servicer(CountingBackend([llama], [llama_runtime]), config, metrics=NoMetrics())
    context = Context()
    with pytest.raises(PatchscopeError):
        asyncio.run(servicer.ListModels(pb.ListModelsRequest(), context))
    assert context.code == grpc.StatusCode.UNAUTHENTICATED
    ok = Context([("authorization", "Bearer secret-token")])
    listed = asyncio.run(servicer.ListModels(pb.ListModelsRequest(), ok))
    assert [m.id for m in listed.models] == ["tiny-llama"]


def test_finished_events_carry_the_control_and_can_go_without(service):
    servicer, _ = service
    events = run_stream(servicer.Explain(explain_request(), Context()))
    finished = [e.finished for e in events if e.HasField("finished")]
    assert all(f.HasField("control") and f.control.HasField("patch_effect") for f in finished)
    assert all(0.0 <= f.control.patch_effect <= 1.0 and f.control.HasField("dependence") for f in finished)
    assert all(not f.control.HasField("confidence") and f.control.calibrator_id == "" for f in finished)
    off = run_stream(servicer.Explain(explain_request(controls=False), Context()))
    assert not any(e.finished.HasField("control") for e in off if e.HasField("finished"))


class FakeMethod:
    """A deployment handle's method: `.remote(...)` gives an awaitable result, and calls are counted."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.calls = 0

    def remote(self, *args):
        self.calls += 1

        async def result():
            await asyncio.sleep(0)  # concurrent callers overlap at this await
            value = self.answer(*args)
            if isinstance(value, BaseException):
                raise value
            return value

        return result()


class FakeHandle:
    def __init__(self, **methods) -> None:
        self.__dict__.update({name: FakeMethod(answer) for name, answer in methods.items()})

    def options(self, **_):
        return self


def test_the_ingress_tokenizes_with_the_sources_own_tokenizer_fetched_once(llama):
    from patchscope.serve.ingress import IngressBackend
    from patchscope.serve.source import prompt_tokens

    card = warm_up(llama)
    failures = [RuntimeError("replica restarting")]  # the first fetch fails, the next one is retried
    source = FakeHandle(
        list_cards=lambda: [card],
        tokenizer=lambda model_id: failures.pop() if failures else llama.tokenizer,
    )
    backend = IngressBackend(source, FakeHandle(list_cards=lambda: [card]))
    with pytest.raises(RuntimeError, match="restarting"):
        asyncio.run(backend.tokenize("tiny-llama", "hello"))

    async def many() -> list[list[str]]:
        prompts = ["hello there", "the cat sat", "hello there", "x"]
        return await asyncio.gather(*(backend.tokenize("tiny-llama", p) for p in prompts))

    tokens = asyncio.run(many())
    assert tokens == [
        prompt_tokens(llama.tokenizer, p) for p in ["hello there", "the cat sat", "hello there", "x"]
    ]
    assert tokens[0][0] == llama.tokenizer.decode([llama.tokenizer.bos_token_id])  # specials as extract adds
    assert source.tokenizer.calls == 2  # one failed fetch, then one for every later call
    with pytest.raises(PatchscopeError, match="tiny-llama"):  # NOT_FOUND names the hosted sources
        asyncio.run(backend.tokenize("gpt-9", "hello"))
    assert source.tokenizer.calls == 2
