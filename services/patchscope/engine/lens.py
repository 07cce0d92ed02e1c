"""The logit lens: the target's own reading of a state, without generating."""

from __future__ import annotations

import torch

from patchscope.engine.models.loading import LoadedModel


@torch.inference_mode()
def logit_lens(target: LoadedModel, vector: torch.Tensor, top_k: int) -> tuple[str, list[tuple[str, float]]]:
    """Top-1 token (the explanation) and the top-k (token, probability) pairs of the state itself."""
    hidden = vector.to(target.device, target.dtype)[None, :]  # [1, d]
    probs = torch.softmax(target.layout.logits(hidden).float(), dim=-1)[0]  # [V]
    values, ids = probs.topk(top_k)
    pairs = [
        (target.tokenizer.decode([i]), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)
    ]
    return pairs[0][0], pairs
