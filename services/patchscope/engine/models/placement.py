"""A model too large for one device, split across several by decoder blocks (pipeline-style placement).

Why not accelerate's `dispatch_model`: it treats a "cpu" entry as offloading (the weights move to the
meta device and are copied in at every forward), which would leave `layout.unembed.weight`, the
fingerprint and the logit lens reading meta tensors. Here every module keeps real weights on its own
device: the embedding, the rotary table, the final norm and the head on the first device (the head is
often tied to the embedding), the blocks on theirs, and a pre-hook on each block moves its inputs
(hidden states, masks, rotary tables) to the block's device. Outputs of the whole model stay on the first
device, where callers put their ids, so generation, scoring and extraction need no change; a patch lands
on its block's device through `patch.write_patches`, and transformers' caches keep each layer's keys on
that layer's device. The lean forward calls the blocks' submodules directly, past those hooks, so a
placed model runs transformers' forward (`TargetRuntime.build`).

A placement of "cpu" for every block runs exactly this code path on a CPU-only machine (torch has one CPU
device: "cpu:1" is "cpu"), which is what the unit tests do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from patchscope.engine.models.loading import LoadedModel
from patchscope.engine.models.packed import PackedLinear

ATTRIBUTE = "patchscope_placement"  # set on the placed PreTrainedModel: how it was split


@dataclass(frozen=True)
class BlockPlacement:
    """The device of every decoder block, in block order; everything else lives on `blocks[0]`'s."""

    blocks: tuple[str, ...]

    @property
    def first(self) -> str:
        return self.blocks[0]

    @property
    def devices(self) -> tuple[str, ...]:
        """The distinct devices, in the order the blocks reach them."""
        return tuple(dict.fromkeys(self.blocks))

    def describe(self) -> str:
        """E.g. "cuda:0 blocks 0-14, cuda:1 blocks 15-29"."""
        spans = []
        for device in self.devices:
            where = [i for i, d in enumerate(self.blocks) if d == device]
            spans.append(f"{device} blocks {where[0]}-{where[-1]}")
        return ", ".join(spans)


def _check_device(name: str) -> str:
    """`name` as torch spells it, or a clear error for a device this process cannot use."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"placement device {name!r} is not a torch device: {e}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.index if device.index is not None else 0
        if index >= count:
            raise ValueError(
                f"placement device {name!r} does not exist: this process sees {count} CUDA device(s) "
                "(give the replica as many GPUs as the placement names, ray_actor_options.num_gpus)"
            )
        return f"cuda:{index}"
    if device.type != "cpu":
        raise ValueError(f"placement device {name!r}: only cpu and cuda devices are supported")
    return "cpu"


def even_counts(num_blocks: int, num_devices: int) -> list[int]:
    """Block counts that differ by at most one; the extra blocks go to the last devices."""
    base, extra = divmod(num_blocks, num_devices)
    return [base + (1 if k >= num_devices - extra else 0) for k in range(num_devices)]


def spread(num_blocks: int, devices: Sequence[str], counts: Sequence[int] | None = None) -> BlockPlacement:
    """Blocks split into contiguous runs, one per device: `counts[k]` blocks on `devices[k]`.

    Without `counts`, as even as the numbers allow; the first device, which also holds the embedding and
    the head, takes the smaller share when they do not divide.
    """
    if not devices:
        raise ValueError("a placement needs at least one device")
    names = [_check_device(d) for d in devices]
    if counts is None:
        counts = even_counts(num_blocks, len(names))
    if len(counts) != len(names):
        raise ValueError(f"placement names {len(names)} devices but {len(counts)} block counts")
    if any(c < 0 for c in counts) or sum(counts) != num_blocks:
        raise ValueError(f"placement block counts {list(counts)} must be >= 0 and sum to {num_blocks}")
    return BlockPlacement(tuple(d for d, c in zip(names, counts, strict=True) for _ in range(c)))


def to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (in tuples, lists, dicts) on `device`; other objects as given."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def _move_inputs(device: torch.device):
    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return to_device(args, device), to_device(kwargs, device)

    return hook


def placement_of(loaded: LoadedModel) -> BlockPlacement | None:
    """How `loaded` was placed, or None for a model on one device the ordinary way."""
    return getattr(loaded.model, ATTRIBUTE, None)


def place(loaded: LoadedModel, placement: BlockPlacement) -> LoadedModel:
    """Move `loaded`'s modules to `placement`'s devices in place and install the input moves; returns it.

    Place a model once, right after loading and before any runtime is built on it.
    """
    layout = loaded.layout
    if len(placement.blocks) != layout.num_layers:
        raise ValueError(
            f"placement covers {len(placement.blocks)} blocks; {loaded.id} has {layout.num_layers}"
        )
    if placement_of(loaded) is not None:
        raise ValueError(f"{loaded.id} is placed already ({placement_of(loaded).describe()})")
    packed = any(isinstance(m, PackedLinear) for m in loaded.model.modules())
    if packed and any(d != "cpu" for d in placement.devices):
        raise ValueError(
            "oneDNN-packed linears (gemm onednn/auto) cannot move off the CPU: load with gemm aten"
        )
    loaded.model.to(placement.first)
    for block, device in zip(layout.blocks, placement.blocks, strict=True):
        block.to(device)
        block.register_forward_pre_hook(_move_inputs(torch.device(device)), with_kwargs=True)
    # The last block's output comes back to the first device for the final norm and the head.
    layout.final_norm.register_forward_pre_hook(_move_inputs(torch.device(placement.first)), with_kwargs=True)
    setattr(loaded.model, ATTRIBUTE, placement)
    return loaded
