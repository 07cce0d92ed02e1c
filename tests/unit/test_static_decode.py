"""The static decode path generates what the eager engine generates, and refuses what it cannot run."""

import shutil

import pytest
import torch

from patchscope.engine import (
    GenerationConfig,
    InvalidArgument,
    PatchedRow,
    RowPatch,
    StaticDecoder,
    extract,
    load_directory,
    patched_generate,
)
from patchscope.engine import generation as generation_module
from patchscope.engine.options import EngineOptions
from patchscope.engine.presets import PRESETS
from patchscope.engine.runtime import TargetRuntime

SOURCE = "The lobster is a species of crustacean from the eastern Atlantic Ocean"
CONFIG = GenerationConfig(max_new_tokens=8)


@pytest.fixture
def llama(tiny_dirs):
    """A private copy: decoders with slots leave hooks on the blocks, which must not reach other tests."""
    return load_directory("tiny-llama", tiny_dirs["llama"])


def sweep(model, positions=(-1, 3), layers=None, source=SOURCE) -> list[PatchedRow]:
    """One row per (layer, source position), one patch each: what a sweep sends."""
    layers = list(range(model.layout.num_layers)) if layers is None else layers
    states = extract(model, source, layers, positions=list(positions)).states  # [l, p, d]
    preset = PRESETS["identity"]
    return [
        PatchedRow(preset.template, preset.filler, (RowPatch(layer=layer, vector=states[k, p]),))
        for k, layer in enumerate(layers)
        for p in range(len(positions))
    ]


def generate(model, rows, decoder: StaticDecoder | None, config=CONFIG) -> list[list[int]]:
    """Token ids of `rows` on a runtime of `model` that decodes through `decoder` (None: eager)."""
    runtime = TargetRuntime.build(model)
    runtime.static_decoder = decoder
    return [r.token_ids for r in patched_generate(runtime, rows, config, use_prefix_cache=False)]


@pytest.mark.parametrize(
    ("mode", "compile_prefill"),
    [
        (None, False),
        (None, True),
        pytest.param(
            "default",
            True,
            id="inductor",
            marks=pytest.mark.skipif(shutil.which("c++") is None, reason="inductor needs a C++ compiler"),
        ),
    ],
)
def test_static_decoder_generates_what_the_eager_engine_generates(llama, mode, compile_prefill):
    rows = sweep(llama)
    expected = generate(llama, rows, None)
    assert generate(llama, rows, StaticDecoder(llama, mode, compile_prefill)) == expected
    # The patches matter: an unpatched batch continues differently for some rows.
    unpatched = generate(llama, [PatchedRow(r.template, r.filler, ()) for r in rows], None)
    assert unpatched != expected


def test_rows_that_are_not_a_sweep_take_the_eager_hooks_and_still_match(llama):
    rows = sweep(llama)
    doubled = PatchedRow(rows[0].template, rows[0].filler, rows[0].patches + rows[5].patches)
    mixed = [*rows[:3], doubled, PatchedRow(rows[0].template, rows[0].filler, ())]
    decoder = StaticDecoder(llama, None, compile_prefill=True)
    assert generate(llama, mixed, decoder) == generate(llama, mixed, None)


def test_rows_stop_at_the_same_token_as_on_the_eager_path(llama, monkeypatch):
    rows = sweep(llama)
    expected = generate(llama, rows, None)
    stop = expected[0][2]  # a token row 0 generates third: make it a stop token
    monkeypatch.setattr(generation_module, "stop_ids", lambda _target: {stop})
    eager = generate(llama, rows, None)
    assert eager[0] == expected[0][:2]  # the stop token ends the row and is not reported
    assert generate(llama, rows, StaticDecoder(llama, None)) == eager


def test_a_static_cache_is_reused_for_templates_of_similar_length(llama):
    decoder = StaticDecoder(llama, None)
    rows = sweep(llama)
    generate(llama, rows, decoder)
    other = [PatchedRow("Say: {} again", r.filler, r.patches) for r in rows]
    generate(llama, other, decoder)
    assert len(decoder._caches) == 1


def test_models_with_sliding_window_layers_are_refused_by_name(tiny_models):
    with pytest.raises(InvalidArgument, match="sliding-window"):
        StaticDecoder(tiny_models["gemma3_text"], None)


def test_capture_needs_a_cuda_device(llama):
    with pytest.raises(InvalidArgument, match="CUDA"):
        StaticDecoder(llama, None, capture=True)


def test_engine_options_pick_the_decode_loop(llama):
    assert TargetRuntime.build(llama).static_decoder is None
    decoder = TargetRuntime.build(llama, EngineOptions(decode="static")).static_decoder
    assert isinstance(decoder, StaticDecoder) and decoder.mode == "reduce-overhead"
    with pytest.raises(ValueError, match="decode must be one of"):
        EngineOptions(decode="fast")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_captured_sweep_generates_what_the_eager_engine_generates(tiny_dirs):
    model = load_directory("tiny-llama", tiny_dirs["llama"], device="cuda")
    rows = sweep(model)
    expected = generate(model, rows, None)
    decoder = StaticDecoder(model, None, capture=True)
    assert generate(model, rows, decoder) == expected
    assert generate(model, rows, decoder) == expected  # the second call replays the recorded graph
    assert len(decoder._graphs) == 1


@pytest.mark.realmodel
def test_the_static_decoder_explains_a_real_sweep_as_the_eager_engine_does(smollm2):
    rows = sweep(smollm2, (-1,), list(range(0, 30, 3)), "Barack Obama")
    config = GenerationConfig(max_new_tokens=10)
    expected = generate(smollm2, rows, None, config)
    # No slots: leaves the shared model's blocks alone.
    assert generate(smollm2, rows, StaticDecoder(smollm2, None), config) == expected
    assert any("Obama" in smollm2.tokenizer.decode(ids) for ids in expected)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_the_bucketed_ragged_step_decodes_what_the_eager_scheduler_decodes(arch, tiny_runtimes):
    """The service's fast path, its shapes run eagerly (mode None): what a compiled step must equal."""
    from patchscope.engine.scheduler import Scheduler

    runtime = tiny_runtimes[arch]
    model = runtime.model
    templates = ["cat -> cat\n1135 -> 1135\nhello -> hello\n{}", "{} is", "Samsung: {} and more"]
    outputs = {}
    for compiled in (False, True):
        scheduler = Scheduler(runtime, chunk_tokens=4, compiled_step=compiled, compile_mode=None)
        got: dict[tuple[int, int], list[int]] = {}
        for j, template in enumerate(templates):  # joining one after another: 3, then 5, then 7 rows
            rows = (
                sweep(model, positions=(-1,), layers=[0, 1, 2][: j + 1]) if j else sweep(model, (-1, 3), [1])
            )
            rows = [PatchedRow(template, r.filler, r.patches) for r in rows]

            def collect(step, j=j, got=got):
                for row, token, done in zip(step.rows, step.token_ids, step.finished, strict=True):
                    if not done:
                        got.setdefault((j, row), []).append(token)

            scheduler.admit(rows, GenerationConfig(max_new_tokens=9), collect)
            scheduler.run_once()
        while scheduler.busy():
            scheduler.run_once()
        outputs[compiled] = got
        if compiled:
            assert scheduler.fast.shapes, "the bucketed step ran"
            assert all(rows & (rows - 1) == 0 for rows, _ in scheduler.fast.shapes), "rows padded to 2^k"
    assert outputs[True] == outputs[False]
