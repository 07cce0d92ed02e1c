"""The KV caches patched generation decodes with, and how a base model's forward is handed one."""

from __future__ import annotations

import inspect
from functools import cache

from transformers.cache_utils import Cache

from patchscope.engine.models.lean_cache import LeanCache

KVCache = Cache | LeanCache  # transformers' caches, or the lean forward's (same batch methods)


@cache
def cache_kwarg(model_type: type) -> str:
    """The keyword under which `model_type.forward` takes its KV cache."""
    # transformers renamed `past_key_values` to `cache` during 5.x; support both spellings.
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"
