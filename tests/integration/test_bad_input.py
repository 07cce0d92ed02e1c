"""Bad input for every field gets the documented status code and a message naming the field; the service
answers a normal request right after each one."""

from __future__ import annotations

import math
import struct
import time

import grpc
import pytest
import safetensors.torch
import torch

from patchscope.wire import pb
from tests.integration.test_service import explain_request

pytestmark = pytest.mark.ray

INVALID, NOT_FOUND, PRECONDITION = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
)


def activations(states=None, raw: bytes | None = None, layers=(1,), **target) -> pb.ExplainActivationsRequest:
    data = (
        raw
        if raw is not None
        else safetensors.torch.save({"states": states if states is not None else torch.randn(1, 64)})
    )
    return pb.ExplainActivationsRequest(
        source="tiny-llama",
        safetensors=data,
        provenance=pb.Provenance(model="prod", layers=list(layers)),
        target=pb.TargetSpec(model=target.pop("model", "tiny-llama"), **target),
    )


def extract(**kw) -> pb.ExtractHiddenStatesRequest:
    return pb.ExtractHiddenStatesRequest(
        **{"model": "tiny-llama", "prompt": "hello world", "layers": [1], **kw}
    )


CASES = {
    "empty prompt": ("Explain", explain_request(prompt="  "), INVALID, "prompt: must be a non-empty string"),
    "over-long prompt": (
        "Explain",
        explain_request(prompt="a" * 9000),
        INVALID,
        "prompt: too long; allowed: <= 8192",
    ),
    "layer out of range": ("Explain", explain_request(layers=[9]), INVALID, "layers: layer out of range"),
    "position out of range": ("Explain", explain_request(positions=[99]), INVALID, "positions"),
    "too many sites": (
        "Explain",
        explain_request(layers=[0, 1, 2, 3], positions=[1] * 17),
        INVALID,
        "too many sites; allowed: <= 64",
    ),
    "unknown source": (
        "Explain",
        explain_request(source="tiny-nope"),
        NOT_FOUND,
        "'tiny-nope' is not registered; known models: tiny-llama",
    ),
    "unknown target": ("Explain", explain_request(target="gpt-9"), NOT_FOUND, "'gpt-9' is not registered"),
    "unknown mapping": (
        "Explain",
        explain_request(target="tiny-qwen2", spec={"mapping": "nope"}),
        NOT_FOUND,
        "nope",
    ),
    "mapping of other models": (
        "Explain",
        explain_request(layers=[1], spec={"mapping": "tiny-llama.tiny-qwen2.1-1.affine"}),
        PRECONDITION,
        "was fitted on a target model",
    ),
    "no mapping for the layer pair": (
        "Explain",
        explain_request(target="tiny-qwen2", layers=[0], spec={"layers": [0]}),
        NOT_FOUND,
        "no mapping registered for tiny-llama -> tiny-qwen2 at layer pairs 0:0",
    ),
    "template without placeholder": (
        "Explain",
        explain_request(spec={"template": "no marker"}),
        INVALID,
        "template",
    ),
    "unknown preset": ("Explain", explain_request(spec={"preset": "poetry"}), INVALID, "preset"),
    "too many new tokens": (
        "Explain",
        explain_request(max_new_tokens=501),
        INVALID,
        "max_new_tokens: too many new tokens",
    ),
    "top_p above one": (
        "Explain",
        explain_request(spec={"generation": pb.GenerationOptions(top_p=2.0)}),
        INVALID,
        "top_p",
    ),
    "malformed safetensors": (
        "ExplainActivations",
        activations(raw=b"garbage!garbage!"),
        INVALID,
        "safetensors: not a safetensors file",
    ),
    "wrong hidden size": (
        "ExplainActivations",
        activations(torch.randn(1, 32)),
        INVALID,
        "safetensors.shape",
    ),
    "NaN activations": (
        "ExplainActivations",
        activations(torch.full((1, 64), math.nan)),
        INVALID,
        "NaN or Inf",
    ),
    "integer activations": (
        "ExplainActivations",
        activations(raw=safetensors.torch.save({"states": torch.ones(1, 64, dtype=torch.int64)})),
        INVALID,
        "safetensors.dtype: unsupported dtype",
    ),
    "activations over the payload limit": (
        "ExplainActivations",
        activations(torch.randn(4200, 64)),
        INVALID,
        "payload too large; allowed: <= 1048576 bytes",
    ),
    "provenance layers missing": ("ExplainActivations", activations(layers=()), INVALID, "provenance.layers"),
    "provenance layer out of range": (
        "ExplainActivations",
        activations(layers=(7,)),
        INVALID,
        "provenance.layers",
    ),
    "extract from an unknown model": (
        "ExtractHiddenStates",
        extract(model="nope"),
        NOT_FOUND,
        "'nope' is not registered",
    ),
    "extract a layer out of range": (
        "ExtractHiddenStates",
        extract(layers=[4]),
        INVALID,
        "layers: layer out of range",
    ),
    "extract with an unknown dtype": ("ExtractHiddenStates", extract(dtype=9), INVALID, "dtype"),
    # One past each limit of issue 17 (the rest are above), and its two attacks.
    "the 50,000-character template": (
        "Explain",
        explain_request(spec={"template": "word " * 10_000 + "{}"}),
        INVALID,
        "target.template: too long; allowed: <= 4096 characters",
    ),
    "2,000 copies of layer 0 x 100 positions": (
        "ExtractHiddenStates",
        extract(layers=[0] * 2000, positions=list(range(100))),
        INVALID,
        "layers: too many layers; allowed: <= 256; got: 2000",
    ),
    "a layer twice in an extraction": (
        "ExtractHiddenStates",
        extract(layers=[1, -3]),
        INVALID,
        "names a layer more than once",
    ),
    "template bytes one past": (
        "Explain",
        explain_request(spec={"template": "é" * 2048 + "{}"}),
        INVALID,
        "too many tokens; allowed: <= 4096 UTF-8 bytes",
    ),
    "temperature 1e-40": (
        "Explain",
        explain_request(spec={"generation": pb.GenerationOptions(temperature=1e-40)}),
        INVALID,
        "target.generation.temperature: out of range",
    ),
    "mapping id of 256 bytes": (
        "Explain",
        explain_request(target="tiny-qwen2", spec={"mapping": "m" * 256}),
        INVALID,
        "target.mapping: too long; allowed: <= 200 bytes",
    ),
    "top_k one past": (
        "ExplainActivations",
        activations(preset="logit-lens", top_k=101),
        INVALID,
        "top_k",
    ),
    "provenance token one character past": (
        "ExplainActivations",
        pb.ExplainActivationsRequest(
            source="tiny-llama",
            safetensors=safetensors.torch.save({"states": torch.randn(1, 64)}),
            provenance=pb.Provenance(layers=[1], tokens=["t" * 257]),
            target=pb.TargetSpec(model="tiny-llama"),
        ),
        INVALID,
        "provenance.tokens[0]: too long",
    ),
    "deeply nested safetensors header": (
        "ExplainActivations",
        activations(raw=struct.pack("<Q", 20_000) + b"[" * 10_000 + b"]" * 10_000),
        INVALID,
        "nested too deeply",
    ),
    "a shape of booleans": (
        "ExplainActivations",
        activations(
            raw=(h := b'{"states":{"dtype":"F32","shape":[true,true],"data_offsets":[0,4]}}')
            and struct.pack("<Q", len(h)) + h + bytes(4)
        ),
        INVALID,
        "non-negative integers",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_its_status_code_and_the_service_keeps_serving(stub, case):
    method, request, code, message = CASES[case]
    call = getattr(stub, method)
    with pytest.raises(grpc.RpcError) as error:
        list(call(request, timeout=60))
    assert error.value.code() == code, error.value.details()
    assert message in error.value.details()
    started = time.monotonic()
    events = list(stub.Explain(explain_request(layers=[1], positions=[-1], max_new_tokens=2), timeout=60))
    assert events[-1].WhichOneof("event") == "finished"
    elapsed = time.monotonic() - started
    print(f"{case}: refused; the next ordinary Explain took {elapsed * 1000:.0f} ms")
    assert elapsed < 20, "an ordinary request after a refused one must be served in its normal time"
