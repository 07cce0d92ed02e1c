"""A small LRU of key/value caches for template prefixes.

Every row of a sweep shares the template's tokens before the placeholder, and causal attention makes
their keys and values independent of anything patched later, so they are computed once per
(model, prefix) and copied per call. Nothing from the placeholder on may be shared.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable

from patchscope.engine.kv_cache import KVCache


class PrefixCache:
    """Batch-1 caches keyed by prefix token ids; `take` hands out a private copy of batch B."""

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[int, ...], KVCache] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, prefix: tuple[int, ...], batch: int, compute: Callable[[], KVCache]) -> KVCache:
        """A copy of the prefix's cache repeated to `batch` rows, computing it on first use."""
        with self._lock:
            cached = self._entries.get(prefix)
            if cached is not None:
                self._entries.move_to_end(prefix)
                self.hits += 1
        if cached is None:
            cached = compute()
            with self._lock:
                self.misses += 1
                self._entries[prefix] = cached
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
        private = copy.deepcopy(cached)  # decoding appends to the cache; the stored one must stay intact
        if batch > 1:
            private.batch_repeat_interleave(batch)
        return private

    def get(self, prefix: tuple[int, ...]) -> KVCache | None:
        """The stored batch-1 cache of `prefix` (never to be written: `copy` it), or None."""
        with self._lock:
            cached = self._entries.get(prefix)
            if cached is not None:
                self._entries.move_to_end(prefix)
                self.hits += 1
            return cached

    def put(self, prefix: tuple[int, ...], cache: KVCache) -> None:
        """Store a batch-1 cache computed by the caller (in chunks, say), evicting the oldest."""
        with self._lock:
            self.misses += 1
            self._entries[prefix] = cache
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    @staticmethod
    def copy(cached: KVCache, batch: int) -> KVCache:
        """A private copy of a stored cache, repeated to `batch` rows."""
        private = copy.deepcopy(cached)
        if batch > 1:
            private.batch_repeat_interleave(batch)
        return private

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
