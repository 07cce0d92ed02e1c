"""Explain your production model's activations: capture them in your own process and send only them.

A forward hook on the chosen decoder blocks of a running Hugging Face model reads their outputs (layer ℓ
is the raw output of block ℓ, as on the server) at the chosen positions; the prompt never leaves your
process. Needs the `[torch]` extra.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources

from patchscope_client.errors import require
from patchscope_client.types import Event


@cache
def layouts() -> dict[str, dict[str, str]]:
    """The server's architecture table as this package carries it: model type -> module paths.

    A copy written by `make layouts` from the server's `engine/models/layout.py` (the client never imports
    the server); a unit test fails when the two differ.
    """
    return json.loads(resources.files("patchscope_client").joinpath("layouts.json").read_text())


@dataclass(frozen=True)
class Captured:
    """Rows of `states` ([sites, hidden] float32) with each row's layer, position and token."""

    states: object  # a torch tensor
    layers: list[int]
    positions: list[int]
    tokens: list[str]


def decoder_blocks(model) -> Sequence:
    """The decoder blocks of a causal LM: its model type's path, else any path the table knows."""
    table = layouts()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    own = [table[model_type]["blocks"]] if model_type in table else []
    paths = list(dict.fromkeys(own + [row["blocks"] for row in table.values()]))
    for path in paths:
        node = model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if node is not None:
            return node
    raise ValueError(
        f"cannot find the decoder blocks of {type(model).__name__} (looked at {', '.join(paths)})"
    )


def fingerprint(model) -> str:
    """sha256 of the input embedding as float32: equals the server's fingerprint of the same weights."""
    weight = model.get_input_embeddings().weight.detach().float().cpu().contiguous()
    return hashlib.sha256(weight.numpy().tobytes()).hexdigest()


def capture(
    model, tokenizer, prompt: str, layers: Sequence[int], positions: Sequence[int] = (-1,)
) -> Captured:
    """One forward pass of `prompt`; the states of `layers` × `positions` (layer-major rows)."""
    torch = require("torch", "torch")
    blocks = decoder_blocks(model)
    encoded = tokenizer(prompt, return_tensors="pt")
    ids = encoded["input_ids"].to(next(model.parameters()).device)
    n = ids.shape[1]
    absolute = [p % n if -n <= p < n else None for p in positions]
    if None in absolute:
        raise ValueError(f"positions {list(positions)} out of range for a prompt of {n} tokens")
    seen: dict[int, object] = {}

    def hook(layer: int):
        def read(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            seen[layer] = hidden[0, absolute].detach().float().cpu()

        return read

    handles = [blocks[layer].register_forward_hook(hook(layer)) for layer in layers]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    token_strings = [tokenizer.decode([int(ids[0, p])]) for p in absolute]
    return Captured(
        states=torch.cat([seen[layer] for layer in layers]),
        layers=[layer for layer in layers for _ in absolute],
        positions=[p for _ in layers for p in absolute],
        tokens=[t for _ in layers for t in token_strings],
    )


def explain_model_activations(
    client,
    model,
    tokenizer,
    prompt: str,
    layers: Sequence[int],
    positions: Sequence[int] = (-1,),
    *,
    source: str,
    target: str,
    model_id: str = "",
    **options,
) -> Iterator[Event]:
    """Capture `model`'s states of `prompt` here and explain them through the service's `target`.

    `source` is the hosted model with the same architecture whose mappings apply; the service flags the
    request (`provenance_mismatch`) when your weights differ from it, as a fine-tuned model's do.
    """
    captured = capture(model, tokenizer, prompt, layers, positions)
    return client.explain_activations(
        captured.states,
        source=source,
        layers=captured.layers,
        positions=captured.positions,
        tokens=captured.tokens,
        model=model_id or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        fingerprint=fingerprint(model),
        target=target,
        **options,
    )
