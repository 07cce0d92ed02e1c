"""One patch type and one write: every forward (hooked, lean, static) overwrites block outputs here.

Layer ℓ is the raw output of decoder block ℓ (0-based), as in the reference code; positions are absolute
token indices, BOS counted. A forward that starts from a KV cache of `offset` tokens sees a patch at
`position - offset`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Patch:
    """Overwrite block `layer`'s output at absolute `position` of batch row `row` with `vector` ([d])."""

    row: int
    position: int
    layer: int
    vector: torch.Tensor


def block_hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden states ([B, T, d]) of a block's output."""
    # transformers 5 blocks return a tensor; older or custom blocks return (hidden, ...).
    return output[0] if isinstance(output, tuple) else output


def write_patches(
    hidden: torch.Tensor,
    rows: torch.Tensor | int,
    positions: torch.Tensor | int,
    vectors: torch.Tensor,
) -> None:
    """Overwrite `hidden` ([B, T, d]) in place at (`rows[k]`, `positions[k]`) with `vectors[k]` ([n, d]).

    `positions` are relative to the forward's first new token. Scalar `rows` and `positions` write one
    vector ([d]). The vectors take the hidden states' dtype and device: a state extracted in fp32 on the
    CPU patches a bf16 model on a GPU. Index tensors follow the hidden states too: in a model placed
    across devices (models/placement.py) the installer builds them on the first device, while the block
    they patch may run on another, and torch indexes a tensor only with indices on its device or the CPU.
    """
    if isinstance(rows, torch.Tensor):
        rows = rows.to(hidden.device)
    if isinstance(positions, torch.Tensor):
        positions = positions.to(hidden.device)
    hidden[rows, positions] = vectors.to(hidden.device, hidden.dtype)
