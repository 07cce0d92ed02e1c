"""Reading and overwriting block outputs through forward hooks: the two hooks every Patchscope is made of.

Layer ℓ is the raw output of decoder block ℓ (0-based), as in the reference code. Both installers remove
their forward hooks in `finally`, so a failed forward never leaves a model patched or capturing.

A long source pass runs in chunks of prompt positions over a KV cache (`iter_extract`): the replica's
worker thread is free between chunks, so a caller that leaves stops the pass within one chunk and the
next request does not wait for the whole prompt. Each chunk installs and removes its own hooks, so a pass
abandoned between chunks leaves the model as it was (its cache is only memory, freed with the pass).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
from transformers import DynamicCache

from patchscope.engine.kv_cache import cache_kwarg
from patchscope.engine.models.layout import Layout
from patchscope.engine.models.loading import LoadedModel
from patchscope.engine.patch import Patch, block_hidden, write_patches
from patchscope.engine.template import tokenize_prompt
from patchscope.engine.validation import check_layers, check_positions, check_prompt

T = TypeVar("T")


@contextmanager
def patching(layout: Layout, patches: Sequence[Patch], *, offset: int = 0) -> Iterator[None]:
    """Apply `patches` to every forward run inside the block; `offset` is the number of cached tokens.

    Positions are absolute; with a KV cache of `offset` tokens the forward sees them at `position - offset`.
    """
    by_layer: dict[int, list[Patch]] = defaultdict(list)
    for patch in patches:
        by_layer[patch.layer].append(patch)

    def make_hook(layer_patches: list[Patch]):
        device = layout.unembed.weight.device
        rows = torch.tensor([p.row for p in layer_patches], device=device)
        cols = torch.tensor([p.position - offset for p in layer_patches], device=device)
        vectors = torch.stack([p.vector for p in layer_patches]).to(device)  # [n, d]

        def hook(_module, _args, output):
            write_patches(block_hidden(output), rows, cols, vectors)
            return output

        return hook

    handles = [layout.blocks[layer].register_forward_hook(make_hook(ps)) for layer, ps in by_layer.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _StopForward(Exception):
    """Raised by the last capture hook: blocks above the highest requested layer need not run."""


def capture(
    model: LoadedModel,
    ids: torch.Tensor,
    layers: Sequence[int],
    positions: Sequence[int] | None = None,
    cache: DynamicCache | None = None,
) -> dict[int, torch.Tensor]:
    """Run `model` on `ids` ([B, T]) and return block outputs keyed by layer.

    With `positions`, row 0 at those positions ([p, d]); without, the whole output ([B, T, d]). The forward
    stops after the highest requested layer: blocks above it, the final norm and the head never run. With
    `cache`, `ids` continue the tokens already in it (positions are then relative to this call's ids), and
    the blocks up to the highest requested layer add this call's keys and values to it.
    """
    captured: dict[int, torch.Tensor] = {}
    last = max(layers)
    index = None if positions is None else list(positions)

    def make_hook(layer: int):
        def hook(_module, _args, output):
            hidden = block_hidden(output).detach()
            captured[layer] = hidden if index is None else hidden[0, index]
            if layer == last:
                raise _StopForward

        return hook

    handles = [model.layout.blocks[layer].register_forward_hook(make_hook(layer)) for layer in set(layers)]
    try:
        if cache is None:
            model.model(ids, use_cache=False)
        else:
            model.model(ids, use_cache=True, **{cache_kwarg(type(model.model)): cache})
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


def iter_capture(
    model: LoadedModel,
    ids: torch.Tensor,
    layers: Sequence[int],
    positions: Sequence[int],
    chunk_tokens: int | None = None,
) -> Generator[None, None, dict[int, torch.Tensor]]:
    """`capture` of row 0 at `positions` ([p, d] per layer), one forward of <= `chunk_tokens` tokens a step.

    A prompt that fits one chunk (or `chunk_tokens` None) runs `capture` itself, the same forward as ever;
    a longer one runs its chunks over a KV cache and stops after the chunk holding the last requested
    position (causal attention: later tokens cannot change it). Chunked states match the one-pass states
    to float rounding, not bit for bit. The generator yields between chunks; its value is the states.
    """
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1 or None, got {chunk_tokens}")
    positions = list(positions)
    if chunk_tokens is None or ids.shape[1] <= chunk_tokens:
        return capture(model, ids, layers, positions)
    cache = DynamicCache(config=model.model.config)
    parts: dict[int, list[tuple[list[int], torch.Tensor]]] = defaultdict(list)  # layer -> (indices, rows)
    for start in range(0, max(positions) + 1, chunk_tokens):
        if start:
            yield
        end = start + chunk_tokens
        wanted = [j for j, p in enumerate(positions) if start <= p < end]
        got = capture(model, ids[:, start:end], layers, [positions[j] - start for j in wanted], cache)
        for layer, rows in got.items():
            parts[layer].append((wanted, rows))
    captured = {}
    for layer, pieces in parts.items():
        out = pieces[0][1].new_empty((len(positions), pieces[0][1].shape[-1]))
        for wanted, rows in pieces:
            if wanted:
                out[wanted] = rows
        captured[layer] = out
    return captured


@dataclass(frozen=True)
class HiddenStates:
    """Hidden states of one prompt: `states[i, j]` is layer `layers[i]` at position `positions[j]`."""

    model_id: str
    states: torch.Tensor  # [l, p, d] float32 on the CPU
    layers: list[int]
    positions: list[int]  # absolute, BOS counted
    token_ids: list[int]  # the whole prompt
    tokens: list[str]  # the whole prompt, one string per token


def iter_extract(
    model: LoadedModel,
    prompt: str,
    layers: Sequence[int],
    positions: Sequence[int] | None = None,
    *,
    chunk_tokens: int | None = None,
) -> Generator[None, None, HiddenStates]:
    """`extract` in chunks of at most `chunk_tokens` prompt tokens, yielding between them (see the module)."""
    with torch.inference_mode():
        check_prompt("prompt", prompt)
        layers = check_layers("layers", layers, model.facts)
        token_ids = tokenize_prompt(model.tokenizer, prompt)
        positions = check_positions("positions", [-1] if positions is None else positions, len(token_ids))
        ids = torch.tensor([token_ids], device=model.device)  # [1, T]
    chunks = iter_capture(model, ids, layers, positions, chunk_tokens)
    while True:
        with torch.inference_mode():  # per chunk: the mode is thread-local, and chunks may change threads
            try:
                next(chunks)
            except StopIteration as stop:
                captured = stop.value
                break
        yield
    with torch.inference_mode():
        states = torch.stack([captured[layer] for layer in layers]).to("cpu", torch.float32)  # [l, p, d]
    return HiddenStates(
        model_id=model.id,
        states=states,
        layers=layers,
        positions=positions,
        token_ids=token_ids,
        tokens=[model.tokenizer.decode([t]) for t in token_ids],
    )


def drain(work: Generator[None, None, T]) -> T:
    """Run a chunked generator to its end on this thread; its value."""
    while True:
        try:
            next(work)
        except StopIteration as stop:
            return stop.value


def extract(
    model: LoadedModel, prompt: str, layers: Sequence[int], positions: Sequence[int] | None = None
) -> HiddenStates:
    """All requested layers × positions of `prompt` from one forward pass (default position: last token)."""
    return drain(iter_extract(model, prompt, layers, positions))
