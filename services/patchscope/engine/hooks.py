"""Reading and overwriting block outputs through forward hooks: the two hooks every Patchscope is made of.

Layer ℓ is the raw output of decoder block ℓ (0-based), as in the reference code. Both installers remove
their forward hooks in `finally`, so a failed forward never leaves a model patched or capturing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from patchscope.engine.models.layout import Layout
from patchscope.engine.models.loading import LoadedModel
from patchscope.engine.patch import Patch, block_hidden, write_patches
from patchscope.engine.template import tokenize_prompt
from patchscope.engine.validation import check_layers, check_positions, check_prompt


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
    model: LoadedModel, ids: torch.Tensor, layers: Sequence[int], positions: Sequence[int] | None = None
) -> dict[int, torch.Tensor]:
    """Run `model` on `ids` ([B, T]) and return block outputs keyed by layer.

    With `positions`, row 0 at those positions ([p, d]); without, the whole output ([B, T, d]). The forward
    stops after the highest requested layer: blocks above it, the final norm and the head never run.
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
        model.model(ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
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


@torch.inference_mode()
def extract(
    model: LoadedModel, prompt: str, layers: Sequence[int], positions: Sequence[int] | None = None
) -> HiddenStates:
    """All requested layers × positions of `prompt` from one forward pass (default position: last token)."""
    check_prompt("prompt", prompt)
    layers = check_layers("layers", layers, model.facts)
    token_ids = tokenize_prompt(model.tokenizer, prompt)
    positions = check_positions("positions", [-1] if positions is None else positions, len(token_ids))
    ids = torch.tensor([token_ids], device=model.device)  # [1, T]
    captured = capture(model, ids, layers, positions)
    states = torch.stack([captured[layer] for layer in layers]).to("cpu", torch.float32)  # [l, p, d]
    return HiddenStates(
        model_id=model.id,
        states=states,
        layers=layers,
        positions=positions,
        token_ids=token_ids,
        tokens=[model.tokenizer.decode([t]) for t in token_ids],
    )
