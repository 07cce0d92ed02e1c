"""Continuous batching: rows that join and leave a running batch generate what they generate alone."""

from __future__ import annotations

import pytest
import torch

from patchscope.engine import GenerationConfig, PatchedRow, RowPatch, extract, patched_generate
from patchscope.engine.errors import InvalidArgument
from patchscope.engine.scheduler import Scheduler, SchedulerFull
from patchscope.engine.streaming import RowEventStream
from patchscope.engine.timings import Timings

SOURCE = "The lobster is a species of crustacean from the eastern Atlantic Ocean"
TEMPLATES = [
    "cat -> cat\n1135 -> 1135\nhello -> hello\n{}",
    "Syria: Country in the Middle East\nLeonardo DiCaprio: American actor\nSamsung: {}",
    "{} is",
]
LEAN = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]


def rows_of(model, template: str, layers, positions=(-1, 3)) -> list[PatchedRow]:
    states = extract(model, SOURCE, list(layers), positions=list(positions)).states  # [l, p, d]
    return [
        PatchedRow(template, "?", (RowPatch(layer=layer, vector=states[k, p]),))
        for k, layer in enumerate(layers)
        for p in range(len(positions))
    ]


class Collect:
    """A job's steps gathered per row: token ids (stop tokens dropped) and logits."""

    def __init__(self) -> None:
        self.ids: dict[int, list[int]] = {}
        self.logits: dict[int, list[torch.Tensor]] = {}
        self.steps = 0

    def __call__(self, step) -> None:
        self.steps += 1
        for k, (row, token, done) in enumerate(zip(step.rows, step.token_ids, step.finished, strict=True)):
            if not done:
                self.ids.setdefault(row, []).append(token)
            if step.logits is not None:
                self.logits.setdefault(row, []).append(step.logits[k])


def drain(scheduler: Scheduler, limit: int = 10_000) -> int:
    runs = 0
    while scheduler.busy():
        scheduler.run_once()
        runs += 1
        assert runs < limit
    return runs


def assert_same(ids, logits, reference, tol: float = 1e-4) -> None:
    """Token-for-token equality; where the top-2 margin is within `tol`, equal logits decide."""
    for step, expected in enumerate(reference.token_ids):
        if step >= len(ids):
            break
        torch.testing.assert_close(logits[step], reference.scores[step], rtol=tol, atol=tol)
        if ids[step] != expected:
            top2 = reference.scores[step].topk(2).values
            assert float(top2[0] - top2[1]) < 2 * tol, f"tokens differ at step {step} with a decisive margin"
            return
    assert ids == reference.token_ids


@pytest.mark.parametrize("arch", LEAN)
def test_requests_joining_a_running_batch_generate_what_they_generate_alone(arch, tiny_runtimes):
    runtime = tiny_runtimes[arch]
    model = runtime.model
    runtime.prefix_cache.clear()
    config = GenerationConfig(max_new_tokens=12)
    scheduler = Scheduler(runtime, chunk_tokens=5)  # short chunks: prefills interleave with steps
    requests = [rows_of(model, t, layers) for t, layers in zip(TEMPLATES, ([0, 2], [1], [3, 1]), strict=True)]
    collects = [Collect() for _ in requests]
    scheduler.admit(requests[0], config, collects[0], keep_logits=True)
    for _ in range(4):  # the first request decodes before the others arrive
        scheduler.run_once()
    for rows, collect in zip(requests[1:], collects[1:], strict=True):
        scheduler.admit(rows, config, collect, keep_logits=True)
        scheduler.run_once()
    drain(scheduler)
    assert max(scheduler.step_sizes) > len(requests[0]), "later requests must join the running rows"
    for rows, collect in zip(requests, collects, strict=True):
        alone = patched_generate(runtime, rows, config, return_scores=True)
        for r, reference in enumerate(alone):
            assert_same(collect.ids.get(r, []), collect.logits[r], reference)
    assert scheduler.cache.rows == 0 and not scheduler.cache.keys, "idle: every slot given back"


def test_a_seeded_sampled_request_reproduces_among_other_traffic(llama_runtime):
    model = llama_runtime.model
    sampled = GenerationConfig(max_new_tokens=10, temperature=0.9, seed=7)
    rows = rows_of(model, TEMPLATES[0], [1, 2])
    alone = Collect()
    scheduler = Scheduler(llama_runtime)
    scheduler.admit(rows, sampled, alone)
    drain(scheduler)
    crowded = Collect()
    scheduler.admit(rows_of(model, TEMPLATES[1], [0, 3]), GenerationConfig(max_new_tokens=10), Collect())
    scheduler.run_once()
    scheduler.admit(rows, sampled, crowded)
    scheduler.admit(
        rows_of(model, TEMPLATES[2], [2]), GenerationConfig(max_new_tokens=3, temperature=1.5), Collect()
    )
    drain(scheduler)
    assert crowded.ids == alone.ids
    other_seed = Collect()
    scheduler.admit(rows, GenerationConfig(max_new_tokens=10, temperature=0.9, seed=8), other_seed)
    drain(scheduler)
    assert other_seed.ids != alone.ids, "the seed must matter (else this test proves nothing)"


def test_a_stop_sequence_ends_the_row_and_is_cut_from_the_explanation(llama_runtime):
    model = llama_runtime.model
    rows = rows_of(model, TEMPLATES[0], [1, 2])
    config = GenerationConfig(max_new_tokens=12)
    full = patched_generate(llama_runtime, rows, config)
    text = full[0].text
    assert len(text) > 4
    stop = text[2:4]
    stopped_config = GenerationConfig(max_new_tokens=12, stop=(stop,))
    scheduler = Scheduler(llama_runtime)
    stream = RowEventStream(model.tokenizer, 12, Timings(), stop=(stop,))
    events = []
    scheduler.admit(rows, stopped_config, lambda step: events.extend(stream.feed(step)))
    drain(scheduler)
    finished = {e.row: e for e in events if e.finished}
    expected = text[: text.find(stop)]
    assert finished[0].explanation == expected
    assert "".join(e.text for e in events if e.row == 0) == expected, "deltas never show the stop"
    assert len([e for e in events if e.row == 0]) < len(full[0].token_ids), "the row ended early"
    assert patched_generate(llama_runtime, rows, stopped_config)[0].text == expected


def test_the_row_cap_refuses_at_once_and_an_oversized_request_is_invalid(llama_runtime):
    rows = rows_of(llama_runtime.model, TEMPLATES[0], [1, 2])  # 4 rows
    scheduler = Scheduler(llama_runtime, max_rows=6)
    scheduler.admit(rows, GenerationConfig(), Collect())
    with pytest.raises(SchedulerFull, match="retry"):
        scheduler.admit(rows, GenerationConfig(), Collect())
    with pytest.raises(InvalidArgument, match="rows"):
        scheduler.admit(rows + rows, GenerationConfig(), Collect())
    drain(scheduler)
    scheduler.admit(rows, GenerationConfig(), Collect())  # room again once the rows ended
    drain(scheduler)


def test_a_dropped_request_leaves_within_one_step_and_its_slots_are_reused(llama_runtime):
    model = llama_runtime.model
    keep_rows = rows_of(model, TEMPLATES[0], [1, 2])
    gone = {"flag": False}
    leaving = Collect()
    kept = Collect()
    scheduler = Scheduler(llama_runtime)
    config = GenerationConfig(max_new_tokens=30)
    scheduler.admit(keep_rows, config, kept)
    scheduler.admit(rows_of(model, TEMPLATES[1], [0, 3]), config, leaving, dropped=lambda: gone["flag"])
    while leaving.steps < 2:
        scheduler.run_once()
    slots = scheduler.cache.keys[0].shape[0]
    gone["flag"] = True
    scheduler.run_once()
    assert leaving.steps == 2, "no step after the caller left"
    assert scheduler.rows_dropped == 4
    scheduler.admit(rows_of(model, TEMPLATES[2], [0, 1]), config, Collect())
    drain(scheduler)
    assert scheduler.cache.keys == [] and slots >= 8
    alone = patched_generate(llama_runtime, keep_rows, config)
    assert [kept.ids[r] for r in range(4)] == [g.token_ids for g in alone]


@pytest.mark.parametrize("fails_at", [1, 3], ids=["at-its-first-token", "mid-decode"])
def test_a_request_whose_own_callback_fails_leaves_alone_and_everyone_else_runs_on(llama_runtime, fails_at):
    model = llama_runtime.model
    config = GenerationConfig(max_new_tokens=12)
    keep_rows = rows_of(model, TEMPLATES[0], [1, 2])
    kept = Collect()
    failing = Collect()
    errors: list[Exception] = []

    def on_step(step) -> None:
        failing(step)
        if failing.steps == fails_at:
            raise RuntimeError("the caller's stream broke")

    scheduler = Scheduler(llama_runtime)
    scheduler.admit(keep_rows, config, kept)
    scheduler.run_once()
    scheduler.admit(rows_of(model, TEMPLATES[1], [0, 3]), config, on_step, on_error=errors.append)
    drain(scheduler)
    assert failing.steps == fails_at, "no step after the request's own callback failed"
    assert [str(e) for e in errors] == ["the caller's stream broke"]
    assert scheduler.rows == 0 and scheduler.cache.keys == [], "its rows and cache slots are free"
    alone = patched_generate(llama_runtime, keep_rows, config)
    assert [kept.ids[r] for r in range(4)] == [g.token_ids for g in alone]


def test_an_abandoned_huge_prefill_delays_the_next_request_by_at_most_one_chunk(llama_runtime):
    model = llama_runtime.model
    huge = PatchedRow("word " * 200 + "{}", "?", ())  # a prefix of ~200 tokens: many chunks
    gone = {"flag": False}
    scheduler = Scheduler(llama_runtime, chunk_tokens=8)
    scheduler.admit([huge], GenerationConfig(max_new_tokens=5), Collect(), dropped=lambda: gone["flag"])
    scheduler.run_once()  # its first chunk ran
    gone["flag"] = True
    nxt = Collect()
    scheduler.admit(rows_of(model, TEMPLATES[2], [1]), GenerationConfig(max_new_tokens=5), nxt)
    before = scheduler.chunks_run
    scheduler.run_once()
    assert nxt.steps == 1, "the next request's (one-chunk) prefill ran in the very next turn"
    assert scheduler.chunks_run - before == 1 and scheduler.rows_dropped == 1
    drain(scheduler)


@pytest.mark.parametrize("budget, joined", [(1, 1), (None, 4)])
def test_short_prefills_waiting_together_join_the_same_step_within_the_prefill_budget(
    llama_runtime, budget, joined, monkeypatch
):
    model = llama_runtime.model
    scheduler = Scheduler(llama_runtime, prefill_budget=budget)
    for template in TEMPLATES:  # the templates' prefixes cached: each prefill is one short chunk
        scheduler.admit(rows_of(model, template, [1]), GenerationConfig(max_new_tokens=1), Collect())
        drain(scheduler)
    jobs = [Collect() for _ in range(4)]
    for k, job in enumerate(jobs):
        scheduler.admit(rows_of(model, TEMPLATES[k % 3], [1]), GenerationConfig(max_new_tokens=3), job)
    products = []
    layout = type(model.layout)
    unembed = layout.unembed_normed
    monkeypatch.setattr(
        layout, "unembed_normed", lambda self, normed: products.append(normed) or unembed(self, normed)
    )
    scheduler.run_once()
    monkeypatch.undo()
    assert sum(j.steps for j in jobs) == joined, "each joined request has its first token"
    assert [p.shape[0] for p in products] == [2 * joined], (
        "one head product for the round's first tokens (2 rows each)"
    )
    drain(scheduler)
    for k, job in enumerate(jobs):  # admission order changes nothing in what each request gets
        alone = patched_generate(
            llama_runtime, rows_of(model, TEMPLATES[k % 3], [1]), GenerationConfig(max_new_tokens=3)
        )
        assert [job.ids[r] for r in range(len(alone))] == [g.token_ids for g in alone]
