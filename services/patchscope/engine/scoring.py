"""Teacher-forced scoring: how likely the *unpatched* target finds a continuation it did not generate.

A patched explanation that the target would produce just as readily without the patch says little about
the state; the difference of the two mean log-probabilities (the explanation's `dependence`) measures
how much the patch mattered. A token's unpatched log-probability depends only on the tokens before it,
so it is computed once per distinct prefix: a sweep repeats explanations a lot, a continuation that is a
prefix of another is read off the longer one's forward, and a prefix whose last token was chosen while
the text still equalled the control row's has its log-probability from the control's own step (the
first token of every row, at least). What remains is one batched forward of the continuations after the
unpatched template's cache, through the forward patched generation uses, and one unembedding of the
positions read.

The scores are computed where the target runs, when a request's rows have all finished
(`with_unpatched_scores`), and travel on the control row's finished event: the service makes no handle
call for them, and the CLI runs the same code. Requests that finish together are scored together
(`score_jobs`, from the replica's `serve/scores.ScoreQueue`): one head product for all their positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from patchscope.engine.generation import new_cache, normed_states
from patchscope.engine.kv_cache import KVCache
from patchscope.engine.prefix_cache import PrefixCache
from patchscope.engine.runtime import TargetRuntime
from patchscope.engine.streaming import GenerateRequest, RowEvent
from patchscope.engine.template import TemplateTokens, tokenize_template

UNEMBED_CHUNK = 256  # positions unembedded at once: bounds the [n, V] logits a long sweep materialises

Prefix = tuple[int, ...]


def _rows_to_run(continuations: Sequence[Prefix], known: dict[Prefix, float]) -> list[Prefix]:
    """The fewest continuations whose forward reads every prefix not `known`.

    Distinct ones only, none whose every prefix is known, none that is a prefix of another kept one (the
    longer one's forward reads it too).
    """
    todo = [c for c in dict.fromkeys(continuations) if any(c[: t + 1] not in known for t in range(len(c)))]
    covered = {c[:k] for c in todo for k in range(1, len(c))}
    return [c for c in todo if c not in covered]


@dataclass(frozen=True)
class ScoreJob:
    """One request's scoring: its template and filler, its rows' continuations, what generation knew.

    `known`: token prefix -> the unpatched log-probability of its last token, where generation already
    computed it (the control row's steps: `RowEvent.unpatched_prefixes`); those prefixes are not run.
    """

    template: str
    filler: str
    continuations: Sequence[Sequence[int]]
    known: Mapping[Prefix, float] | None = None


@torch.inference_mode()
def score_jobs(target: TargetRuntime, jobs: Sequence[ScoreJob]) -> list[list[float | None]]:
    """Each job's mean log-probability per token of each continuation (None if empty), unpatched.

    Jobs of one template and filler run one forward together after that template's cache, and the
    positions every job reads go through one head product: requests that finish together read the
    target's weights once, the head's (the largest matrix of a small model) included.
    """
    known = [{tuple(k): float(v) for k, v in (job.known or {}).items()} for job in jobs]
    wanted = [[tuple(int(t) for t in c) for c in job.continuations] for job in jobs]
    groups: dict[tuple[str, str], list[int]] = {}
    for j, job in enumerate(jobs):
        groups.setdefault((job.template, job.filler), []).append(j)
    keys: list[tuple[tuple[str, str], Prefix]] = []  # (group, prefix) of each position the head reads
    states: list[torch.Tensor] = []
    for group, members in groups.items():
        rows = _rows_to_run([r for j in members for r in _rows_to_run(wanted[j], known[j])], {})
        if not rows:
            continue
        skip = set.intersection(*(set(known[j]) for j in members))  # what every member already knows
        prefixes, read = _prefix_states(target, *group, rows, skip)
        keys.extend((group, prefix) for prefix in prefixes)
        if read is not None:
            states.append(read)
    computed: dict[tuple[str, str], dict[Prefix, float]] = {group: {} for group in groups}
    if keys:
        values = _logprobs(target, torch.cat(states), [prefix[-1] for _, prefix in keys])
        for (group, prefix), value in zip(keys, values, strict=True):
            computed[group][prefix] = value
    scores: list[list[float | None]] = []
    for j, job in enumerate(jobs):
        table = {**computed[(job.template, job.filler)], **known[j]}  # a job's own knowledge comes first
        row_scores: list[float | None] = []
        for c in wanted[j]:
            values = [table[c[: t + 1]] for t in range(len(c))]
            row_scores.append(sum(values) / len(values) if values else None)
        scores.append(row_scores)
    return scores


def score_continuations(
    target: TargetRuntime,
    template: str,
    filler: str,
    continuations: Sequence[Sequence[int]],
    known: Mapping[Prefix, float] | None = None,
) -> list[float | None]:
    """One request's `score_jobs`: the mean unpatched log-probability per token of each continuation."""
    return score_jobs(target, [ScoreJob(template, filler, continuations, known)])[0]


def _template_cache(
    target: TargetRuntime, tokens: TemplateTokens, need_last: bool
) -> tuple[KVCache, torch.Tensor | None]:
    """The unpatched template's batch-1 cache (never to be written), and its last normed state if asked.

    Keyed by the template's ids in the prefix cache: an unpatched cache depends on its ids alone, so it
    is the same whichever call computed it.
    """
    full = tuple(tokens.ids)
    stored = target.prefix_cache.get(full)
    if stored is not None and not need_last:
        return stored, None
    ids = torch.tensor(tokens.ids, device=target.model.device)  # [T]
    shared = tokens.prefix_len

    def compute_prefix() -> KVCache:
        kv = new_cache(target)
        normed_states(target, ids[None, :shared], kv, last_only=True)
        return kv

    kv = target.prefix_cache.take(full[:shared], 1, compute_prefix) if shared else new_cache(target)
    last = normed_states(target, ids[None, shared:], kv, last_only=True)  # [1, d]
    if stored is None:
        target.prefix_cache.put(full, kv)
        stored = kv
    return stored, last


def _prefix_states(
    target: TargetRuntime, template: str, filler: str, rows: list[Prefix], skip: set[Prefix]
) -> tuple[list[Prefix], torch.Tensor | None]:
    """Every prefix of `rows` not in `skip`, and the normed state ([n, d]) that predicts its last token.

    The template's last position predicts each first token; a continuation's own tokens, fed after the
    template's cache, predict the rest, so a continuation's last token is never fed.
    """
    model = target.model
    device = model.device
    tokens = tokenize_template(model.tokenizer, template, filler)
    template_kv, last = _template_cache(target, tokens, any(c[:1] not in skip for c in rows))
    fed = [c for c in rows if len(c) > 1]
    normed = None
    if fed:
        # Right padding: causal attention keeps every real position blind to the pad after it.
        padded = torch.zeros(len(fed), max(len(c) for c in fed) - 1, dtype=torch.long, device=device)
        for k, c in enumerate(fed):
            padded[k, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long, device=device)  # [B, L - 1]
        kv = PrefixCache.copy(template_kv, len(fed))
        normed = normed_states(target, padded, kv, last_only=False)  # [B, L - 1, d]
    row_of = {c: k for k, c in enumerate(fed)}
    # Each prefix is read once: from the template's last state, or at the first row that has it.
    firsts: list[Prefix] = []
    where: dict[Prefix, tuple[int, int]] = {}
    for c in rows:
        for t in range(len(c)):
            key = c[: t + 1]
            if key in skip or key in where or key in firsts:
                continue
            if t == 0:
                firsts.append(key)
            else:
                where[key] = (row_of[c], t - 1)
    parts = []
    if firsts:
        assert last is not None
        parts.append(last.expand(len(firsts), -1))  # [f, d]
    if where:
        assert normed is not None
        rows_at = torch.tensor([k for k, _ in where.values()], device=device)
        positions = torch.tensor([t for _, t in where.values()], device=device)
        parts.append(normed[rows_at, positions])  # [n, d]
    keys = firsts + list(where)
    return keys, (torch.cat(parts) if parts else None)  # [f + n, d]


def _logprobs(target: TargetRuntime, states: torch.Tensor, chosen: list[int]) -> list[float]:
    """Log p(chosen[i]) under the head at each normed state ([n, d]), in chunks of `UNEMBED_CHUNK`."""
    chosen_ids = torch.tensor(chosen, device=states.device)
    values: list[float] = []
    for start in range(0, len(chosen), UNEMBED_CHUNK):
        logits = target.model.layout.unembed_normed(states[start : start + UNEMBED_CHUNK]).float()  # [c, V]
        picked = logits.gather(1, chosen_ids[start : start + UNEMBED_CHUNK, None])[:, 0]
        values.extend((picked - torch.logsumexp(logits, dim=-1)).tolist())
    return values


async def with_unpatched_scores(
    request: GenerateRequest,
    steps: AsyncIterator[list[RowEvent]],
    target: TargetRuntime,
    score: Callable[[ScoreJob], Awaitable[list[float | None]]] | None = None,
) -> AsyncIterator[list[RowEvent]]:
    """A request's row events, its control row's finished event carrying every other row's unpatched score.

    Without a control the events pass through. With one, the control's finished event (always the last
    row of the request, and never streamed as text) is held until every row has finished, then sent with
    `unpatched_logprobs`, so the patched rows stream as they are generated. `score` runs the scoring where
    the target's model work runs (the replica's `ScoreQueue`, on its worker thread); None runs it inline.
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
    job = ScoreJob(request.template, request.filler, tokens[:control], dict(held.unpatched_prefixes or ()))
    scores = await score(job) if score is not None else score_jobs(target, [job])[0]
    yield [dataclasses.replace(held, unpatched_logprobs=tuple(scores))]
