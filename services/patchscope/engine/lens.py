"""The logit lens: the target's own reading of a state, without generating.

Many states are read in chunks of `LENS_CHUNK_SITES` (`iter_logit_lens`), so the target's worker thread
is free between chunks: decoding steps of other requests interleave, and a caller that leaves stops the
reading within one chunk. Each state is still read on its own, so a state's answer does not depend on
which others share its call.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

import torch

from patchscope.engine.models.loading import LoadedModel

# States per chunk: on the real models a chunk of 8 (unembeddings, softmaxes over the vocabulary, top-k
# decodes) costs about what a 128-token prefill chunk does (bench/bench_chunks.py).
LENS_CHUNK_SITES = 8

Reading = tuple[str, list[tuple[str, float]]]


@torch.inference_mode()
def logit_lens(target: LoadedModel, vector: torch.Tensor, top_k: int) -> Reading:
    """Top-1 token (the explanation) and the top-k (token, probability) pairs of the state itself."""
    hidden = vector.to(target.device, target.dtype)[None, :]  # [1, d]
    return reading_of(target, torch.softmax(target.layout.logits(hidden).float(), dim=-1)[0], top_k)


def reading_of(target: LoadedModel, probs: torch.Tensor, top_k: int) -> Reading:
    """The reading of a lens distribution ([V]): its top-1 token and top-k (token, probability) pairs."""
    values, ids = probs.topk(top_k)
    pairs = [
        (target.tokenizer.decode([i]), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)
    ]
    return pairs[0][0], pairs


def iter_logit_lens(
    target: LoadedModel, vectors: Sequence[torch.Tensor], top_k: int, chunk_sites: int = LENS_CHUNK_SITES
) -> Generator[None, None, list[Reading]]:
    """`logit_lens` of every state, `chunk_sites` states per step, yielding between steps; the readings."""
    if chunk_sites < 1:
        raise ValueError(f"chunk_sites must be >= 1, got {chunk_sites}")
    readings: list[Reading] = []
    for start in range(0, len(vectors), chunk_sites):
        if start:
            yield
        readings.extend(logit_lens(target, v, top_k) for v in vectors[start : start + chunk_sites])
    return readings
