"""The target's differentiable patched forward on one template, and the reference behaviour it must reproduce.

Why apart: `TemplateForward`, the coarse top-K KL and `prepare` are what the fit (mapping/behavioural.py)
back-propagates through and what its validation and the bench score with; they carry the savings the fit
relies on (the template's prefix run once, logits over a restricted vocabulary) and know nothing of the
optimiser or of early stopping.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from patchscope.engine.generation import stop_ids
from patchscope.engine.kv_cache import cache_kwarg
from patchscope.engine.models import LoadedModel
from patchscope.engine.patch import block_hidden
from patchscope.engine.template import TemplateTokens, tokenize_template
from patchscope.mapping.behaviour_data import BehaviourTemplate, TextRow
from patchscope.mapping.collect import _states


@contextmanager
def frozen(model: torch.nn.Module):
    """Parameters without gradients for the block; gradients flow only into the patched vectors."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


class TemplateForward:
    """The target on one template, patched at (placeholder, ℓ*), from the template's cached prefix.

    `logprobs(vectors, continuation)` gives the next-token log-probabilities ([B, k, V]) at the template's
    last position and after each of the first k − 1 continuation tokens (teacher-forced), with
    `vectors` ([B, d]) written at the placeholder; with autograd on they carry gradients to `vectors`.
    """

    def __init__(self, target: LoadedModel, template: BehaviourTemplate, layer: int) -> None:
        self.target, self.layer = target, layer
        self.head: torch.Tensor | None = None  # [V', d] rows of the head when restricted (`restrict`)
        self.tokens: TemplateTokens = tokenize_template(target.tokenizer, template.template, template.filler)
        self.shared = self.tokens.prefix_len  # the prefix, identical and unpatched in every row
        self.base = target.model.base_model
        self._prefix = None
        if self.shared > 0:
            kv = DynamicCache(config=target.model.config)
            ids = torch.tensor([self.tokens.ids[: self.shared]], device=target.device)  # [1, P]
            with torch.no_grad():
                self.base(ids, use_cache=True, **{cache_kwarg(type(self.base)): kv})
            self._prefix = kv

    def restrict(self, head: torch.Tensor | None) -> None:
        """Compute logits over the head rows `head` only ([V', d]), or the whole vocabulary (None)."""
        self.head = head

    @property
    def suffix(self) -> list[int]:
        return list(self.tokens.ids[self.shared :])

    def logprobs(self, vectors: torch.Tensor, continuation: torch.Tensor | None = None) -> torch.Tensor:
        batch, device = vectors.shape[0], self.target.device
        suffix = torch.tensor(self.suffix, device=device).expand(batch, -1)  # [B, S]
        ids = suffix if continuation is None else torch.cat([suffix, continuation.to(device)], dim=1)
        k = 1 if continuation is None else continuation.shape[1] + 1
        column = self.tokens.placeholder - self.shared  # the placeholder inside this forward

        def hook(_module, _args, output):
            hidden = block_hidden(output)
            patched = hidden.clone()
            patched[:, column] = vectors.to(hidden.device, hidden.dtype)
            return (patched, *output[1:]) if isinstance(output, tuple) else patched

        kwargs = {}
        if self._prefix is not None:
            kv = copy.deepcopy(self._prefix)
            if batch > 1:
                kv.batch_repeat_interleave(batch)
            kwargs[cache_kwarg(type(self.base))] = kv
        handle = self.target.layout.blocks[self.layer].register_forward_hook(hook)
        try:
            normed = self.base(ids, use_cache=self._prefix is not None, **kwargs).last_hidden_state
        finally:
            handle.remove()
        last = normed[:, -k:].reshape(batch * k, -1)  # [B·k, d]: the positions predicting the continuation
        layout = self.target.layout
        if self.head is None:
            logits = layout.unembed_normed(last).float()  # [B·k, V]
        else:
            logits = layout.capped(last.float() @ self.head.T)  # [B·k, V']
        return torch.log_softmax(logits, dim=-1).view(batch, k, -1)


@dataclass
class Reference:
    """The target's own behaviour on each row: top-K log-probabilities per continuation position."""

    index: torch.Tensor  # [N, k, K] token ids
    logprobs: torch.Tensor  # [N, k, K]
    continuation: torch.Tensor  # [N, k − 1] greedy tokens fed back (teacher forcing)
    mask: torch.Tensor  # [N, k] positions before the first stop token (inclusive)


def coarse_kl(
    predicted: torch.Tensor, reference: Reference, rows: torch.Tensor, lookup: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean KL(reference ‖ predicted) over the reference's top-K tokens plus one bin for the rest ([]).

    `predicted` ([B, k, V']) is over a restricted vocabulary when `lookup` ([V] → column in V', −1 for
    absent) is given; reference tokens outside it count in the rest.
    """
    index, ref = reference.index[rows], reference.logprobs[rows]  # [B, k, K]
    mask = reference.mask[rows].float()  # [B, k]
    column = index if lookup is None else lookup[index]
    inside = (column >= 0).float()
    pred = predicted.gather(-1, column.clamp_min(0))  # [B, k, K]
    p_ref = ref.exp() * inside
    rest_ref = (1 - p_ref.sum(-1)).clamp_min(1e-6)  # [B, k]
    rest_pred = (1 - (pred.exp() * inside).sum(-1)).clamp_min(1e-6)
    kl = (p_ref * (ref - pred)).sum(-1) + rest_ref * (rest_ref.log() - rest_pred.log())  # [B, k]
    return (kl * mask).sum() / mask.sum().clamp_min(1)


@dataclass
class Vocabulary:
    """The tokens the fit scores: every token in some train or validation row's reference top-K.

    The target's head has 262k rows for Gemma; a row's reference outside its top-K is one bin anyway, so
    logits over the union of the top-K sets cost a fraction of the head and change the KL only through
    the normaliser.
    """

    ids: torch.Tensor  # [V'] token ids
    lookup: torch.Tensor  # [V] column in ids, −1 for tokens outside

    @classmethod
    def of(cls, references: Sequence[Reference], size: int) -> Vocabulary:
        ids = torch.unique(torch.cat([r.index.flatten() for r in references]))
        lookup = torch.full((size,), -1, dtype=torch.long)
        lookup[ids] = torch.arange(len(ids))
        return cls(ids, lookup)

    def restrict(self, target: LoadedModel, forwards: dict[str, TemplateForward]) -> None:
        head = target.layout.unembed.weight.detach()[self.ids.to(target.device)].float()  # [V', d]
        for forward in forwards.values():
            forward.restrict(head)


@dataclass
class Prepared:
    """One split's rows ready for training: states, template groups and the reference behaviour."""

    x: torch.Tensor  # [N, d_s] source state of each row's text at ℓ
    y: torch.Tensor  # [N, d_t] target state of the same text at ℓ*
    groups: dict[str, torch.Tensor]  # template -> row indices
    reference: Reference


def _last_token_states(model: LoadedModel, texts: list[str], layer: int) -> torch.Tensor:
    """States ([N, d]) at the last token of each text: a multi-token subject is read where it ends."""
    seqs = [list(model.tokenizer(t).input_ids) for t in texts]
    states = _states(model, seqs, [[len(s) - 1] for s in seqs], [layer], batch_tokens=2048)
    return torch.stack([s[layer][0] for s in states])


def prepare(
    source: LoadedModel,
    target: LoadedModel,
    rows: list[TextRow],
    forwards: dict[str, TemplateForward],
    a: int,
    b: int,
    *,
    positions: int = 1,
    top_k: int = 64,
    batch: int = 64,
) -> Prepared:
    """States of both models for `rows` and the target's own behaviour on them (no gradients)."""
    texts = sorted({r.text for r in rows})
    where = {t: i for i, t in enumerate(texts)}
    xs, ys = _last_token_states(source, texts, a), _last_token_states(target, texts, b)
    pick = torch.tensor([where[r.text] for r in rows])
    x, y = xs[pick], ys[pick]
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.template, []).append(i)
    n = len(rows)
    index = torch.zeros(n, positions, top_k, dtype=torch.long)
    logprobs = torch.zeros(n, positions, top_k)
    continuation = torch.zeros(n, positions - 1, dtype=torch.long)
    stops = torch.tensor(sorted(stop_ids(target)))
    with torch.no_grad():
        for name, members in groups.items():
            forward = forwards[name]
            for start in range(0, len(members), batch):
                idx = torch.tensor(members[start : start + batch])
                fed = torch.zeros(len(idx), 0, dtype=torch.long)
                for _ in range(positions):  # greedy continuation, one token at a time
                    lp = forward.logprobs(y[idx], fed if fed.shape[1] else None)  # [B, j+1, V]
                    fed = torch.cat([fed, lp[:, -1].argmax(-1, keepdim=True).cpu()], dim=1)
                top = lp.topk(top_k, dim=-1)  # the last pass holds every position, teacher-forced
                index[idx], logprobs[idx] = top.indices.cpu(), top.values.cpu()
                continuation[idx] = fed[:, : positions - 1]
    stopped = torch.isin(continuation, stops)  # [N, k − 1]
    # Position j is scored while no earlier continuation token was a stop token.
    mask = torch.cat([torch.ones(n, 1, dtype=torch.bool), ~stopped.cumsum(1).bool()], dim=1)
    reference = Reference(index, logprobs, continuation, mask)
    return Prepared(x, y, {k: torch.tensor(v) for k, v in groups.items()}, reference)
