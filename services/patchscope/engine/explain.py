"""A sweep: extract a source prompt's states at many sites and explain each through the target.

This is the whole Patchscope in one function: source pass (all layers at once), mapping, one batched
patched generation (or the logit lens), answers. The service and the CLI are thin shells around it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from patchscope.engine.errors import IncompatibleModels, InvalidArgument
from patchscope.engine.generation import GenerationConfig, PatchedRow, RowPatch, Timings, patched_generate
from patchscope.engine.hooks import extract
from patchscope.engine.lens import logit_lens
from patchscope.engine.models.loading import LoadedModel
from patchscope.engine.presets import get_preset, resolve_template
from patchscope.engine.template import tokenize_prompt
from patchscope.engine.validation import (
    ModelFacts,
    check_layers,
    check_positions,
    check_positive,
    check_prompt,
)

MAX_SITES = 4096
MAX_TOP_K = 100


class Mapping(Protocol):
    """Maps f from source states at layer ℓ to target states at layer ℓ*, one per layer pair of a sweep."""

    def __call__(self, state: torch.Tensor, source_layer: int, target_layer: int) -> torch.Tensor: ...

    def describe(self, source_layer: int, target_layer: int) -> tuple[str, float | None]:
        """The id and held-out R² of the map used for this layer pair."""
        ...


@dataclass(frozen=True)
class Site:
    """Where a state comes from and where it goes: source position and layer, target layer."""

    position: int
    source_layer: int
    target_layer: int


@dataclass(frozen=True)
class ExplainRequest:
    """One source prompt, its sites and how to verbalise them."""

    prompt: str
    layers: Sequence[int]
    positions: Sequence[int] = (-1,)
    target_layers: Sequence[int] | None = None  # None: the same layer as the source
    preset: str = "identity"
    template: str | None = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    top_k: int = 5


@dataclass(frozen=True)
class SiteResult:
    """The explanation of one site."""

    site: Site
    source_token: str
    explanation: str
    answer: str
    mapping_id: str | None = None
    mapping_r2: float | None = None
    top_k: list[tuple[str, float]] | None = None

    def to_json(self) -> dict[str, object]:
        record: dict[str, object] = {
            "source_layer": self.site.source_layer,
            "target_layer": self.site.target_layer,
            "position": self.site.position,
            "source_token": self.source_token,
            "explanation": self.explanation,
            "answer": self.answer,
            "mapping_id": self.mapping_id,
            "mapping_r2": self.mapping_r2,
        }
        if self.top_k is not None:
            record["top_k"] = [{"token": t, "prob": p} for t, p in self.top_k]
        return record


@dataclass
class ExplainTimings:
    """Seconds spent per phase of one sweep."""

    source_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0


@dataclass
class Explanation:
    """The results of a sweep, in site order, with where its time went."""

    results: list[SiteResult]
    timings: ExplainTimings


def check_request(
    source: ModelFacts, target: ModelFacts, request: ExplainRequest, max_sites: int = MAX_SITES
) -> list[tuple[int, int]]:
    """Validate every field but the positions (which need the tokenised prompt); return the layer pairs.

    Runs no model, so the service checks a request with it before sending anything to a model.
    """
    check_prompt("prompt", request.prompt)
    layers = check_layers("layers", request.layers, source)
    if request.target_layers is None:
        target_layers = check_layers("layers", layers, target)
    else:
        target_layers = check_layers("target_layers", request.target_layers, target)
        if len(target_layers) == 1:
            target_layers = target_layers * len(layers)
        elif len(target_layers) != len(layers):
            raise InvalidArgument(
                "target_layers",
                "must name one layer, or one layer per source layer",
                limit=f"1 or {len(layers)} entries",
                value=len(target_layers),
            )
    preset = get_preset(request.preset)
    resolve_template(preset, request.template)
    request.generation.validate()
    check_positive("top_k", request.top_k, MAX_TOP_K)
    num_sites = len(layers) * len(request.positions)
    if num_sites > max_sites:
        raise InvalidArgument(
            "layers × positions", "too many sites", limit=f"<= {max_sites}", value=num_sites
        )
    return list(zip(layers, target_layers, strict=True))


def plan_sites(source: LoadedModel, target: LoadedModel, request: ExplainRequest) -> list[Site]:
    """Validate the request against both models and list its sites (layer-major), running no model."""
    pairs = check_request(source.facts, target.facts, request)
    num_tokens = len(tokenize_prompt(source.tokenizer, request.prompt))
    positions = check_positions("positions", request.positions, num_tokens)
    return [Site(p, s, t) for s, t in pairs for p in positions]


def map_states(
    states: Sequence[torch.Tensor], sites: Sequence[Site], mapping: Mapping | None, target_hidden: int
) -> list[torch.Tensor]:
    """f(h) for each site's state ([d] -> [d*]); identity when `mapping` is None (same model)."""
    if mapping is None:
        return list(states)
    vectors = []
    for state, site in zip(states, sites, strict=True):
        vector = mapping(state, site.source_layer, site.target_layer)
        if vector.shape != (target_hidden,):
            raise IncompatibleModels(
                f"mapped state has shape {list(vector.shape)}, target needs [{target_hidden}]"
            )
        vectors.append(vector)
    return vectors


def explain(
    source: LoadedModel, target: LoadedModel, request: ExplainRequest, mapping: Mapping | None = None
) -> Explanation:
    """Explain every site of `request`; cross-model requests need a `mapping`."""
    same_model = source.fingerprint == target.fingerprint
    if mapping is None and not same_model:
        raise IncompatibleModels(
            f"source {source.id} and target {target.id} are different models: a cross-model explanation "
            "needs a mapping from source states to target states, or use one model as source and target"
        )
    sites = plan_sites(source, target, request)
    preset = get_preset(request.preset)
    timings = ExplainTimings()

    started = time.perf_counter()
    layers = sorted({s.source_layer for s in sites})
    positions = sorted({s.position for s in sites})
    hidden = extract(source, request.prompt, layers, positions)
    timings.source_s = time.perf_counter() - started

    states = [hidden.states[layers.index(s.source_layer), positions.index(s.position)] for s in sites]
    vectors = map_states(states, sites, mapping, target.facts.hidden_size)

    def result(site: Site, explanation: str, top_k: list[tuple[str, float]] | None = None) -> SiteResult:
        mapping_id, mapping_r2 = (None, None)
        if mapping is not None:
            mapping_id, mapping_r2 = mapping.describe(site.source_layer, site.target_layer)
        return SiteResult(
            site=site,
            source_token=hidden.tokens[site.position],
            explanation=explanation,
            answer=preset.answer(explanation),
            mapping_id=mapping_id,
            mapping_r2=mapping_r2,
            top_k=top_k,
        )

    if not preset.generates:
        return Explanation(
            [result(s, *logit_lens(target, v, request.top_k)) for s, v in zip(sites, vectors, strict=True)],
            timings,
        )

    template = resolve_template(preset, request.template)
    rows = [
        PatchedRow(
            template=template, filler=preset.filler, patches=(RowPatch(layer=s.target_layer, vector=v),)
        )
        for s, v in zip(sites, vectors, strict=True)
    ]
    gen_timings = Timings()
    generated = patched_generate(target, rows, request.generation, timings=gen_timings)
    timings.prefill_s, timings.decode_s = gen_timings.prefill_s, gen_timings.decode_s
    return Explanation([result(s, g.text) for s, g in zip(sites, generated, strict=True)], timings)
