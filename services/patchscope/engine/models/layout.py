"""Hook points as data: where each architecture keeps its decoder blocks, final norm and unembedding.

Adding an architecture is one row in `ARCHITECTURES`; the hook code, the lean forward and the mapping's
head lens never branch on model type. The client's capture helper, which may not import the server, reads
a copy of it that `make layouts` writes from `client_copy` (a unit test fails when the two differ).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from patchscope.engine.errors import UnsupportedArchitecture
from patchscope.engine.models.packed import PackedLinear


@dataclass(frozen=True)
class HookPoints:
    """Dotted module paths of one architecture's hook points (a *site* is a position and its layers)."""

    blocks: str
    final_norm: str
    unembed: str
    embed: str
    rotary: str | None = None  # the rotary-embedding module, whose tables the lean forward reuses
    # The block is (norm, attention with optional q/k norms, residual, norm, MLP, residual), with Gemma 3's
    # extra norms after attention and MLP: the lean forward (lean.py) writes it out. Each such row is
    # checked against transformers by test_lean.py.
    lean: bool = False


_LLAMA_LIKE = HookPoints(
    blocks="model.layers",
    final_norm="model.norm",
    unembed="lm_head",
    embed="model.embed_tokens",
    rotary="model.rotary_emb",
)
_LEAN = dataclasses.replace(_LLAMA_LIKE, lean=True)

ARCHITECTURES: dict[str, HookPoints] = {
    "llama": _LEAN,
    "mistral": _LEAN,
    "qwen2": _LEAN,
    "qwen3": _LEAN,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LEAN,
    "gpt2": HookPoints(
        blocks="transformer.h", final_norm="transformer.ln_f", unembed="lm_head", embed="transformer.wte"
    ),
    "gpt_neox": HookPoints(
        blocks="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        embed="gpt_neox.embed_in",
    ),
}


@dataclass(frozen=True)
class Layout:
    """The resolved modules of one loaded model."""

    paths: HookPoints
    blocks: nn.ModuleList
    final_norm: nn.Module
    unembed: nn.Module
    softcap: float | None

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm, unembedding and (Gemma) soft-capping: the logit lens applies the norm exactly once."""
        return self.unembed_normed(self.final_norm(hidden))

    def unembed_normed(self, normed: torch.Tensor) -> torch.Tensor:
        """Logits ([n, V]) of already-normed states ([n, d]), as the model's own head computes them.

        One row is `W @ h.T`, the faster CPU kernel for a single decode row (bench/results.md). More rows
        use `linear`: no slower there, and its logits are contiguous, where the transposed product makes
        every reduction over the vocabulary after it (argmax, log-sum-exp) several times slower.
        """
        bias = getattr(self.unembed, "bias", None)
        if isinstance(self.unembed, PackedLinear):  # oneDNN's packed head beats both (packed.py)
            logits = self.unembed(normed)
        elif normed.dim() == 2 and normed.shape[0] == 1:
            logits = (self.unembed.weight @ normed.T).T  # [V, 1] -> [1, V], contiguous
            logits = logits if bias is None else logits + bias
        else:
            logits = nn.functional.linear(normed, self.unembed.weight, bias)
        return self.capped(logits)

    def capped(self, logits: torch.Tensor) -> torch.Tensor:
        """The head's soft-capping (Gemma) of raw logits; the identity for models without one."""
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits


def hook_points(model_type: str) -> HookPoints:
    """The table row for `model_type`, or a clear error listing what is supported."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"architecture {model_type!r} has no hook-point entry; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


def discover(model: nn.Module) -> Layout:
    """Resolve the hook-point table against a loaded causal LM."""
    paths = hook_points(model.config.model_type)
    blocks = model.get_submodule(paths.blocks)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) != model.config.num_hidden_layers:
        raise UnsupportedArchitecture(
            f"{paths.blocks} of {model.config.model_type} is not a list of "
            f"{model.config.num_hidden_layers} blocks"
        )
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return Layout(
        paths=paths,
        blocks=blocks,
        final_norm=model.get_submodule(paths.final_norm),
        unembed=model.get_submodule(paths.unembed),
        softcap=float(softcap) if softcap else None,
    )


def lean_families() -> tuple[str, ...]:
    """The model types the lean forward runs (the table's `lean` column)."""
    return tuple(model_type for model_type, paths in ARCHITECTURES.items() if paths.lean)


def client_copy() -> dict[str, dict[str, str]]:
    """The table as the client's capture helper reads it (`patchscope_client/layouts.json`)."""
    return {
        model_type: {"blocks": paths.blocks, "embed": paths.embed}
        for model_type, paths in sorted(ARCHITECTURES.items())
    }
