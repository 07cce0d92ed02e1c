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

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel

from patchscope.engine.models.layout import ARCHITECTURES, hook_points, lean_families
from patchscope.engine.models.lean_cache import LeanCache, RaggedCache, SharedRows
from patchscope.engine.options import FORWARDS, Forward
from patchscope.engine.patch import Patch, write_patches

STATIC_ROPE = {"default", "linear", "llama3"}  # rope types whose frequency table never changes


def _layer_types(model: PreTrainedModel) -> list[str]:
    return list(
        getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    )


def _rope_types(model: PreTrainedModel) -> set[str]:
    rope_type = getattr(
        model.get_submodule(hook_points(model.config.model_type).rotary), "rope_type", "default"
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
        config, paths = model.config, hook_points(model.config.model_type)
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
