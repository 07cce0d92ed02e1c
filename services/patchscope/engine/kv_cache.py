"""The KV caches patched generation decodes with, and how a base model's forward is handed one."""

from __future__ import annotations

import inspect
from functools import cache

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache

from patchscope.engine.models.lean_cache import LeanCache
from patchscope.engine.models.placement import ATTRIBUTE

KVCache = Cache | LeanCache  # transformers' caches, or the lean forward's (same batch methods)


@cache
def cache_kwarg(model_type: type) -> str:
    """The keyword under which `model_type.forward` takes its KV cache."""
    # transformers renamed `past_key_values` to `cache` during 5.x; support both spellings.
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


class PlacedCache(DynamicCache):
    """transformers' dynamic cache for a model placed across devices (models/placement.py).

    Each layer's keys live on its block's device already (they are created there); what does not follow
    is the row index a batch drops finished rows with, which the caller builds on the model's first
    device and torch refuses on a tensor of another device. This cache moves it per layer.
    """

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                layer.batch_select_indices(indices.to(layer.keys.device))


def transformers_cache(model: PreTrainedModel) -> DynamicCache:
    """An empty transformers cache for `model`: the placed kind when its blocks span devices."""
    kind = PlacedCache if getattr(model, ATTRIBUTE, None) is not None else DynamicCache
    return kind(config=model.config)
