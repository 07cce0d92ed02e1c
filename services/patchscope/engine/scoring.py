"""Teacher-forced scoring: how likely the *unpatched* target finds a continuation it did not generate.

A patched explanation that the target would produce just as readily without the patch says little about
the state; the difference of the two mean log-probabilities (the explanation's `dependence`) measures
how much the patch mattered. A token's unpatched log-probability depends only on the tokens before it,
so it is computed once per distinct prefix: a sweep repeats explanations a lot, a continuation that is a
prefix of another is read off the longer one's forward, and a prefix the control row generated already
has its log-probability from that generation. What remains is one batched forward from the template's
cached prefix, through the forward patched generation uses, and one unembedding of the positions read.

The scores are computed where the target runs, when a request's rows have all finished
(`with_unpatched_scores`), and travel on the control row's finished event: the service makes no handle
call for them, and the CLI runs the same code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import torch

from patchscope.engine.generation import new_cache
from patchscope.engine.kv_cache import KVCache, cache_kwarg
from patchscope.engine.runtime import TargetRuntime
from patchscope.engine.streaming import GenerateRequest, RowEvent
from patchscope.engine.template import tokenize_template

T = TypeVar("T")
UNEMBED_CHUNK = 256  # positions unembedded at once: bounds the [n, V] logits a long sweep materialises

Prefix = tuple[int, ...]


def _normed(target: TargetRuntime, ids: torch.Tensor, kv: KVCache, *, last_only: bool) -> torch.Tensor:
    """Final-normed states of the new positions ([B, t, d]), or of the last one ([B, d])."""
    if target.lean is not None:
        return target.lean.forward(ids, kv, last_only=last_only)
    base = target.model.model.base_model
    hidden = base(ids, use_cache=True, **{cache_kwarg(type(base)): kv}).last_hidden_state  # [B, t, d]
    return hidden[:, -1] if last_only else hidden


def _rows_to_run(continuations: Sequence[Prefix], known: dict[Prefix, float]) -> list[Prefix]:
    """The fewest continuations whose forward reads every prefix not `known`.

    Distinct ones only, none whose every prefix is known, none that is a prefix of another kept one (the
    longer one's forward reads it too).
    """
    todo = [c for c in dict.fromkeys(continuations) if any(c[: t + 1] not in known for t in range(len(c)))]
    covered = {c[:k] for c in todo for k in range(1, len(c))}
    return [c for c in todo if c not in covered]


@torch.inference_mode()
def score_continuations(
    target: TargetRuntime,
    template: str,
    filler: str,
    continuations: Sequence[Sequence[int]],
    known: Sequence[tuple[Sequence[int], Sequence[float]]] = (),
) -> list[float | None]:
    """Mean log-probability per token of each continuation after the unpatched template (None if empty).

    `known`: continuations the unpatched template generated, with their tokens' log-probabilities as
    generation computed them (the control row's): their prefixes are not run again.
    """
    table: dict[Prefix, float] = {}
    for tokens, logprobs in known:
        if len(tokens) != len(logprobs):
            raise ValueError(f"known: {len(tokens)} tokens but {len(logprobs)} log-probabilities")
        table.update((tuple(tokens[: t + 1]), float(lp)) for t, lp in enumerate(logprobs))
    wanted = [tuple(int(t) for t in c) for c in continuations]
    rows = _rows_to_run(wanted, table)
    if rows:
        table.update(_score_prefixes(target, template, filler, rows, set(table)))
    scores: list[float | None] = []
    for c in wanted:
        values = [table[c[: t + 1]] for t in range(len(c))]
        scores.append(sum(values) / len(values) if values else None)
    return scores


def _score_prefixes(
    target: TargetRuntime, template: str, filler: str, rows: list[Prefix], skip: set[Prefix]
) -> dict[Prefix, float]:
    """The unpatched log-probability of every prefix of `rows` not in `skip` (its last token's)."""
    model = target.model
    tokens = tokenize_template(model.tokenizer, template, filler)
    device = model.device
    batch, longest = len(rows), max(len(c) for c in rows)
    # Right padding: causal attention keeps every real position blind to the pad after it.
    padded = torch.zeros(batch, longest, dtype=torch.long, device=device)  # [B, L]
    for k, c in enumerate(rows):
        padded[k, : len(c)] = torch.tensor(c, dtype=torch.long, device=device)
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
    # Each prefix is read once, at the first row that has it.
    where: dict[Prefix, tuple[int, int]] = {}
    for k, c in enumerate(rows):
        for t in range(len(c)):
            if (key := c[: t + 1]) not in skip:
                where.setdefault(key, (k, first + t))
    keys = list(where)
    row_index = torch.tensor([where[key][0] for key in keys], device=device)
    pos_index = torch.tensor([where[key][1] for key in keys], device=device)
    chosen_ids = torch.tensor([key[-1] for key in keys], device=device)
    states = normed[row_index, pos_index]  # [n, d]
    values: list[float] = []
    for start in range(0, len(keys), UNEMBED_CHUNK):
        logits = model.layout.unembed_normed(states[start : start + UNEMBED_CHUNK]).float()  # [c, V]
        picked = logits.gather(1, chosen_ids[start : start + UNEMBED_CHUNK, None])[:, 0]
        values.extend((picked - torch.logsumexp(logits, dim=-1)).tolist())
    return dict(zip(keys, values, strict=True))


async def _inline(work: Callable[[], T]) -> T:
    return work()


async def with_unpatched_scores(
    request: GenerateRequest,
    steps: AsyncIterator[list[RowEvent]],
    target: TargetRuntime,
    run_model: Callable[[Callable[[], list[float | None]]], Awaitable[list[float | None]]] = _inline,
) -> AsyncIterator[list[RowEvent]]:
    """A request's row events, its control row's finished event carrying every other row's unpatched score.

    Without a control the events pass through. With one, the control's finished event (always the last
    row of the request, and never streamed as text) is held until every row has finished, then sent with
    `unpatched_logprobs`, so the patched rows stream as they are generated. `run_model` runs the scoring
    where the target's model work runs (the replica's worker thread; inline in this process).
    """
    if not request.control:
        async for events in steps:
            yield events
        return
    control = request.num_rows - 1
    tokens: list[list[int]] = [[] for _ in range(request.num_rows)]
    open_rows = request.num_rows
    held: RowEvent | None = None
    async for events in steps:
        passed = []
        for e in events:
            open_rows -= e.finished
            if not e.stop:
                tokens[e.row].append(e.token_id)
            if e.row == control and e.finished:
                held = e
            else:
                passed.append(e)
        if passed:
            yield passed
    if held is None or open_rows > 0:
        return  # the stream ended early: the caller left, or the generation failed
    known = [(tokens[control], held.token_logprobs)] if held.token_logprobs is not None else []
    patched = tokens[:control]

    def score() -> list[float | None]:
        return score_continuations(target, request.template, request.filler, patched, known)

    scores = await run_model(score)
    yield [dataclasses.replace(held, unpatched_logprobs=tuple(scores))]
