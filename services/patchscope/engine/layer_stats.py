"""Each layer's typical state over a fixed ordinary text: its norm and its mean.

The norm is reported beside every mapped state (a map far off shows there). The mean is the mean-state
control's patch: a state that holds nothing in particular, so what the target says with it at a site is
what the template and the layer produce on their own, the baseline an explanation has to beat beyond the
unpatched row (which keeps the target's own state at the placeholder).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patchscope.engine.hooks import capture
from patchscope.engine.models.loading import LoadedModel
from patchscope.engine.template import tokenize_prompt

# Fixed, ordinary English: the warm-up pass and both statistics come from it.
WARMUP_TEXT = (
    "The river runs past the old mill, where the baker sells bread every morning to farmers, "
    "teachers and children on their way to school. In the evening the square fills with people who "
    "talk about the weather, the harvest and the news from the city. Some of them have never travelled "
    "further than the next village, while others remember years spent working in distant countries."
)


@dataclass(frozen=True)
class LayerStats:
    """Per block: the mean L2 norm of its output states and their mean ([d] float32 on the CPU).

    Position 0 is left out: in most models it is the attention sink, whose norm is far from the rest.
    """

    norms: tuple[float, ...]
    means: tuple[torch.Tensor, ...]


@torch.inference_mode()
def layer_stats(model: LoadedModel) -> LayerStats:
    """One forward of `WARMUP_TEXT` through `model`, read at every block."""
    ids = tokenize_prompt(model.tokenizer, WARMUP_TEXT)
    layers = list(range(model.facts.num_layers))
    captured = capture(model, torch.tensor([ids], device=model.device), layers, list(range(1, len(ids))))
    states = [captured[layer].float() for layer in layers]  # [t, d] each
    return LayerStats(
        norms=tuple(float(s.norm(dim=-1).mean()) for s in states),
        means=tuple(s.mean(dim=0).cpu() for s in states),
    )
