"""Teacher-forced scoring: how likely the *unpatched* target finds a continuation it did not generate.

A patched explanation that the target would produce just as readily without the patch says little about
the state; the difference of the two mean log-probabilities (the explanation's `dependence`) measures
how much the patch mattered. All continuations of one template are scored in one batched forward that
starts from the template's cached prefix, through the forward patched generation uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from patchscope.engine.generation import new_cache
from patchscope.engine.kv_cache import KVCache, cache_kwarg
from patchscope.engine.runtime import TargetRuntime
from patchscope.engine.template import tokenize_template


def _normed(target: TargetRuntime, ids: torch.Tensor, kv: KVCache, *, last_only: bool) -> torch.Tensor:
    """Final-normed states of the new positions ([B, t, d]), or of the last one ([B, d])."""
    if target.lean is not None:
        return target.lean.forward(ids, kv, last_only=last_only)
    base = target.model.model.base_model
    hidden = base(ids, use_cache=True, **{cache_kwarg(type(base)): kv}).last_hidden_state  # [B, t, d]
    return hidden[:, -1] if last_only else hidden


@torch.inference_mode()
def score_continuations(
    target: TargetRuntime, template: str, filler: str, continuations: Sequence[Sequence[int]]
) -> list[float | None]:
    """Mean log-probability per token of each continuation after the unpatched template (None if empty)."""
    if not continuations:
        return []
    model = target.model
    tokens = tokenize_template(model.tokenizer, template, filler)
    lengths = [len(c) for c in continuations]
    longest = max(lengths)
    if longest == 0:
        return [None] * len(continuations)
    device = model.device
    batch = len(continuations)
    # Right padding: causal attention keeps every real position blind to the pad after it.
    padded = torch.zeros(batch, longest, dtype=torch.long, device=device)  # [B, L]
    for k, c in enumerate(continuations):
        padded[k, : len(c)] = torch.tensor(list(c), dtype=torch.long, device=device)
    shared = tokens.prefix_len
    ids = torch.tensor(tokens.ids, device=device)  # [T]

    def compute_prefix() -> KVCache:
        kv = new_cache(target)
        _normed(target, ids[None, :shared], kv, last_only=True)
        return kv

    kv = target.prefix_cache.take(tokens.ids[:shared], batch, compute_prefix) if shared else new_cache(target)
    rest = ids[shared:].expand(batch, -1)  # [B, T - shared]
    feed = torch.cat((rest, padded[:, :-1]), dim=1)  # the token before each continuation token
    normed = _normed(target, feed, kv, last_only=False)  # [B, T - shared + L - 1, d]
    first = rest.shape[1] - 1  # the template's last position predicts the continuation's first token
    scores: list[float | None] = []
    for k, length in enumerate(lengths):
        if length == 0:
            scores.append(None)
            continue
        states = normed[k, first : first + length]  # [l, d]
        logprobs = torch.log_softmax(model.layout.unembed_normed(states).float(), dim=-1)  # [l, V]
        chosen = logprobs.gather(1, padded[k, :length, None])[:, 0]  # [l]
        scores.append(float(chosen.mean()))
    return scores
