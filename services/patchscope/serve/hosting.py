"""Loading the models a replica hosts, warming them up, and the card the ingress validates requests with.

A card is everything the ingress needs to know about a hosted model (sizes, fingerprints, the typical
norm of each layer's states) without its weights, so requests are checked before any model runs and the
ingress holds no model at all.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from patchscope.engine.errors import ModelNotFound
from patchscope.engine.layer_stats import layer_stats
from patchscope.engine.models import LoadedModel, ModelRegistry, load_model
from patchscope.engine.models.placement import place
from patchscope.engine.template import normaliser_growth
from patchscope.engine.validation import ModelFacts
from patchscope.serve.config import Placement, ServiceConfig

logger = logging.getLogger("patchscope.serve")


@dataclass(frozen=True)
class ModelCard:
    """A hosted model as the ingress sees it."""

    id: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_parameters: int
    fingerprint: str
    tokenizer_fingerprint: str
    dtype: str
    max_positions: int | None
    # Mean L2 norm of each layer's states over the warm-up text (engine/layer_stats.py).
    layer_norms: tuple[float, ...]
    # The most the tokenizer's normaliser multiplies a text's UTF-8 bytes by (bounds template tokens).
    normaliser_growth: int = 1
    # Each layer's mean state over the warm-up text ([d] float32): the mean-state control's patch.
    layer_means: tuple[torch.Tensor, ...] = ()

    @property
    def facts(self) -> ModelFacts:
        return ModelFacts(
            model_id=self.id,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            vocab_size=self.vocab_size,
            max_positions=self.max_positions,
        )


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_dtype(name: str, device: str) -> str:
    if name == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return name


def model_registry(config: ServiceConfig) -> ModelRegistry:
    """The built-in models plus the ones the config registers by path (a request never names a path)."""
    registry = ModelRegistry()
    for model_id, path in config.models.items():
        registry.register(model_id, path)
    return registry


def load_hosted(
    ids: Iterable[str], config: ServiceConfig, placement: Placement | None = None
) -> dict[str, LoadedModel]:
    """Load (converting on first use) every model in `ids` on the configured device and dtype.

    With a `placement`, each model loads on the CPU and then moves block by block to the placement's
    devices (its dtype chosen for the first of them), so no single device ever holds the whole model.
    """
    registry = model_registry(config)
    device = "cpu" if placement else resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, placement.device_names()[0] if placement else device)
    models = {}
    for model_id in dict.fromkeys(ids):
        logger.info("loading model %s on %s as %s", model_id, device, dtype)
        model = load_model(
            model_id, registry=registry, dtype=dtype, device=device, options=config.engine_options()
        )
        if placement is not None:
            blocks = placement.block_placement(model.layout.num_layers)
            logger.info("placing %s: %s", model_id, blocks.describe())
            model = place(model, blocks)
        models[model_id] = model
    return models


@torch.inference_mode()
def warm_up(model: LoadedModel) -> ModelCard:
    """Run one full forward pass (weights paged in, kernels chosen) and describe the model."""
    stats = layer_stats(model)
    facts = model.facts
    return ModelCard(
        id=model.id,
        architecture=type(model.model).__name__,
        num_layers=facts.num_layers,
        hidden_size=facts.hidden_size,
        vocab_size=facts.vocab_size,
        num_parameters=sum(p.numel() for p in model.model.parameters()),
        fingerprint=model.fingerprint,
        tokenizer_fingerprint=model.tokenizer_fingerprint,
        dtype=str(model.dtype).removeprefix("torch."),
        max_positions=facts.max_positions,
        layer_norms=stats.norms,
        normaliser_growth=normaliser_growth(model.tokenizer),
        layer_means=stats.means,
    )


@dataclass
class Hosted:
    """What a model deployment holds: its config, its loaded and warmed-up models, and their cards."""

    config: ServiceConfig
    models: dict[str, LoadedModel]
    cards: dict[str, ModelCard]

    @classmethod
    def start(cls, config: dict, role: str) -> Hosted:
        """Validate the config, load the models of `role` ("sources" or "targets") and warm them up."""
        settings = ServiceConfig.model_validate(config)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        placement = settings.placement if role == "targets" else None
        models = load_hosted(getattr(settings, role), settings, placement)
        cards = {model_id: warm_up(model) for model_id, model in models.items()}
        logger.info("%s ready: %s", role, ", ".join(cards))
        return cls(settings, models, cards)

    def model(self, model_id: str) -> LoadedModel:
        if model_id not in self.models:
            raise ModelNotFound(model_id, list(self.models))
        return self.models[model_id]


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 elsewhere), for soak tests and capacity planning."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")
