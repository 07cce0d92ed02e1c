"""Events: the pipeline's events of one Explain as `ExplainEvent` messages, each stamped with its call.

A finished site carries everything needed to reproduce it (models, fingerprints, mapping, decoding), so a
stored event stands on its own without the request that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass

from patchscope.explain.events import Control, Event, SiteFinished, SiteStarted, SiteToken
from patchscope.explain.plan import Plan
from patchscope.wire.proto import pb
from patchscope.wire.requests import generation_to_proto


@dataclass(frozen=True)
class Stamp:
    """What every event of one call carries besides its payload."""

    request_id: str
    started: float  # time.time() when the call arrived
    server_version: str
    api_version: str


def event_to_proto(plan: Plan, event: Event, stamp: Stamp, now: float) -> pb.ExplainEvent:
    site = plan.sites[event.index]
    message = pb.ExplainEvent(
        request_id=stamp.request_id,
        site=pb.Site(
            index=event.index,
            position=site.position,
            source_layer=site.source_layer,
            target_layer=site.target_layer,
            source_token=plan.source_tokens[event.index],
        ),
        emitted_at=now,
    )
    if isinstance(event, SiteStarted):
        message.started.CopyFrom(
            pb.SiteStarted(
                mapping_id=event.mapping_id,
                mapped_norm=event.mapped_norm,
                target_layer_norm=event.target_layer_norm or 0.0,
                provenance_mismatch=plan.provenance_mismatch,
            )
        )
        if event.mapping_r2 is not None:
            message.started.mapping_r2 = event.mapping_r2
    elif isinstance(event, SiteToken):
        message.token.CopyFrom(pb.SiteToken(step=event.step, token_id=event.token_id, text=event.text))
    else:
        message.finished.CopyFrom(_finished(plan, event, stamp, now))
    return message


def _finished(plan: Plan, event: SiteFinished, stamp: Stamp, now: float) -> pb.SiteFinished:
    site = plan.sites[event.index]
    mapping_id = plan.mapping.describe(site.source_layer, site.target_layer)[0] if plan.mapping else ""
    t = event.timings
    finished = pb.SiteFinished(
        explanation=event.explanation,
        answer=event.answer,
        top_k=[pb.TokenProb(token=token, prob=p) for token, p in event.top_k or []],
        timings=pb.Timings(
            source_s=t.source_s,
            queue_s=t.queue_s,
            prefill_s=t.prefill_s,
            decode_s=t.decode_s,
            total_s=now - stamp.started,
        ),
        reproduction=pb.Reproduction(
            request_id=stamp.request_id,
            source_model=plan.source.id,
            source_fingerprint=plan.source.fingerprint,
            target_model=plan.target.id,
            target_fingerprint=plan.target.fingerprint,
            mapping_id=mapping_id,
            dtype=plan.target.dtype,
            generation=generation_to_proto(plan.generation),
            preset=plan.preset.name,
            template=plan.template,
            server_version=stamp.server_version,
            api_version=stamp.api_version,
            provenance_mismatch=plan.provenance_mismatch,
        ),
    )
    if event.control is not None:
        finished.control.CopyFrom(control_to_proto(event.control))
    return finished


def control_to_proto(control: Control) -> pb.Control:
    """Unknown signals stay unset (`optional`), so a client can tell 0 from "not measured"."""
    message = pb.Control(
        unpatched_explanation=control.unpatched_explanation,
        unpatched_answer=control.unpatched_answer,
        same_as_unpatched=control.same_as_unpatched,
        calibrator_id=control.calibrator_id,
    )
    for name in (
        "patch_effect",
        "explanation_logprob",
        "unpatched_logprob",
        "dependence",
        "confidence",
        "mean_state_explanation",
        "mean_state_answer",
        "same_as_mean_state",
    ):
        value = getattr(control, name)
        if value is not None:
            setattr(message, name, value)
    for token, prob in control.unpatched_top_k or ():
        message.unpatched_top_k.add(token=token, prob=prob)
    return message
