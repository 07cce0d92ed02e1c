"""The fast path for greedy sweeps: a patched prefill into a static KV cache, then decoding on the device.

After the patched prompt pass nothing is hooked (later tokens see the patch only through the cache), so a
decode step is one fixed-shape function of (last tokens, position, cache). A `StaticCache` keeps its tensors
at fixed addresses, so the loop can run with every token kept on the device until the end: no host
round-trip per step. Three levels, each measured by `bench/bench_gpu.py`:

- `mode` compiles the step with `torch.compile` ("reduce-overhead" replays it as a CUDA graph per step);
- `compile_prefill` makes the patch an *input* of the prompt pass (per row: layer, position and vector in
  buffers read by permanent hooks) instead of a hook closure built per call, so the prefill compiles too;
- `capture` (CUDA, sweeps) records prefill and all decode steps as one CUDA graph per (batch, template
  length, new tokens): a sweep is one copy of its inputs and one replay.

Without `compile_prefill` or `capture` the prefill is the eager engine's, so the first token is exactly the
eager path's. Greedy only. Models with sliding-window layers are refused: their static layers count
tokens in a Python int, which would recompile the step at every position.

`RaggedStep` is the service's fast path: continuous batching's decode step (engine/scheduler.py, streamed
and cancellable) at bucketed shapes, rows padded to a power of two and the key length to the ragged
cache's bucketed capacity, so `torch.compile` ("reduce-overhead": a CUDA graph per bucket) sees a few
shapes and replays them. Any sampling happens outside it, per request; sliding windows are masks here.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import StaticCache

from patchscope.engine.errors import InvalidArgument
from patchscope.engine.hooks import patching
from patchscope.engine.kv_cache import cache_kwarg
from patchscope.engine.models.lean import LeanDecoder
from patchscope.engine.models.lean_cache import RaggedCache
from patchscope.engine.models.loading import LoadedModel
from patchscope.engine.options import Decode
from patchscope.engine.patch import Patch, block_hidden, write_patches

CACHE_BUCKET = 64  # cache lengths round up to this, so templates of similar length share one cache
MAX_GRAPHS = 8  # captured sweeps kept per decoder (each holds its own memory pool)

Slots = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # per row: layer [B], position [B], vector [B, d]


def unsupported_reason(target: LoadedModel) -> str | None:
    """Why `target` cannot use the static decode path, or None when it can."""
    config = target.model.config
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"} or getattr(config, "sliding_window", None):
        return f"{target.id} has sliding-window attention layers"
    return None


class _PatchSlots:
    """Permanent hooks that patch row r's block `layers[r]` output at `positions[r]` with `vectors[r]`.

    They read `current`, which is None outside a slotted prefill: eager forwards pass through untouched and
    the compiled decode step (traced with None) contains no patching at all.
    """

    def __init__(self, target: LoadedModel) -> None:
        self.current: Slots | None = None
        for layer, block in enumerate(target.layout.blocks):
            block.register_forward_hook(self._hook(layer))

    def _hook(self, layer: int) -> Callable:
        def hook(_module, _args, output):
            if self.current is None:
                return None
            layers, positions, vectors = self.current
            hidden = block_hidden(output)  # [B, T, d]
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            # Every row is written at every layer (fixed shapes, no branch to trace): rows patched
            # elsewhere get their own state back.
            here = hidden[rows, positions]  # [B, d]
            write_patches(hidden, rows, positions, torch.where((layers == layer)[:, None], vectors, here))
            return output

        return hook


_SLOTS: weakref.WeakKeyDictionary[torch.nn.Module, _PatchSlots] = weakref.WeakKeyDictionary()


def _slots_for(target: LoadedModel) -> _PatchSlots:
    """One set of slot hooks per model, however many decoders use it."""
    if target.model not in _SLOTS:
        _SLOTS[target.model] = _PatchSlots(target)
    return _SLOTS[target.model]


@dataclass
class _Captured:
    """One recorded sweep: its input buffers, its output buffer and the graph that links them."""

    graph: torch.cuda.CUDAGraph
    prompt: torch.Tensor  # [B, T]
    slots: Slots
    out: torch.Tensor  # [B, N]


@dataclass
class StaticDecoder:
    """Greedy patched generation for one target with a static cache per (batch, length bucket).

    `mode` is torch.compile's (None: eager, the reference the compiled forms are checked against).
    """

    target: LoadedModel
    mode: str | None = "reduce-overhead"
    compile_prefill: bool = False
    capture: bool = False
    _caches: dict[tuple[int, int], StaticCache] = field(default_factory=dict, repr=False)
    _graphs: OrderedDict[tuple[int, int, int], _Captured] = field(default_factory=OrderedDict, repr=False)

    def __post_init__(self) -> None:
        reason = unsupported_reason(self.target)
        if reason is not None:
            raise InvalidArgument("decode", f"the static decode path is unavailable: {reason}")
        if self.capture and self.target.device.type != "cuda":
            raise InvalidArgument("capture", "CUDA graphs need a CUDA device", value=str(self.target.device))
        base = self.target.model.base_model
        kwarg = cache_kwarg(type(base))
        unembed = self.target.layout.unembed_normed

        def step(ids: torch.Tensor, positions: torch.Tensor, cache: StaticCache) -> torch.Tensor:
            """Next greedy token of every row ([B]) after `ids` ([B, t]) at `positions` ([1, t])."""
            normed = base(ids, position_ids=positions, use_cache=True, **{kwarg: cache}).last_hidden_state
            return unembed(normed[:, -1]).argmax(dim=-1)

        def prefill(ids: torch.Tensor, positions: torch.Tensor, cache: StaticCache) -> torch.Tensor:
            """`step` for the prompt pass; a function of its own so its graph is compiled apart."""
            normed = base(ids, position_ids=positions, use_cache=True, **{kwarg: cache}).last_hidden_state
            return unembed(normed[:, -1]).argmax(dim=-1)

        def compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
            return fn if self.mode is None else torch.compile(fn, mode=self.mode, dynamic=False)

        self._eager = step
        self._step = compiled(step)
        self._slots = _slots_for(self.target) if self.compile_prefill or self.capture else None
        self._prefill = compiled(prefill) if self.compile_prefill else prefill

    def _cache(self, batch: int, length: int) -> StaticCache:
        bucket = -(-length // CACHE_BUCKET) * CACHE_BUCKET
        cache = self._caches.get((batch, bucket))
        if cache is None:
            config = self.target.model.config
            cache = StaticCache(config=config, max_cache_len=bucket)
            # Allocated here, not lazily inside a compiled prefill, so the tensors keep static addresses.
            heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            cache.early_initialization(batch, heads, head_dim, self.target.dtype, self.target.device)
            self._caches[(batch, bucket)] = cache
        return cache

    def _run(
        self,
        prompt: torch.Tensor,
        slots: Slots | None,
        patches: Sequence[Patch],
        cache: StaticCache,
        out: torch.Tensor,
        on_prefilled: Callable[[], None],
    ) -> None:
        """Prefill (through the slots when given, else the eager hooks) and decode into `out` ([B, N])."""
        length, steps = prompt.shape[1], out.shape[1]
        device = prompt.device
        # Per-step modes replay a CUDA graph per call; a captured sweep is one graph and marks nothing.
        marks = self.mode == "reduce-overhead" and device.type == "cuda" and not self.capture
        positions = torch.arange(length + steps, device=device)[None]  # [1, T + N]
        # One fresh [1, 1] tensor per step: a view at a moving offset could make the graph recompile.
        step_positions = [positions[:, at : at + 1].clone() for at in range(length, length + steps)]
        cache.reset()
        if slots is not None:
            self._slots.current = slots
            try:
                if marks and self.compile_prefill:
                    torch.compiler.cudagraph_mark_step_begin()
                token = self._prefill(prompt, positions[:, :length], cache).clone()  # [B]
            finally:
                self._slots.current = None
        else:
            with patching(self.target.layout, patches):
                token = self._eager(prompt, positions[:, :length], cache)
        out[:, 0] = token
        on_prefilled()
        for i in range(1, steps):
            if marks:
                torch.compiler.cudagraph_mark_step_begin()
            token = self._step(token[:, None], step_positions[i - 1], cache).clone()
            out[:, i] = token

    def _captured(self, batch: int, length: int, steps: int) -> _Captured:
        """The recorded sweep for this shape: warmed up on a side stream (compiles there), then captured."""
        key = (batch, length, steps)
        if key in self._graphs:
            self._graphs.move_to_end(key)
            return self._graphs[key]
        device, hidden = self.target.device, self.target.model.config.hidden_size
        prompt = torch.zeros(batch, length, dtype=torch.long, device=device)
        slots = (
            torch.full((batch,), -1, dtype=torch.long, device=device),
            torch.zeros(batch, dtype=torch.long, device=device),
            torch.zeros(batch, hidden, dtype=self.target.dtype, device=device),
        )
        out = torch.zeros(batch, steps, dtype=torch.long, device=device)
        cache = self._cache(batch, length + steps)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(prompt, slots, (), cache, out, lambda: None)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._run(prompt, slots, (), cache, out, lambda: None)
        self._graphs[key] = _Captured(graph, prompt, slots, out)
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        return self._graphs[key]

    @torch.inference_mode()
    def generate(
        self,
        ids: Sequence[int],
        patches: Sequence[Patch],
        batch: int,
        max_new_tokens: int,
        on_prefilled: Callable[[], None] = lambda: None,
    ) -> torch.Tensor:
        """Token ids ([batch, max_new_tokens], on the device) of `batch` rows of the template `ids`.

        Every row runs all `max_new_tokens` steps; the caller cuts each row at its first stop token.
        `on_prefilled` runs between the prompt pass and the decode loop (for timing; it may synchronise);
        a captured sweep has no such point and never calls it (its whole time counts as decoding).
        """
        device = self.target.device
        prompt = torch.tensor(ids, device=device)[None].expand(batch, -1)  # [B, T]
        # Slots take a sweep (exactly one patch per row); other shapes of patching use the eager hooks.
        sweep = sorted(p.row for p in patches) == list(range(batch))
        slots = None
        if self._slots is not None and sweep:
            order = sorted(patches, key=lambda p: p.row)
            slots = (
                torch.tensor([p.layer for p in order], device=device),
                torch.tensor([p.position for p in order], device=device),
                torch.stack([p.vector for p in order]).to(device, self.target.dtype),
            )
        if self.capture and slots is not None:
            captured = self._captured(batch, len(ids), max_new_tokens)
            captured.prompt.copy_(prompt)
            for buffer, value in zip(captured.slots, slots, strict=True):
                buffer.copy_(value)
            captured.graph.replay()
            return captured.out.clone()
        out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
        self._run(prompt, slots, patches, self._cache(batch, len(ids) + max_new_tokens), out, on_prefilled)
        return out


RAGGED_TOKENS = 64  # the ragged cache's capacity rounds up to this under a compiled step


class RaggedStep:
    """The continuous-batching decode step at bucketed shapes, compiled with `mode` (None: eager).

    Called like `LeanDecoder.step` (`ids` [n], one per live slot of `cache`), it returns the logits
    ([n, V]); padded rows (token 0 at length 0 in a free slot) are computed and dropped.
    """

    def __init__(self, target: LoadedModel, lean: LeanDecoder, mode: str | None = "reduce-overhead") -> None:
        self.target, self.lean, self.mode = target, lean, mode
        unembed = target.layout.unembed_normed

        def step(ids: torch.Tensor, where: torch.Tensor, keys: list, values: list) -> torch.Tensor:
            return unembed(lean.ragged_step(ids, where, keys, values, keys[0].shape[2])).float()

        self._step = step if mode is None else torch.compile(step, mode=mode, dynamic=False)
        self.shapes: set[tuple[int, int]] = set()  # (rows, key length) buckets seen: each compiles once

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, cache: RaggedCache) -> torch.Tensor:
        n = ids.shape[0]
        if n != cache.rows:
            raise ValueError(f"step needs ids of shape [{cache.rows}], got {list(ids.shape)}")
        cache.bucket = cache.bucket or RAGGED_TOKENS
        rows = 1 << (n - 1).bit_length()  # [b] rows, b a power of two
        cache.reserve_step(rows)
        padded = ids.new_zeros(rows)
        padded[:n] = ids
        where = ids.new_zeros(rows)
        where[:n] = torch.tensor(cache.lengths, device=ids.device)
        self.shapes.add((rows, cache.keys[0].shape[2]))
        if self.mode == "reduce-overhead" and ids.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        logits = self._step(padded, where, cache.keys, cache.values)[:n].clone()  # [n, V]
        cache.lengths = [length + 1 for length in cache.lengths]
        return logits


# The loops `EngineOptions.decode` names besides "eager" (bench/bench_gpu.py's cases A, D and C).
DECODE_MODES: dict[Decode, dict[str, object]] = {
    "static": dict(mode="reduce-overhead"),
    "graph": dict(mode=None, capture=True),
    "compiled-graph": dict(mode="default", compile_prefill=True, capture=True),
}


def static_decoder(target: LoadedModel, decode: Decode) -> StaticDecoder | None:
    """The decoder of the loop `decode` names, or None for the eager loop."""
    return None if decode == "eager" else StaticDecoder(target, **DECODE_MODES[decode])
