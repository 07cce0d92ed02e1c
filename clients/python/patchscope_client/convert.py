"""Typed requests and records ⇄ protobuf messages; shared by the sync and async clients."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from patchscope_client import tensors
from patchscope_client._proto import patchscope_pb2 as pb
from patchscope_client.types import (
    Control,
    Event,
    Extraction,
    Finished,
    LayerStates,
    MappingInfo,
    ModelInfo,
    Site,
    Started,
    Token,
)

DTYPES = {"float32": pb.D_TYPE_F32, "bfloat16": pb.D_TYPE_BF16, "float16": pb.D_TYPE_F16}


def target_spec(
    target: str,
    *,
    preset: str = "identity",
    template: str | None = None,
    target_layers: Sequence[int] | None = None,
    mapping: str = "auto",
    max_new_tokens: int = 10,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    top_k: int = 5,
    controls: bool = True,
    stop: Sequence[str] = (),
    mean_state_control: bool = False,
) -> pb.TargetSpec:
    """`controls=False` skips the control row and `Finished.control`; left unset on the wire, it is on.

    `mean_state_control` adds the mean-state rows (`Control.mean_state_*`; a 1.3 server, controls on).
    """
    generation = pb.GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    if seed is not None:
        generation.seed = seed
    generation.stop.extend(stop)  # stop sequences: a row ends once its text contains one
    spec = pb.TargetSpec(
        model=target,
        preset=preset,
        template=template or "",
        layers=list(target_layers or []),
        mapping=mapping,
        generation=generation,
        top_k=top_k,
    )
    if not controls:
        spec.controls = False
    if mean_state_control:
        spec.mean_state_control = True
    return spec


def explain_request(
    source: str, prompt: str, layers: Sequence[int], positions: Sequence[int] | None, spec: pb.TargetSpec
) -> pb.ExplainRequest:
    return pb.ExplainRequest(
        source=source, prompt=prompt, layers=list(layers), positions=list(positions or []), target=spec
    )


def activations_request(
    states,
    *,
    source: str,
    layers: Sequence[int],
    positions: Sequence[int] | None,
    tokens: Sequence[str] | None,
    model: str,
    fingerprint: str,
    spec: pb.TargetSpec,
) -> pb.ExplainActivationsRequest:
    """`states` is [sites, hidden] (numpy, or a torch tensor); `layers` gives each row's source layer."""
    if hasattr(states, "detach"):  # a torch tensor: no torch import needed to recognise it
        states = states.detach().float().cpu().numpy()
    array = np.asarray(states)
    if array.ndim == 1:
        array = array[None, :]
    return pb.ExplainActivationsRequest(
        source=source,
        safetensors=tensors.encode(array),
        provenance=pb.Provenance(
            model=model,
            fingerprint=fingerprint,
            layers=list(layers),
            positions=list(positions or []),
            tokens=list(tokens or []),
        ),
        target=spec,
    )


def extract_request(
    model: str, prompt: str, layers: Sequence[int], positions: Sequence[int] | None, dtype: str
) -> pb.ExtractHiddenStatesRequest:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return pb.ExtractHiddenStatesRequest(
        model=model, prompt=prompt, layers=list(layers), positions=list(positions or []), dtype=DTYPES[dtype]
    )


def model_info(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        id=m.id,
        source=m.source,
        target=m.target,
        architecture=m.architecture,
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        vocab_size=m.vocab_size,
        num_parameters=m.num_parameters,
        fingerprint=m.fingerprint,
        tokenizer_fingerprint=m.tokenizer_fingerprint,
        dtype=m.dtype,
        ready=m.ready,
    )


def mapping_info(m: pb.MappingInfo) -> MappingInfo:
    return MappingInfo(
        id=m.id,
        source=m.source,
        target=m.target,
        source_layer=m.source_layer,
        target_layer=m.target_layer,
        method=m.method,
        r2=m.r2,
        r2_mean_dim=m.r2_mean_dim,
        cosine=m.cosine,
        mse=m.mse,
        num_pairs=m.num_pairs,
    )


def _optional(message, name: str):
    """An `optional` field's value, None when the server left it unset."""
    return getattr(message, name) if message.HasField(name) else None


def control(finished: pb.SiteFinished) -> Control | None:
    """The site's controls; None when the server sent none (turned off, the logit lens, a 1.0 server)."""
    if not finished.HasField("control"):
        return None
    c = finished.control
    return Control(
        unpatched_explanation=c.unpatched_explanation,
        unpatched_answer=c.unpatched_answer,
        same_as_unpatched=c.same_as_unpatched,
        patch_effect=_optional(c, "patch_effect"),
        explanation_logprob=_optional(c, "explanation_logprob"),
        unpatched_logprob=_optional(c, "unpatched_logprob"),
        dependence=_optional(c, "dependence"),
        confidence=_optional(c, "confidence"),
        calibrator_id=c.calibrator_id,
        unpatched_top_k=[(p.token, p.prob) for p in c.unpatched_top_k] or None,
        mean_state_explanation=_optional(c, "mean_state_explanation"),
        mean_state_answer=_optional(c, "mean_state_answer"),
        same_as_mean_state=_optional(c, "same_as_mean_state"),
    )


def event(message: pb.ExplainEvent) -> Event:
    s = message.site
    site = Site(s.index, s.position, s.source_layer, s.target_layer, s.source_token)
    kind = message.WhichOneof("event")
    if kind == "started":
        e = message.started
        return Started(
            site,
            e.mapping_id,
            e.mapping_r2 if e.HasField("mapping_r2") else None,
            e.mapped_norm,
            e.target_layer_norm,
            e.provenance_mismatch,
            message.emitted_at,
        )
    if kind == "token":
        return Token(site, message.token.step, message.token.token_id, message.token.text, message.emitted_at)
    f = message.finished
    t, r = f.timings, f.reproduction
    return Finished(
        site,
        f.explanation,
        f.answer,
        [(p.token, p.prob) for p in f.top_k],
        {
            "source_s": t.source_s,
            "queue_s": t.queue_s,
            "prefill_s": t.prefill_s,
            "decode_s": t.decode_s,
            "total_s": t.total_s,
        },
        {
            "request_id": r.request_id,
            "source_model": r.source_model,
            "source_fingerprint": r.source_fingerprint,
            "target_model": r.target_model,
            "target_fingerprint": r.target_fingerprint,
            "mapping_id": r.mapping_id,
            "dtype": r.dtype,
            "max_new_tokens": r.generation.max_new_tokens,
            "temperature": r.generation.temperature,
            "top_p": r.generation.top_p,
            "seed": r.generation.seed if r.generation.HasField("seed") else None,
            "preset": r.preset,
            "template": r.template,
            "server_version": r.server_version,
            "api_version": r.api_version,
            "provenance_mismatch": r.provenance_mismatch,
        },
        message.emitted_at,
        control(f),
    )


def extraction(messages: Iterable[pb.ExtractHiddenStatesResponse], as_torch: bool = False) -> Extraction:
    """Join each layer's chunks and decode them (BF16/F16 widened to float32)."""
    layers: list[LayerStates] = []
    model = fingerprint = ""
    token_ids: list[int] = []
    tokens: list[str] = []
    pending: list[bytes] = []
    positions: list[int] = []
    for m in messages:
        if m.chunk_index == 0:
            pending, positions = [], list(m.positions)
            model, fingerprint = m.model, m.fingerprint
            token_ids, tokens = list(m.token_ids), list(m.tokens)
        pending.append(m.safetensors)
        if m.chunk_index == m.chunk_count - 1:
            states = tensors.decode(b"".join(pending))
            if as_torch:
                from patchscope_client.errors import require

                states = require("torch", "torch").from_numpy(states)
            layers.append(LayerStates(m.layer, positions, states))
    return Extraction(model, fingerprint, token_ids, tokens, layers)
