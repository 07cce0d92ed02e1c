"""The logit lens's control: what the lens reads at the same site when nothing is patched.

The logit lens reads a mapped state as if it were the target's block ℓ* output at the template's
placeholder, with every block above skipped: final norm and unembedding. Its faithful unpatched analogue
is the target's *own* block-ℓ* output at that placeholder (the template with its filler, no patch), read
the same way. At the last block that reading is exactly the target's next-token distribution of the
template with no patch (the "unpatched top-k"); at a lower block it is that layer's lens of the template,
which is what the target holds at the site before any state replaces it. A source state whose reading
equals it told the lens nothing the target did not already have there.

The signals mirror a generating preset's, for an explanation of one token: `patch_effect` is the total
variation between the site's and the unpatched distributions; the explanation's log-probability is its
top-1 token's in the site's reading, the unpatched one the same token's in the unpatched reading.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from patchscope.engine.hooks import capture
from patchscope.engine.lens import Reading, reading_of
from patchscope.engine.models.loading import LoadedModel
from patchscope.engine.template import tokenize_template


@dataclass(frozen=True)
class LensControlRequest:
    """Where the lens's states would sit in the target: the template, its filler, each state's block."""

    template: str
    filler: str
    layers: list[int]  # one per state, the site's target layer ℓ*


@dataclass(frozen=True)
class LensControl:
    """One site's unpatched reading and how far the state moved the lens from it."""

    explanation: str  # the unpatched reading's top-1 token
    top_k: list[tuple[str, float]]
    patch_effect: float  # total variation between the site's and the unpatched distributions, in [0, 1]
    explanation_logprob: float  # log p of the site's top-1 token in the site's own reading
    unpatched_logprob: float  # log p of that token in the unpatched reading


@dataclass(frozen=True)
class LensReadings:
    """The lens of every state, and with a control request each site's control."""

    readings: list[Reading]
    controls: list[LensControl] | None = None


@torch.inference_mode()
def lens_controls(
    target: LoadedModel, vectors: Sequence[torch.Tensor], request: LensControlRequest, top_k: int
) -> list[LensControl]:
    """The control of each state: one forward of the unpatched template captures every layer asked for."""
    if len(request.layers) != len(vectors):
        raise ValueError(f"{len(vectors)} states but {len(request.layers)} layers")
    if not vectors:
        return []
    tokens = tokenize_template(target.tokenizer, request.template, request.filler)
    ids = torch.tensor([tokens.ids], device=target.device)  # [1, T]
    own = capture(target, ids, sorted(set(request.layers)), [tokens.placeholder])  # layer -> [1, d]
    unpatched = {layer: _read(target, state[0]) for layer, state in own.items()}
    readings = {layer: reading_of(target, probs, top_k) for layer, (probs, _) in unpatched.items()}
    controls = []
    for vector, layer in zip(vectors, request.layers, strict=True):
        (explanation, pairs), (base_probs, base_logprobs) = readings[layer], unpatched[layer]
        probs, logprobs = _read(target, vector)
        top = int(probs.topk(top_k).indices[0])  # the token `logit_lens` names, ranked as it ranks them
        controls.append(
            LensControl(
                explanation=explanation,
                top_k=pairs,
                patch_effect=float(0.5 * (probs - base_probs).abs().sum()),
                explanation_logprob=float(logprobs[top]),
                unpatched_logprob=float(base_logprobs[top]),
            )
        )
    return controls


def _read(target: LoadedModel, vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and log-probabilities ([V] each) of one state, computed as `logit_lens` does."""
    logits = target.layout.logits(vector.to(target.device, target.dtype)[None, :]).float()  # [1, V]
    return torch.softmax(logits, dim=-1)[0], torch.log_softmax(logits, dim=-1)[0]
