"""A direct forward for Llama-style decoders: the sweep's fast path on a CPU.

Why: with transformers' modules a sweep's decode step (a few dozen rows, one token each) spends a
noticeable share of its CPU time outside the matrix products: mask and cache bookkeeping, position
tables, 3-D reshapes and SDPA's set-up for a one-token query. This forward writes the attention out over
the model's own modules (norms, MLPs and projections are still its modules), with the same explanations
(paired A/Bs in `bench/results.md`). It also makes the patched prompt pass cheaper: all rows of a batch
start from the same tokens and the same prefix cache, so they are identical until their first patch;
this forward runs them as one row and splits a row off at its patch layer.

Supported: the families the layout table marks `lean` (models/layout.py: Llama, Mistral, Qwen2, Qwen3 and
Gemma 3 text models) whose rotary tables are fixed and whose attention logits are not soft-capped; sliding
windows are masks over a cache that keeps every token. The modules come from the table's paths.
`unsupported_reason` says why another model keeps transformers' forward. Blocks' forward hooks do not
run here: patches are an argument (`forward(..., patches)`), written by `patch.write_patches` like every
other forward's; the hook-based readers (`capture`, lenses) keep using the transformers modules, which
this class shares and never changes.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedModel

from patchscope.engine.models.layout import ARCHITECTURES, lean_families, site_paths
from patchscope.engine.options import FORWARDS, Forward
from patchscope.engine.patch import Patch, write_patches

GROW = 16  # tokens of room added whenever the cache runs out: a 10-token explanation fits the first
STATIC_ROPE = {"default", "linear", "llama3"}  # rope types whose frequency table never changes


def _layer_types(model: PreTrainedModel) -> list[str]:
    return list(
        getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    )


def _rope_types(model: PreTrainedModel) -> set[str]:
    rope_type = getattr(
        model.get_submodule(site_paths(model.config.model_type).rotary), "rope_type", "default"
    )
    return set(rope_type.values()) if isinstance(rope_type, dict) else {rope_type}  # Gemma 3: per layer type


def unsupported_reason(model: PreTrainedModel) -> str | None:
    """Why `model` cannot run the lean forward, or None when it can."""
    config = model.config
    paths = ARCHITECTURES.get(config.model_type)
    if paths is None or not paths.lean:
        return f"model_type {config.model_type!r} is not one of {', '.join(lean_families())}"
    dynamic = _rope_types(model) - STATIC_ROPE
    if dynamic:
        return f"rope type {sorted(dynamic)[0]!r} changes its table with the sequence length"
    if getattr(config, "attn_logit_softcapping", None):
        return "it soft-caps attention logits"
    if getattr(config, "use_bidirectional_attention", False):
        return "its attention is bidirectional"
    return None


def resolve_forward(forward: Forward, model: PreTrainedModel) -> Literal["lean", "transformers"]:
    """`auto`: lean for a supported model on a CPU, where it saves bookkeeping; transformers elsewhere."""
    if forward not in FORWARDS:
        raise ValueError(f"forward must be one of {', '.join(FORWARDS)}, got {forward!r}")
    reason = unsupported_reason(model)
    if forward == "lean" and reason is not None:
        raise ValueError(f"forward 'lean' is unavailable for this model: {reason}")
    on_cpu = next(model.parameters()).device.type == "cpu"
    return (
        "lean" if forward == "lean" or (forward == "auto" and reason is None and on_cpu) else "transformers"
    )


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


@dataclass(frozen=True)
class _Rope:
    """One rotary table: transformers' inverse frequencies and output scale (Gemma 3 has two)."""

    inv_freq: torch.Tensor  # [head dim / 2] float32
    scale: float

    def table(self, start: int, count: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Cos and sin ([t, head dim]) of positions start .. start + count - 1."""
        positions = torch.arange(start, start + count, device=self.inv_freq.device, dtype=torch.float32)
        return self.at(positions, dtype)

    def at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Cos and sin ([n, head dim]) of the given positions ([n])."""
        freqs = positions.to(self.inv_freq.device, torch.float32)[:, None] * self.inv_freq[None]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


class LeanDecoder:
    """The forward of a supported causal LM with its attention written out, over the model's own modules."""

    def __init__(self, model: PreTrainedModel) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the lean forward does not support this model: {reason}")
        config, paths = model.config, site_paths(model.config.model_type)
        self.embed = model.get_submodule(paths.embed)
        self.layers = model.get_submodule(paths.blocks)
        self.norm = model.get_submodule(paths.final_norm)
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        rotary = model.get_submodule(paths.rotary)
        by_type: dict[str, _Rope] = {}
        for layer_type in set(_layer_types(model)):
            if hasattr(rotary, "inv_freq"):
                by_type[layer_type] = _Rope(rotary.inv_freq.float(), float(rotary.attention_scaling))
            else:  # Gemma 3: a table per layer type
                inv_freq = getattr(rotary, f"{layer_type}_inv_freq").float()
                scale = float(getattr(rotary, f"{layer_type}_attention_scaling"))
                by_type[layer_type] = _Rope(inv_freq, scale)
        self.ropes = [by_type[layer_type] for layer_type in _layer_types(model)]  # per block, shared
        self.windows: list[int | None] = [
            getattr(layer.self_attn, "sliding_window", None) for layer in self.layers
        ]
        self.sandwich = hasattr(self.layers[0], "pre_feedforward_layernorm")  # Gemma 3's norms around both

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def _mask(self, start: int, t: int, window: int | None, device: torch.device) -> torch.Tensor | None:
        """True where a new token's query ([group * t] rows, as `_attention` orders them) may not see a key.

        Causal, and with a window, keys `window` or more positions back are hidden too (transformers'
        sliding-window rule). None when nothing is hidden (a decode step inside the window).
        """
        if t == 1 and (window is None or start < window):
            return None
        query = start + torch.arange(t, device=device).repeat(self.heads // self.kv_heads)[:, None]
        key = torch.arange(start + t, device=device)[None]
        hidden = key > query
        if window is not None:
            hidden |= key <= query - window
        return hidden

    def _attention(
        self, i: int, x: torch.Tensor, cache: LeanCache, rows: SharedRows | None, rope, mask
    ) -> torch.Tensor:
        """Self-attention of block i for the computed rows `x` ([g, t, d]).

        With `rows` the new keys and values are written for every cache row from the computed row it
        follows, and each computed row attends over the cache of one of its members (None: one each).
        """
        attn = self.layers[i].self_attn
        g, t, _ = x.shape
        kv, d, group = self.kv_heads, self.head_dim, self.heads // self.kv_heads
        q = attn.q_proj(x).view(g, t, self.heads, d).transpose(1, 2)  # [g, heads, t, d]
        k = attn.k_proj(x).view(g, t, kv, d).transpose(1, 2)  # [g, kv, t, d]
        v = attn.v_proj(x).view(g, t, kv, d).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # Qwen3, Gemma 3
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = rope
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        start, end = cache.length, cache.length + t
        keys, values = cache.keys[i], cache.values[i]
        if rows is None:
            keys[:, :, start:end], values[:, :, start:end] = k, v
            keys, values = keys[:, :, :end], values[:, :, :end]
        else:
            keys[:, :, start:end], values[:, :, start:end] = k[rows.index], v[rows.index]
            keys, values = keys[rows.members, :, :end], values[rows.members, :, :end]
        # The heads sharing a kv head are one batch of group * t queries: no repeated keys.
        scores = torch.matmul(q.reshape(g, kv, group * t, d), keys.transpose(-1, -2)) * attn.scaling
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), values)  # [g, kv, group*t, d]
        out = out.view(g, kv, group, t, d).permute(0, 3, 1, 2, 4).reshape(g, t, self.heads * d)
        return attn.o_proj(out)

    def _ragged_attention(
        self, i: int, x: torch.Tensor, cache: RaggedCache, where: torch.Tensor, rope, mask
    ) -> torch.Tensor:
        """Self-attention of block i for one new token per row (`x` [n, 1, d]) at each row's own length.

        `where` ([n]) is each row's length before this token (its position and its cache index); `mask`
        ([n, 1, 1, L]) hides the keys beyond each row and outside its window.
        """
        attn = self.layers[i].self_attn
        n = x.shape[0]
        kv, d, group = self.kv_heads, self.head_dim, self.heads // self.kv_heads
        q = attn.q_proj(x).view(n, 1, self.heads, d).transpose(1, 2)  # [n, heads, 1, d]
        k = attn.k_proj(x).view(n, 1, kv, d).transpose(1, 2)  # [n, kv, 1, d]
        v = attn.v_proj(x).view(n, 1, kv, d).transpose(1, 2)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = rope  # [n, 1, 1, d]
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        slots = torch.arange(n, device=x.device)
        keys, values = cache.keys[i], cache.values[i]
        keys[slots, :, where], values[slots, :, where] = k[:, :, 0], v[:, :, 0]
        length = mask.shape[-1]
        keys, values = keys[:n, :, :length], values[:n, :, :length]  # [n, kv, L, d]
        scores = torch.matmul(q.reshape(n, kv, group, d), keys.transpose(-1, -2)) * attn.scaling
        scores = scores.masked_fill(mask, float("-inf"))  # [n, kv, group, L]
        out = torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), values)  # [n, kv, group, d]
        return attn.o_proj(out.reshape(n, 1, self.heads * d))

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, cache: RaggedCache) -> torch.Tensor:
        """The final-normed state ([n, d]) after one new token per live row (`ids` [n]), rows of any length.

        Each row's token goes at its own position (its length), attends over its own tokens only, and the
        row grows by one. Nothing is patched: decoding sees the patch through the cache alone.
        """
        if ids.shape != (cache.rows,):  # one token per live slot, in slot order
            raise ValueError(f"step needs ids of shape [{cache.rows}], got {list(ids.shape)}")
        cache.reserve_step()
        where = torch.tensor(cache.lengths, device=ids.device)  # [n]
        normed = self.ragged_step(ids, where, cache.keys, cache.values, max(cache.lengths) + 1)
        cache.lengths = [length + 1 for length in cache.lengths]
        return normed

    def ragged_step(
        self,
        ids: torch.Tensor,
        where: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        length: int,
    ) -> torch.Tensor:
        """`step`'s arithmetic on tensors alone (fixed shapes for a given `length`, so it can compile).

        `ids` and `where` ([b]: each row's token and its length before it) cover the first b slots of
        `keys`/`values` ([slots, kv, capacity, d]); attention reads the first `length` key positions.
        """
        h = self.embed(ids[:, None])  # [b, 1, d]
        distinct = {id(r): r for r in self.ropes}
        tables = {}
        for key, rope in distinct.items():
            cos, sin = rope.at(where, h.dtype)  # [b, d]
            tables[key] = (cos[:, None, None], sin[:, None, None])  # [b, 1, 1, d]
        key_index = torch.arange(length, device=ids.device)[None]  # [1, L]
        masks = {}
        for window in set(self.windows):
            hidden = key_index > where[:, None]  # [b, L]
            if window is not None:
                hidden |= key_index <= where[:, None] - window
            masks[window] = hidden[:, None, None]  # [b, 1, 1, L]
        view = RaggedCache(keys, values)
        for i in range(len(self.layers)):

            def attend(x: torch.Tensor, i: int = i) -> torch.Tensor:
                rope, mask = tables[id(self.ropes[i])], masks[self.windows[i]]
                return self._ragged_attention(i, x, view, where, rope, mask)

            h = self._block(i, h, None, None, None, None, attend=attend)
        return self.norm(h[:, -1])

    def _block(self, i: int, h: torch.Tensor, cache, rows, rope, mask, attend=None) -> torch.Tensor:
        layer = self.layers[i]
        x = layer.input_layernorm(h)
        attended = attend(x) if attend is not None else self._attention(i, x, cache, rows, rope, mask)
        if self.sandwich:
            h = h + layer.post_attention_layernorm(attended)
            return h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
        h = h + attended
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def forward(
        self,
        ids: torch.Tensor,
        cache: LeanCache,
        patches: Sequence[Patch] = (),
        *,
        identical_rows: bool = False,
        last_only: bool = True,
    ) -> torch.Tensor:
        """The final-normed state of each row's last position ([B, d]) after `ids` ([B, t]).

        With `last_only` False, of every new position ([B, t, d]).

        The new tokens are appended to `cache`; `patches` (absolute positions, rows of this batch) are
        written into block outputs. `identical_rows`: every row's ids and cache are equal (a batch's
        prompt pass), so rows are computed once until a patch sets one apart.
        """
        batch, t = ids.shape
        rows = SharedRows([0] * batch, ids.device) if identical_rows and batch > 1 else None
        h = self.embed(ids[:1] if rows is not None else ids)  # [g, t, d]
        cache.reserve(len(self.layers), batch, self.kv_heads, self.head_dim, h, t)
        start = cache.length
        distinct = {id(r): r for r in self.ropes}  # one table, or Gemma 3's two
        tables = {key: rope.table(start, t, h.dtype) for key, rope in distinct.items()}
        masks = {w: self._mask(start, t, w, h.device) for w in set(self.windows)}
        by_layer: dict[int, list[Patch]] = defaultdict(list)
        for patch in patches:
            by_layer[patch.layer].append(patch)
        for i in range(len(self.layers)):
            h = self._block(i, h, cache, rows, tables[id(self.ropes[i])], masks[self.windows[i]])
            for patch in by_layer.get(i, ()):
                if rows is not None:
                    before = rows.follows[patch.row]
                    if rows.split(patch.row, h.shape[0]):  # it shared a computed row: copy that row
                        h = torch.cat((h, h[before][None]))
                at = patch.row if rows is None else rows.follows[patch.row]
                write_patches(h, at, patch.position - start, patch.vector)
        cache.length += t
        if not last_only:  # teacher-forced scoring reads every new position ([B, t, d])
            return self.norm(h if rows is None else h[rows.index])
        last = h[:, -1] if rows is None else h[rows.index, -1]
        return self.norm(last)
