"""Continuous batching of patched generation: one decoding step at a time over every active row.

Why: batches that form only when requests arrive together leave a request that arrives mid-generation
waiting for a whole batch, and keep finished rows in the batch until its longest row ends. Here a
request's rows are prefilled on their own (in chunks, from the prefix cache, cancellable between
chunks), join the running rows at the next step, and leave the moment they end (stop token, stop
sequence, `max_new_tokens`, cancellation); the cache slot a row leaves is reused by the next row that
joins. Rows of different templates, lengths and decoding options share a step: the lean forward's
`RaggedCache` gives each row its own position and mask, and each request samples its own rows with its
own generator, in its own row order, so a seeded sampled request draws what it draws alone.

The scheduler is synchronous and single-threaded: `run_once` does one decode step and prefill chunks up
to a budget and calls each request's `on_step` with that request's rows; the service's driver calls it on
the target's worker thread while work remains. Only lean-forward runtimes can run here (`supported`);
transformers' forward keeps the per-template batches of `generation.iter_patched_generate`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from patchscope.engine.errors import InvalidArgument, PatchscopeError
from patchscope.engine.generation import (
    GenerationConfig,
    PatchedRow,
    Step,
    StopMatcher,
    _next_tokens,
    _resolve,
    stop_ids,
)
from patchscope.engine.models.lean_cache import LeanCache, RaggedCache
from patchscope.engine.patch import Patch
from patchscope.engine.runtime import TargetRuntime
from patchscope.engine.static_decode import RaggedStep
from patchscope.engine.template import TemplateTokens
from patchscope.engine.timings import Timings

logger = logging.getLogger("patchscope.engine")
DEFAULT_CHUNK_TOKENS = 128
PREFILL_BUDGET_CHUNKS = 4  # the default prefill budget per round, in chunks of one row


def _rows_of(logits: torch.Tensor, slots: list[int], device: torch.device) -> torch.Tensor:
    """The step's logits of `slots` ([len(slots), V]), in that order.

    A view where the slots are consecutive (a request decoding alone always is): a gather would copy
    every one of the vocabulary-wide rows once more per step, work the in-process path never does.
    """
    first = slots[0]
    if slots == list(range(first, first + len(slots))):
        return logits[first : first + len(slots)]
    return logits[torch.tensor(slots, device=device)]


class SchedulerFull(PatchscopeError):
    """The target holds as many rows as its row cap allows (RESOURCE_EXHAUSTED, retry later)."""


def supported(runtime: TargetRuntime) -> bool:
    """Whether `runtime` can run continuous batching (it needs the lean forward's ragged cache)."""
    return runtime.lean is not None


@dataclass(eq=False)
class Job:
    """One request's rows: prefilled together, then decoded among everyone else's."""

    tokens: TemplateTokens
    patches: list[Patch]  # rows of this job
    rows: int
    config: GenerationConfig
    keep_logits: bool
    on_step: Callable[[Step], None]
    dropped: Callable[[], bool]
    on_error: Callable[[Exception], None] = lambda _error: None
    timings: Timings = field(default_factory=Timings)
    produced: list[int] = field(default_factory=list)  # tokens per row so far
    live: set[int] = field(default_factory=set)  # rows still decoding
    generator: torch.Generator | None = None
    matcher: StopMatcher | None = None
    prefill: Iterator[None] | None = None
    first_normed: torch.Tensor | None = None  # [rows, d], the last position's normed state, once prefilled
    cache: LeanCache | None = None
    id: int = 0
    open: int = 0  # rows not yet ended or dropped


class Scheduler:
    """Continuous batching over one lean-forward target; `run_once` advances everything by one step."""

    def __init__(
        self,
        runtime: TargetRuntime,
        *,
        max_rows: int = 256,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        prefill_budget: int | None = None,
        use_prefix_cache: bool = True,
        compiled_step: bool = False,
        compile_mode: str | None = "reduce-overhead",
    ) -> None:
        """A scheduler over `runtime` (lean forward required).

        `compiled_step`: decode through `static_decode.RaggedStep` (bucketed shapes, compiled with
        `compile_mode`; None runs those shapes eagerly, which is how tests check it on a CPU).
        """
        if not supported(runtime):
            raise ValueError("continuous batching needs the lean forward (forward: auto or lean)")
        self.runtime = runtime
        self.max_rows = max_rows
        self.chunk_tokens = chunk_tokens
        # Row-tokens of prefill per round (at least one chunk runs): a few short requests' worth.
        self.prefill_budget = prefill_budget or PREFILL_BUDGET_CHUNKS * chunk_tokens
        self.use_prefix_cache = use_prefix_cache
        self.cache = RaggedCache()
        self.fast = RaggedStep(runtime.model, runtime.lean, compile_mode) if compiled_step else None
        self.slots: list[tuple[Job, int]] = []  # slot -> (job, row), as the ragged cache orders rows
        self.next_ids: list[int] = []  # slot -> the token it feeds at the next step
        self.prefilling: deque[Job] = deque()
        # Admission may come from another thread than `run_once`: it only appends to the inbox.
        self._lock = threading.Lock()
        self._inbox: deque[Job] = deque()
        self._admitted = 0  # rows of jobs admitted and not yet done
        self.stop = torch.tensor(sorted(stop_ids(runtime.model)), device=runtime.model.device)
        self._ids = itertools.count()
        self.steps_run = 0
        self.chunks_run = 0
        self.rows_dropped = 0
        self.step_sizes: deque[int] = deque(maxlen=4096)  # rows of the latest steps, for tests and benches

    @property
    def rows(self) -> int:
        """Rows admitted and not yet ended: decoding, or waiting for / in their prefill."""
        return self._admitted

    def busy(self) -> bool:
        return bool(self.slots or self.prefilling or self._inbox)

    def admit(
        self,
        rows: Sequence[PatchedRow],
        config: GenerationConfig,
        on_step: Callable[[Step], None],
        *,
        keep_logits: bool = False,
        dropped: Callable[[], bool] = lambda: False,
        on_error: Callable[[Exception], None] = lambda _error: None,
        timings: Timings | None = None,
    ) -> Job:
        """Queue a request's rows for prefill (joining at a later `run_once`); any thread may call it.

        Refused at once, before any model runs, when the rows are invalid, more than the row cap, or more
        than the room left under it (`SchedulerFull`). An exception from `on_step` is that request's own:
        its rows leave at once and `on_error` hears it; every other request runs on.
        """
        config.validate()
        if not rows:
            raise InvalidArgument("rows", "must contain at least one row", limit=">= 1")
        if len(rows) > self.max_rows:
            raise InvalidArgument(
                "rows", "more rows than the target runs at once", limit=f"<= {self.max_rows}", value=len(rows)
            )
        resolved = _resolve(self.runtime.model, rows)
        tokens = resolved[0][0]
        if any(t != tokens for t, _ in resolved):
            raise InvalidArgument("rows", "must share one template and filler", limit="one template")
        patches = [p for _, ps in resolved for p in ps]
        job = Job(
            tokens, patches, len(rows), config, keep_logits, on_step, dropped, on_error, id=next(self._ids)
        )
        if timings is not None:
            job.timings = timings  # filled as the job runs: its prefill and the steps it takes part in
        job.produced = [0] * len(rows)
        if config.temperature > 0.0:
            job.generator = torch.Generator(device=self.runtime.model.device)
            job.generator.manual_seed(config.seed if config.seed is not None else torch.seed())
        job.matcher = StopMatcher(self.runtime.model.tokenizer, config.stop)
        job.prefill = self._prefill(job)
        job.open = len(rows)
        with self._lock:
            if self._admitted + len(rows) > self.max_rows:
                raise SchedulerFull(
                    f"target model is full ({self._admitted} rows running, cap {self.max_rows}); "
                    "retry after a short backoff"
                )
            self._admitted += len(rows)
            self._inbox.append(job)
        return job

    def _closed(self, job: Job, rows: int) -> None:
        """`rows` of `job` ended or were dropped; its room under the cap is free once all have."""
        job.open -= rows
        if job.open == 0:
            with self._lock:
                self._admitted -= job.rows

    # -- prefill ------------------------------------------------------------------------------------

    def _prefill(self, job: Job) -> Iterator[tuple[int, bool]]:
        """The request's prompt pass, one chunk of at most `chunk_tokens` tokens per `next`.

        Each `next` yields the chunk's cost in row-tokens and whether the prefill is complete (then
        `job.first_normed` and `job.cache` are set; the first logits come from `_join`).
        """
        runtime, tokens = self.runtime, job.tokens
        lean, device = runtime.lean, runtime.model.device
        ids = torch.tensor(tokens.ids, device=device)  # [T]
        shared = min([tokens.prefix_len, *(p.position for p in job.patches)]) if self.use_prefix_cache else 0
        prefix = tokens.ids[:shared]
        kv: LeanCache | None = None
        if shared > 0:
            stored = runtime.prefix_cache.get(prefix)
            if stored is None:
                stored = LeanCache()
                for start in range(0, shared, self.chunk_tokens):
                    end = min(shared, start + self.chunk_tokens)
                    lean.forward(ids[None, start:end], stored)
                    yield end - start, False
                runtime.prefix_cache.put(prefix, stored)
            kv = runtime.prefix_cache.copy(stored, job.rows)
        else:
            kv = LeanCache()
        identical = True  # rows share ids and cache until a patch sets one apart
        normed = None
        for start in range(shared, len(tokens.ids), self.chunk_tokens):
            end = min(len(tokens.ids), start + self.chunk_tokens)
            here = [p for p in job.patches if start <= p.position < end]
            chunk = ids[start:end].expand(job.rows, -1)  # [rows, t]
            normed = lean.forward(chunk, kv, here, identical_rows=identical)  # [rows, d]
            identical = identical and not here
            if end < len(tokens.ids):
                yield job.rows * (end - start), False
        assert normed is not None
        job.first_normed = normed
        job.cache = kv
        yield job.rows * (end - start), True

    def _prefill_chunks(self) -> None:
        """Chunks of the waiting prefills, round-robin, until `prefill_budget` row-tokens have run.

        At least one chunk runs per round, so a lone request's prefill is never delayed; under load the
        budget lets several short prefills (most are a few tokens after the cached prefix) join the next
        step together instead of one per step. Dropped requests leave before their next chunk.
        """
        spent = 0
        ready: list[Job] = []
        while spent < self.prefill_budget:
            for job in [j for j in self.prefilling if j.dropped()]:
                self.prefilling.remove(job)
                self.rows_dropped += job.rows
                self._closed(job, job.rows)
            if not self.prefilling:
                break
            spent += self._prefill_chunk(ready)
        self._join(ready)

    def _prefill_chunk(self, ready: list[Job]) -> int:
        """One chunk of the oldest waiting prefill (appended to `ready` when complete); its row-tokens."""
        job = self.prefilling[0]
        started = time.perf_counter()
        cost, done = next(job.prefill)
        job.timings.prefill_s += time.perf_counter() - started
        self.chunks_run += 1
        if not done:
            # Round-robin: a long prefill takes turns with the requests queued behind it.
            self.prefilling.rotate(-1)
            return cost
        self.prefilling.remove(job)
        ready.append(job)
        return cost

    def _join(self, ready: list[Job]) -> None:
        """The first token of every job prefilled this round, from one unembedding; their rows join.

        One product for all of them: the head's weight (the largest matrix of a small model) is read
        once per round instead of once per request, which is most of a short prefill's cost.
        """
        if not ready:
            return
        started = time.perf_counter()
        normed = torch.cat([job.first_normed for job in ready])  # [sum of rows, d]
        logits = self.runtime.model.layout.unembed_normed(normed).float()  # [sum of rows, V]
        unembedded = time.perf_counter() - started
        offset = 0
        for job in ready:
            job.first_normed = None
            job.timings.prefill_s += unembedded
            started = time.perf_counter()
            rows = list(range(job.rows))
            job_logits = logits[offset : offset + job.rows]  # [rows, V], a contiguous view
            offset += job.rows
            tokens, finished, ended = self._sample(job, rows, job_logits)
            job.timings.decode_s += time.perf_counter() - started
            keep = self._emit(job, rows, tokens, finished, ended, job_logits)
            if len(keep) < job.rows:
                self._closed(job, job.rows - len(keep))
            if keep:
                assert job.cache is not None
                if len(keep) < job.rows:
                    job.cache.batch_select_indices(torch.tensor(keep, device=logits.device))
                slots = self.cache.admit(job.cache)
                for slot, row in zip(slots, keep, strict=True):
                    self.slots.append((job, row))
                    self.next_ids.append(tokens[row])
                    assert slot == len(self.slots) - 1
            job.cache = None

    # -- decoding -----------------------------------------------------------------------------------

    def _sample(
        self, job: Job, rows: list[int], logits: torch.Tensor
    ) -> tuple[dict[int, int], dict[int, bool], dict[int, bool]]:
        """Next tokens of the job's `rows` (ascending) from their logits ([len(rows), V]); stop flags."""
        next_ids = _next_tokens(logits, job.config, job.generator)  # [n]
        done = torch.isin(next_ids, self.stop).tolist()
        ids = next_ids.tolist()
        tokens = dict(zip(rows, ids, strict=True))
        finished = dict(zip(rows, done, strict=True))
        ended = {r: not d and job.matcher.add(r, t) for r, t, d in zip(rows, ids, done, strict=True)}
        return tokens, finished, ended

    def _emit(self, job, rows, tokens, finished, ended, logits) -> list[int]:
        """Tell the job its step; the rows that go on decoding (none when the job's own callback failed)."""
        for r in rows:
            job.produced[r] += 1
        step = Step(
            rows=rows,
            token_ids=[tokens[r] for r in rows],
            finished=[finished[r] for r in rows],
            logits=logits if job.keep_logits else None,
            ended=[ended[r] for r in rows] if job.config.stop else None,
        )
        try:
            job.on_step(step)
        except Exception as error:  # the caller's failure, not the model's: only its rows leave
            self._abandon(job, rows, error)
            return []
        keep = [
            r
            for r in rows
            if not finished[r] and not ended[r] and job.produced[r] < job.config.max_new_tokens
        ]
        job.live = set(keep)
        return keep

    def _abandon(self, job: Job, rows: list[int], error: Exception) -> None:
        """`job`'s callback raised: its `rows` leave now (the caller's rows have no one to hear them)."""
        job.live = set()
        self.rows_dropped += len(rows)
        try:
            job.on_error(error)
        except Exception:
            logger.exception("continuous batching: a request's step and its error report both failed")

    def _release(self, slot: int) -> None:
        moved = self.cache.release(slot)
        last_job_row, last_id = self.slots.pop(), self.next_ids.pop()
        if moved is not None:
            self.slots[slot], self.next_ids[slot] = last_job_row, last_id

    def _decode_step(self) -> None:
        """One token for every decoding row; each job samples its own rows and hears its step."""
        for slot in reversed(range(len(self.slots))):  # callers that left: their rows go first
            job, _ = self.slots[slot]
            if job.dropped():
                self._release(slot)
                self.rows_dropped += 1
                self._closed(job, 1)
        if not self.slots:
            return
        started = time.perf_counter()
        device = self.runtime.model.device
        ids = torch.tensor(self.next_ids, device=device)  # [n]
        if self.fast is not None:
            logits = self.fast(ids, self.cache)  # [n, V]
        else:
            normed = self.runtime.lean.step(ids, self.cache)  # [n, d]
            logits = self.runtime.model.layout.unembed_normed(normed).float()  # [n, V]
        self.steps_run += 1
        self.step_sizes.append(len(self.slots))
        by_job: dict[Job, list[tuple[int, int]]] = {}
        for slot, (job, row) in enumerate(self.slots):
            by_job.setdefault(job, []).append((row, slot))
        leaving: list[int] = []
        elapsed = time.perf_counter() - started
        for job, members in by_job.items():
            job_started = time.perf_counter()
            members.sort()  # the job's row order: its generator draws as it does alone
            rows = [r for r, _ in members]
            job_logits = _rows_of(logits, [s for _, s in members], device)  # [rows, V]
            tokens, finished, ended = self._sample(job, rows, job_logits)
            job.timings.decode_s += elapsed + time.perf_counter() - job_started
            keep = set(self._emit(job, rows, tokens, finished, ended, job_logits))
            for row, slot in members:
                if row in keep:
                    self.next_ids[slot] = tokens[row]
                else:
                    leaving.append(slot)
        for slot in sorted(leaving, reverse=True):  # highest first: a moved row is never one leaving
            self._closed(self.slots[slot][0], 1)
            self._release(slot)

    def fail(self) -> list[Job]:
        """Forget every job (after an error in `run_once`); the jobs that were still open."""
        with self._lock:
            jobs = {id(j): j for j in [*self._inbox, *self.prefilling, *(j for j, _ in self.slots)]}
            self._inbox.clear()
            self._admitted = 0
        self.prefilling.clear()
        self.slots, self.next_ids, self.cache = [], [], RaggedCache(bucket=self.cache.bucket)
        return list(jobs.values())

    def run_once(self) -> None:
        """One decode step over every decoding row, then prefill chunks (rows joining next step)."""
        with self._lock:
            self.prefilling.extend(self._inbox)
            self._inbox.clear()
        with torch.inference_mode():
            self._decode_step()
            self._prefill_chunks()
