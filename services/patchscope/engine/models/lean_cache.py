"""The key/value caches the lean forward (models/lean.py) reads and fills, apart from the forward itself.

Why apart: the prefix cache, the decode loop, the continuous-batching scheduler and the compiled ragged
step hold and reshape these caches without running the lean forward, so they import them from here and
not from the decoder: `LeanCache` holds one batch's rows of equal length, `RaggedCache` rows of different
lengths for continuous batching, and `SharedRows` says which computed row each batch row follows while a
batch's identical rows are computed once.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

GROW = 16  # tokens of room added whenever the cache runs out: a 10-token explanation fits the first


@dataclass
class LeanCache:
    """Keys and values per layer ([B, kv heads, capacity, head dim]); the first `length` tokens are valid.

    Room for more tokens is allocated ahead (`GROW` at a time), so a decode step writes in place instead of
    concatenating. `batch_repeat_interleave` and `batch_select_indices` have the meaning of transformers'
    `Cache` methods, so the prefix cache and the decode loop treat both kinds alike.
    """

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0

    def get_seq_length(self) -> int:
        return self.length

    def reserve(
        self, layers: int, batch: int, heads: int, head_dim: int, like: torch.Tensor, extra: int
    ) -> None:
        """Make room for `extra` more tokens of `batch` rows (allocated on first use, `like`'s dtype)."""
        if self.keys and self.keys[0].shape[2] >= self.length + extra:
            return
        shape = (batch, heads, self.length + extra + GROW, head_dim)

        def grown(old: torch.Tensor | None) -> torch.Tensor:
            new = like.new_empty(shape)
            if old is not None:
                new[:, :, : self.length] = old[:, :, : self.length]
            return new

        self.keys = [grown(self.keys[i] if self.keys else None) for i in range(layers)]
        self.values = [grown(self.values[i] if self.values else None) for i in range(layers)]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.keys = [k.repeat_interleave(repeats, dim=0) for k in self.keys]
        self.values = [v.repeat_interleave(repeats, dim=0) for v in self.values]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.keys = [k[indices] for k in self.keys]
        self.values = [v[indices] for v in self.values]


@dataclass
class RaggedCache:
    """Rows of different lengths in one cache, for continuous batching: slot b holds `lengths[b]` tokens.

    Keys and values per layer are [slots, kv heads, capacity, head dim]; every row is left-aligned (its
    token at position p sits at index p), so a decode step writes each row at its own length and a mask
    hides the rest. Live rows are slots 0 .. rows - 1: a row that leaves is replaced by the last one
    (`release`), so a step attends over one contiguous view and a freed slot's memory serves the next row
    that joins.
    """

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # one per live slot
    # Capacity in tokens rounds up to a multiple of this and slots to a power of two: a compiled step
    # sees few distinct shapes (static_decode.RaggedStep). 0: grow by `GROW` tokens, slots by doubling.
    bucket: int = 0

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def _grow(self, slots: int, tokens: int, like: torch.Tensor) -> None:
        """Room for `slots` rows of `tokens` tokens (doubling the rows, `GROW` tokens ahead)."""
        have_slots, have_tokens = (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)
        if slots <= have_slots and tokens <= have_tokens:
            return
        new_slots = max(slots, min(2 * have_slots, slots + have_slots)) if slots > have_slots else have_slots
        new_tokens = tokens + GROW if tokens > have_tokens else have_tokens
        if self.bucket:
            new_slots = 1 << (new_slots - 1).bit_length()
            new_tokens = -(-new_tokens // self.bucket) * self.bucket
        used, longest = self.rows, max(self.lengths, default=0)

        def grown(old: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor:
            # Zeros, not empty: a masked key still multiplies its value by a zero weight (0 × NaN = NaN).
            new = ref.new_zeros((new_slots, ref.shape[1], new_tokens, ref.shape[3]))
            if old is not None and used:
                new[:used, :, :longest] = old[:used, :, :longest]
            return new

        refs = self.keys if self.keys else like
        self.keys = [grown(self.keys[i] if self.keys else None, refs[i]) for i in range(len(refs))]
        self.values = [grown(self.values[i] if self.values else None, refs[i]) for i in range(len(refs))]
        if self.bucket and self.keys[0].device.type == "cuda":
            # A compiled step writes these in place: static addresses let CUDA graphs keep them as inputs
            # instead of skipping graphs for mutated inputs (as transformers' StaticCache does).
            for tensor in (*self.keys, *self.values):
                torch._dynamo.mark_static_address(tensor)

    def admit(self, cache: LeanCache) -> list[int]:
        """Append the rows of a prefilled `cache` (all of its length); their slots, in its row order."""
        n, length = cache.keys[0].shape[0], cache.length
        self._grow(self.rows + n, max(length, max(self.lengths, default=0)) + 1, cache.keys)
        start = self.rows
        for mine, theirs in ((self.keys, cache.keys), (self.values, cache.values)):
            for i, tensor in enumerate(theirs):
                mine[i][start : start + n, :, :length] = tensor[:, :, :length]
        self.lengths += [length] * n
        return list(range(start, start + n))

    def release(self, slot: int) -> int | None:
        """Free `slot`; the slot whose row moved into it (the last one), or None when none moved."""
        last = self.rows - 1
        moved = None
        if slot != last:
            longest = self.lengths[last]
            for tensors in (self.keys, self.values):
                for tensor in tensors:
                    tensor[slot, :, :longest] = tensor[last, :, :longest]
            self.lengths[slot] = longest
            moved = last
        self.lengths.pop()
        if not self.lengths and not self.bucket:  # idle: give the memory back (a compiled step keeps it)
            self.keys, self.values = [], []
        return moved

    def reserve_step(self, slots: int = 0) -> None:
        """Room for one more token in every live row, and for at least `slots` rows."""
        self._grow(max(self.rows, slots), max(self.lengths) + 1, self.keys)


@dataclass
class SharedRows:
    """Which computed row each batch row follows while a batch's identical rows are computed once.

    `follows[b]` is the computed row of batch row b; a patch splits its row off into a computed row of
    its own (`split`). `index` ([B]) and `members` ([g], one batch row per computed row) are the gathers
    the attention needs, rebuilt on first use after splits (once per layer, however many rows split).
    """

    follows: list[int]
    device: torch.device

    def __post_init__(self) -> None:
        self._count = Counter(self.follows)
        self._gathers: tuple[torch.Tensor, torch.Tensor] | None = None

    def _build(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._gathers is None:
            first: dict[int, int] = {}
            for b, j in enumerate(self.follows):
                first.setdefault(j, b)
            self._gathers = (
                torch.tensor(self.follows, device=self.device),
                torch.tensor([first[j] for j in range(len(first))], device=self.device),
            )
        return self._gathers

    @property
    def index(self) -> torch.Tensor:
        return self._build()[0]

    @property
    def members(self) -> torch.Tensor:
        return self._build()[1]

    def split(self, row: int, computed: int) -> bool:
        """Give batch row `row` the new computed row `computed` if it shares one; True if it did."""
        if self._count[self.follows[row]] == 1:
            return False
        self._count[self.follows[row]] -= 1
        self.follows[row] = computed
        self._count[computed] = 1
        self._gathers = None
        return True
