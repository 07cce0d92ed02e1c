"""Hook sites as data: where each architecture keeps its decoder blocks, final norm and unembedding.

Adding an architecture is one row in `ARCHITECTURES`; the hook code never branches on model type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from patchscope.engine.errors import UnsupportedArchitecture
from patchscope.engine.models.packed import PackedLinear


@dataclass(frozen=True)
class SitePaths:
    """Dotted module paths of the logical sites of one architecture."""

    blocks: str
    final_norm: str
    unembed: str
    embed: str


_LLAMA_LIKE = SitePaths(
    blocks="model.layers", final_norm="model.norm", unembed="lm_head", embed="model.embed_tokens"
)

ARCHITECTURES: dict[str, SitePaths] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gpt2": SitePaths(
        blocks="transformer.h", final_norm="transformer.ln_f", unembed="lm_head", embed="transformer.wte"
    ),
    "gpt_neox": SitePaths(
        blocks="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        embed="gpt_neox.embed_in",
    ),
}


@dataclass(frozen=True)
class Layout:
    """The resolved modules of one loaded model."""

    paths: SitePaths
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

        `W @ h.T` rather than `linear(h, W)`: with few rows and a large vocabulary the former is the
        faster CPU kernel (measured ~20% on SmolLM2's 49k × 576 head), and decoding calls it every step.
        """
        if isinstance(self.unembed, PackedLinear):  # oneDNN's packed head beats both (packed.py)
            logits = self.unembed(normed)
        else:
            logits = (self.unembed.weight @ normed.T).T  # [V, n] -> [n, V]
            if getattr(self.unembed, "bias", None) is not None:
                logits = logits + self.unembed.bias
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def site_paths(model_type: str) -> SitePaths:
    """The table row for `model_type`, or a clear error listing what is supported."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"architecture {model_type!r} has no hook-site entry; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


def discover(model: nn.Module) -> Layout:
    """Resolve the site table against a loaded causal LM."""
    paths = site_paths(model.config.model_type)
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
