"""`patchscope batch`: input formats (vLLM's layer ids pinned against `extract`), refusals, parts, resume."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from patchscope.batch import BatchOptions, InputLimits, Refused, Worker, read_file, run_local
from patchscope.batch.schema import COLUMNS, KEY
from patchscope.batch.vllm import layer_of_vllm_id, vllm_reader
from patchscope.engine.errors import InvalidArgument
from patchscope.engine.hooks import extract
from patchscope.engine.template import tokenize_prompt
from patchscope.explain import ActivationsRequest, LocalBackend, TargetSpec, explain
from patchscope.explain.local import LOCAL_LIMITS
from patchscope.explain.plan import no_mappings
from patchscope_client import tensors

PROMPTS = ["The cat sat on the mat", "Paris is the capital of France", "a glass of milk", "old boats"]


def residual_stream(model, prompt: str) -> tuple[list[int], torch.Tensor]:
    """What vLLM records for every aux id: the stream entering block k (k < L) and the final norm (k = L).

    Read with pre-hooks, i.e. without this project's block-output hooks: an independent reference.
    """
    ids = tokenize_prompt(model.tokenizer, prompt)
    seen: dict[int, torch.Tensor] = {}

    def grab(k: int):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[k] = hidden[0].detach().float()

        return hook

    modules = [*model.layout.blocks, model.layout.final_norm]
    handles = [m.register_forward_pre_hook(grab(k), with_kwargs=True) for k, m in enumerate(modules)]
    try:
        with torch.no_grad():
            model.model(torch.tensor([ids]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return ids, torch.stack([seen[k] for k in range(len(modules))], dim=1)  # [T, L+1, d]


def write_vllm(path, model, prompt: str, layer_ids, dtype=torch.float32) -> None:
    ids, stream = residual_stream(model, prompt)
    save_file(
        {"hidden_states": stream[:, list(layer_ids)].to(dtype).contiguous(), "token_ids": torch.tensor(ids)},
        str(path),
    )


def write_patchscope(path, model, prompt: str, layers, positions=(-1,), fingerprint=None) -> None:
    """The file `patchscope-client extract --out` writes, from the same extraction the service runs."""
    hidden = extract(model, prompt, layers, list(positions))
    states = hidden.states.reshape(-1, hidden.states.shape[-1]).numpy()  # layer-major rows
    meta = {
        "model": model.id,
        "fingerprint": model.fingerprint if fingerprint is None else fingerprint,
        "layers": json.dumps([layer for layer in hidden.layers for _ in hidden.positions]),
        "positions": json.dumps([p for _ in hidden.layers for p in hidden.positions]),
        "tokens": json.dumps([hidden.tokens[p] for _ in hidden.layers for p in hidden.positions]),
    }
    path.write_bytes(tensors.encode(states, metadata=meta))


def reader(model, layer_ids, positions="all"):
    tok = model.tokenizer
    return vllm_reader(
        layer_ids, model.facts.num_layers, positions, lambda t: tok.decode([t]), model.facts.vocab_size
    )


# --- vLLM's layer ids --------------------------------------------------------------------------------


def test_vllm_layer_ids_are_block_outputs_pinned_against_extract(llama, tmp_path):
    """vLLM id k is the stream leaving block k-1; id L (pre-norm) is this project's layer L-1."""
    L = llama.facts.num_layers
    ids = [1, 2, L]
    path = tmp_path / "req-1.safetensors"
    write_vllm(path, llama, PROMPTS[0], ids)
    rows = read_file(str(path), "vllm", InputLimits(), vllm=reader(llama, ids))
    layers = [layer_of_vllm_id(i, L) for i in ids]
    assert layers == [0, 1, L - 1]
    want = extract(llama, PROMPTS[0], layers, list(range(len(rows.positions) // len(ids))))
    assert rows.layers == tuple(layer for layer in layers for _ in want.positions)
    assert rows.positions == tuple(p for _ in layers for p in want.positions)
    torch.testing.assert_close(
        rows.states, want.states.reshape(-1, want.states.shape[-1]), atol=1e-5, rtol=1e-5
    )
    assert rows.tokens[: len(want.positions)] == tuple(want.tokens)
    assert rows.request_id == "req-1" and rows.format == "vllm"
    # Off by one (id k read as layer k) would not match: the test can fail.
    shifted = extract(llama, PROMPTS[0], [1], want.positions).states[0]
    assert not torch.allclose(rows.states[: len(want.positions)], shifted, atol=1e-3)


def test_vllm_id_zero_and_past_the_last_block_are_refused():
    with pytest.raises(InvalidArgument, match="id 0 is the embeddings"):
        layer_of_vllm_id(0, 4)
    with pytest.raises(InvalidArgument, match=r"1\.\.4"):
        layer_of_vllm_id(5, 4)


def test_vllm_positions_and_bf16_dumps(llama, tmp_path):
    path = tmp_path / "r.safetensors"
    write_vllm(path, llama, PROMPTS[1], [2, 3], dtype=torch.bfloat16)
    rows = read_file(str(path), "auto", InputLimits(), vllm=reader(llama, [2, 3], positions=(-1, 1)))
    T = len(tokenize_prompt(llama.tokenizer, PROMPTS[1]))
    assert rows.positions == (T - 1, 1, T - 1, 1) and rows.layers == (1, 1, 2, 2)
    want = extract(llama, PROMPTS[1], [1, 2], [T - 1, 1]).states.reshape(4, -1)
    torch.testing.assert_close(rows.states, want.to(torch.bfloat16).float())


# --- the project's own files -------------------------------------------------------------------------


def test_patchscope_file_reads_with_its_provenance(llama, tmp_path):
    path = tmp_path / "a.safetensors"
    write_patchscope(path, llama, PROMPTS[2], [1, 3], positions=(-1, 2))
    rows = read_file(str(path), "auto", InputLimits(), hidden_size=llama.facts.hidden_size)
    T = len(tokenize_prompt(llama.tokenizer, PROMPTS[2]))
    assert rows.format == "patchscope" and rows.fingerprint == llama.fingerprint
    assert rows.layers == (1, 1, 3, 3) and rows.positions == (T - 1, 2, T - 1, 2)
    torch.testing.assert_close(
        rows.states, extract(llama, PROMPTS[2], [1, 3], [T - 1, 2]).states.reshape(4, -1)
    )


# --- bad input: one line per file -------------------------------------------------------------------


def bad_files(llama, tmp_path) -> dict[str, str]:
    """name -> a fragment of the reason the file must be refused with."""
    d = llama.facts.hidden_size
    good = tmp_path / "good.safetensors"
    write_patchscope(good, llama, PROMPTS[0], [1])
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) - 7])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x07" * 64)
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01")
    save_file({"weights": torch.zeros(2, d)}, str(tmp_path / "unknown.safetensors"))
    nan = torch.randn(3, d)
    nan[1, 5] = math.nan
    meta = {"layers": "[1]"}
    save_file({"states": nan}, str(tmp_path / "nan.safetensors"), metadata=meta)
    inf = torch.randn(2, d)
    inf[0, 0] = math.inf
    save_file({"states": inf}, str(tmp_path / "inf.safetensors"), metadata=meta)
    save_file({"states": torch.randn(2, d + 1)}, str(tmp_path / "hidden.safetensors"), metadata=meta)
    save_file({"states": torch.randn(d)}, str(tmp_path / "shape.safetensors"), metadata=meta)
    save_file({"states": torch.randn(2, d)}, str(tmp_path / "nolayers.safetensors"))
    save_file(
        {"states": torch.randn(3, d)}, str(tmp_path / "count.safetensors"), metadata={"layers": "[1, 2]"}
    )
    save_file({"states": torch.randn(9, d)}, str(tmp_path / "rows.safetensors"), metadata=meta)
    save_file({"states": torch.randn(2, d)}, str(tmp_path / "range.safetensors"), metadata={"layers": "[99]"})
    other = tmp_path / "other.safetensors"
    write_patchscope(other, llama, PROMPTS[0], [1], fingerprint="f" * 64)
    write_vllm(tmp_path / "vaxis.safetensors", llama, PROMPTS[0], [1, 2, 3])
    save_file(
        {"hidden_states": torch.randn(4, 2, d), "token_ids": torch.tensor([0, 1, 2])},
        str(tmp_path / "vlen.safetensors"),
    )
    return {
        "truncated": "truncated or corrupt",
        "garbage": "truncated or corrupt",
        "tiny": "shorter than its header",
        "unknown": "unknown format",
        "nan": "row 1 holds NaN or Inf",
        "inf": "row 0 holds NaN or Inf",
        "hidden": f"hidden size {d + 1}, but the source's is {d}",
        "shape": "must be [rows, hidden]",
        "nolayers": "names no layers",
        "count": "has 2 entries for 3 rows",
        "rows": "over the limit of 8 per file",
        "range": "layer 99 out of range",
        "other": "states of other weights",
        "vaxis": "layer axis has 3 entries, but --vllm-layers names 2",
        "vlen": "3 token_ids for 4 hidden-state rows",
    }


def test_bad_inputs_are_refused_one_by_one_and_the_job_goes_on(llama, llama_runtime, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    expected = bad_files(llama, inputs)
    options = BatchOptions(
        source=llama.id, target=llama.id, vllm_layers=(1, 2), max_rows_per_file=8, max_new_tokens=3
    )
    worker = Worker(options, llama, llama_runtime, no_mappings)
    summary = run_local(
        options,
        [str(inputs), str(tmp_path / "missing.safetensors")],
        str(tmp_path / "o.parquet"),
        worker=worker,
    )
    reasons = {r.file.rsplit("/", 1)[-1].removesuffix(".safetensors"): r.reason for r in summary.refusals}
    assert reasons.pop("missing") == "no such file"
    for name, fragment in expected.items():
        assert fragment in reasons[name], (name, reasons[name])
    assert set(reasons) == set(expected)
    assert all("\n" not in r for r in reasons.values())
    assert summary.rows == 1 and summary.table.column("input_file")[0].as_py().endswith("good.safetensors")


def test_file_size_limit_is_named(llama, tmp_path):
    path = tmp_path / "big.safetensors"
    write_patchscope(path, llama, PROMPTS[0], [1, 2])
    with pytest.raises(Refused, match=r"over the limit of 100 \(--max-file-bytes\)"):
        read_file(str(path), "auto", InputLimits(max_file_bytes=100))


def test_vllm_format_without_layer_ids_is_a_config_error():
    with pytest.raises(ValueError, match="--format vllm needs --vllm-layers"):
        BatchOptions(source="a", target="a", format="vllm")


# --- the job: one pipeline, batched across files, parts and resume ----------------------------------


@pytest.fixture
def inputs(llama, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for k, prompt in enumerate(PROMPTS):
        write_patchscope(folder / f"p{k}.safetensors", llama, prompt, [1, 2])
        write_vllm(folder / f"v{k}.safetensors", llama, prompt, [2, 4])
    return folder


def options_for(llama, **kw) -> BatchOptions:
    base = dict(source=llama.id, target=llama.id, vllm_layers=(2, 4), files_per_part=3, max_new_tokens=4)
    return BatchOptions(**(base | kw))


def test_rows_equal_explaining_each_file_alone(llama, llama_runtime, inputs, tmp_path):
    """Batching rows of many files into shared requests changes no explanation."""
    options = options_for(llama)
    worker = Worker(options, llama, llama_runtime, no_mappings)
    summary = run_local(options, [str(inputs / "*.safetensors")], str(tmp_path / "o.parquet"), worker=worker)
    got = summary.table.to_pylist()
    assert summary.refusals == [] and summary.parts_run == 3 and len(got) == 8 * 2
    assert tuple(summary.table.column_names) == COLUMNS
    backend = LocalBackend([llama], [llama_runtime])
    for path in sorted(inputs.glob("*.safetensors")):
        rows = worker.read([str(path.resolve())])[0][0]
        request = ActivationsRequest(
            source=llama.id,
            states=rows.states,
            target=TargetSpec(model=llama.id, generation=worker._spec(1).generation),
            layers=rows.layers,
            positions=rows.positions,
            tokens=rows.tokens,
        )
        alone = explain(backend, request, no_mappings, LOCAL_LIMITS).results
        mine = [r for r in got if r["input_file"] == str(path.resolve())]
        assert [r["explanation"] for r in mine] == [a.explanation for a in alone]
        assert [r["source_layer"] for r in mine] == list(rows.layers)
        assert [r["row"] for r in mine] == list(range(len(rows)))
    record = json.loads(got[0]["reproduction"])
    assert record["source"]["fingerprint"] == llama.fingerprint and record["input"]["row"] == 0
    assert got[0]["confidence"] is None  # no calibrator: null, not a made-up figure
    # The controls of the pipeline's own batch travel into every row.
    assert all(isinstance(r["same_as_unpatched"], bool) and r["unpatched_answer"] is not None for r in got)
    assert all(0.0 <= r["patch_effect"] <= 1.0 for r in got)


def test_resume_redoes_only_missing_parts_and_refuses_another_job(llama, llama_runtime, inputs, tmp_path):
    options = options_for(llama)
    worker = Worker(options, llama, llama_runtime, no_mappings)
    out = str(tmp_path / "o.parquet")
    first = run_local(options, [str(inputs)], out, worker=worker)
    parts = sorted((tmp_path / "o.parquet.parts").glob("part-*.parquet"))
    assert len(parts) == 3
    parts[1].unlink()  # as if the run had died in part 1
    again = run_local(options, [str(inputs)], out, resume=True, worker=worker)
    assert (again.parts_run, again.parts_skipped) == (1, 2)
    assert again.table.equals(first.table)
    keys = [tuple(r[k] for k in KEY) for r in pq.read_table(out).to_pylist()]
    assert len(keys) == len(set(keys)) == 16
    with pytest.raises(InvalidArgument, match="other options \\(max_new_tokens\\)"):
        run_local(options_for(llama, max_new_tokens=5), [str(inputs)], out, worker=worker)
    with pytest.raises(InvalidArgument, match="nothing to resume"):
        run_local(options, [str(inputs)], str(tmp_path / "new.parquet"), resume=True, worker=worker)


def test_a_changed_input_under_a_resumed_job_is_an_error(llama, llama_runtime, inputs, tmp_path):
    options = options_for(llama)
    worker = Worker(options, llama, llama_runtime, no_mappings)
    out = str(tmp_path / "o.parquet")
    run_local(options, [str(inputs)], out, worker=worker)
    write_patchscope(inputs / "p0.safetensors", llama, PROMPTS[3], [1, 2])
    with pytest.raises(InvalidArgument, match=r"p0\.safetensors changed since"):
        run_local(options, [str(inputs)], out, worker=worker)


def test_target_layer_pairs_and_their_gaps(llama, llama_runtime, inputs, tmp_path):
    options = options_for(llama, target_layers={1: 3, 2: 0, 3: 3}, files_per_part=8)
    worker = Worker(options, llama, llama_runtime, no_mappings)
    summary = run_local(options, [str(inputs)], str(tmp_path / "o.parquet"), worker=worker)
    pairs = {(r["source_layer"], r["target_layer"]) for r in summary.table.to_pylist()}
    assert pairs == {(1, 3), (2, 0), (3, 3)}
    # v*: layers 1 and 3; p*: layers 1 and 2. Without a pair for layer 1, every file is refused.
    options = options_for(llama, target_layers={2: 0, 3: 3}, files_per_part=8)
    worker = Worker(options, llama, llama_runtime, no_mappings)
    summary = run_local(options, [str(inputs)], str(tmp_path / "o2.parquet"), worker=worker)
    assert summary.rows == 0 and len(summary.refusals) == 8
    assert "names no target layer for source layer 1" in summary.refusals[0].reason
