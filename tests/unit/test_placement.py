"""A model split across devices by blocks: the split, the moves, patches landing on their block's device.

On a CPU-only machine every block is placed on "cpu" (torch has one CPU device), which runs the same
hooks, caches and patch writes as a split across GPUs; the tests marked `gpu` split across "cpu" and
"cuda:0", where a tensor on the wrong device fails loudly.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from patchscope.engine.generation import GenerationConfig, PatchedRow, RowPatch, patched_generate
from patchscope.engine.hooks import capture, patching
from patchscope.engine.kv_cache import PlacedCache, cache_kwarg, transformers_cache
from patchscope.engine.models import load_directory
from patchscope.engine.models.placement import BlockPlacement, even_counts, place, placement_of, spread
from patchscope.engine.options import EngineOptions
from patchscope.engine.patch import Patch, write_patches
from patchscope.engine.runtime import TargetRuntime
from patchscope.serve.config import ServiceConfig

TEMPLATE = "cat -> cat\nhello -> hello\n{}"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_spread_splits_blocks_in_contiguous_runs_the_first_device_taking_the_smaller_share():
    assert spread(5, ["cpu", "cpu"]).blocks == ("cpu",) * 5
    placement = spread(30, ["cpu"] * 4)
    assert len(placement.blocks) == 30 and placement.devices == ("cpu",)
    assert spread(4, ["cpu", "cpu"], [1, 3]).blocks == ("cpu",) * 4
    with pytest.raises(ValueError, match="sum to 4"):
        spread(4, ["cpu", "cpu"], [1, 2])
    with pytest.raises(ValueError, match="2 devices but 3 block counts"):
        spread(4, ["cpu", "cpu"], [1, 1, 2])


def test_even_split_sizes_differ_by_at_most_one_and_the_extra_blocks_go_last():
    assert even_counts(30, 4) == [7, 7, 8, 8]
    assert even_counts(18, 2) == [9, 9]
    assert even_counts(3, 4) == [0, 1, 1, 1]
    placement = BlockPlacement(tuple("a" * 7 + "b" * 7 + "c" * 8 + "d" * 8))
    assert placement.describe() == "a blocks 0-6, b blocks 7-13, c blocks 14-21, d blocks 22-29"


def test_a_device_this_process_lacks_is_refused_with_the_fix():
    if torch.cuda.is_available():
        pytest.skip("this process has a GPU")
    with pytest.raises(ValueError, match=r"sees 0 CUDA device\(s\).*num_gpus"):
        spread(4, ["cuda:0", "cuda:1"])
    with pytest.raises(ValueError, match="only cpu and cuda"):
        spread(4, ["meta"])


@pytest.fixture
def placed_llama(tiny_dirs):
    """A fresh tiny Llama split over two "cpu" devices (placing changes the model in place)."""
    model = load_directory("tiny-llama", tiny_dirs["llama"])
    return place(model, spread(model.layout.num_layers, ["cpu", "cpu"]))


def _rows(model, layers=(0, 2, 3)):
    torch.manual_seed(0)
    vectors = torch.randn(len(layers), model.model.config.hidden_size) * 4
    return [
        PatchedRow(TEMPLATE, "?", (RowPatch(layer=layer, vector=vectors[k]),))
        for k, layer in enumerate(layers)
    ]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])  # lean family, sliding windows, neither
@torch.inference_mode()
def test_a_placed_model_explains_as_the_unplaced_one(arch, tiny_dirs, tiny_runtimes):
    model = load_directory(f"tiny-{arch}", tiny_dirs[arch])
    place(model, spread(model.layout.num_layers, ["cpu", "cpu"]))
    runtime = TargetRuntime.build(model)
    assert runtime.lean is None and runtime.static_decoder is None  # transformers' forward, eager loop
    config = GenerationConfig(max_new_tokens=6)
    got = patched_generate(runtime, _rows(model), config)
    want = patched_generate(tiny_runtimes[arch], _rows(model), config)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]


@torch.inference_mode()
def test_every_block_of_a_placed_model_receives_its_inputs_through_the_move(placed_llama):
    seen: list[int] = []
    handles = [
        block.register_forward_pre_hook(lambda _m, args, i=i: seen.append(i))
        for i, block in enumerate(placed_llama.layout.blocks)
    ]
    try:
        capture(placed_llama, torch.tensor([[0, 5, 6, 7]]), [placed_llama.layout.num_layers - 1])
    finally:
        for h in handles:
            h.remove()
    assert seen == list(range(placed_llama.layout.num_layers))
    assert placement_of(placed_llama).describe() == "cpu blocks 0-3"


def test_a_placed_model_refuses_the_lean_forward_and_the_static_loops(placed_llama):
    with pytest.raises(ValueError, match="placed across cpu blocks 0-3"):
        TargetRuntime.build(placed_llama, EngineOptions(forward="lean"))
    with pytest.raises(ValueError, match="eager loop only"):
        TargetRuntime.build(placed_llama, EngineOptions(decode="static"))
    with pytest.raises(ValueError, match="placed already"):
        place(placed_llama, spread(placed_llama.layout.num_layers, ["cpu"]))


def test_packed_linears_are_not_moved_off_the_cpu(tiny_dirs):
    model = load_directory("tiny-llama", tiny_dirs["llama"], options=EngineOptions(gemm="onednn"))
    with pytest.raises(ValueError, match="cannot move off the CPU"):
        place(model, BlockPlacement(("cpu", "cpu", "cuda:0", "cuda:0")))
    assert placement_of(model) is None  # refused before anything moved


@torch.inference_mode()
def test_a_patch_lands_in_its_block_output_under_placement(placed_llama):
    vector = torch.full((placed_llama.model.config.hidden_size,), 3.0, dtype=torch.float64)
    ids = torch.tensor([[0, 5, 6, 7]])
    with patching(placed_llama.layout, [Patch(row=0, position=2, layer=1, vector=vector)]):
        out = capture(placed_llama, ids, [1])[1]
    assert torch.equal(out[0, 2], vector.float())


def test_write_patches_moves_vectors_and_indices_to_the_hidden_states():
    hidden = torch.zeros(2, 3, 4, dtype=torch.bfloat16)
    write_patches(hidden, torch.tensor([1], dtype=torch.int32), torch.tensor([2]), torch.ones(1, 4))
    assert hidden[1, 2].tolist() == [1.0] * 4 and hidden.sum() == 4


def test_a_placed_model_decodes_with_the_placed_cache(placed_llama, llama):
    assert isinstance(transformers_cache(placed_llama.model), PlacedCache)
    assert not isinstance(transformers_cache(llama.model), PlacedCache)
    cache = transformers_cache(placed_llama.model)
    ids = torch.tensor([[0, 5, 6], [0, 7, 8]])
    placed_llama.model(ids, use_cache=True, **{cache_kwarg(type(placed_llama.model)): cache})
    keys = cache.layers[0].keys.clone()
    cache.batch_select_indices(torch.tensor([1]))
    assert torch.equal(cache.layers[0].keys, keys[1:])


def test_service_placement_is_one_way_and_leaves_the_devices_to_it():
    base = dict(sources=["a"], targets=["b"], auth={"required": False})
    config = ServiceConfig(**base, placement={"num_gpus": 2})
    assert config.placement.device_names() == ["cuda:0", "cuda:1"]
    explicit = ServiceConfig(**base, placement={"devices": ["cpu", "cpu"], "blocks": [1, 3]})
    assert explicit.placement.block_placement(4).blocks == ("cpu",) * 4
    for wrong, message in (
        ({"placement": {"num_gpus": 2, "devices": ["cuda:0"]}}, "exactly one of"),
        ({"placement": {"devices": ["cpu"], "blocks": [1, 3]}}, "2 counts for 1 devices"),
        ({"placement": {"num_gpus": 2}, "device": "cuda"}, "leave device at auto"),
        ({"placement": {"num_gpus": 2}, "forward": "lean"}, "transformers' forward"),
        ({"placement": {"num_gpus": 2}, "gemm": "auto"}, "set gemm to aten"),
    ):
        with pytest.raises(ValidationError, match=message):
            ServiceConfig(**base, **wrong)


def test_a_hosted_target_is_placed_by_the_service_config_and_a_source_is_not(tiny_dirs):
    from patchscope.serve.hosting import Hosted

    config = dict(
        sources=["tiny-llama"],
        targets=["tiny-llama"],
        models={"tiny-llama": str(tiny_dirs["llama"])},
        auth={"required": False},
        gemm="aten",
        forward="transformers",
        placement={"devices": ["cpu", "cpu"]},
    )
    target = Hosted.start(config, "targets").model("tiny-llama")
    source = Hosted.start(config, "sources").model("tiny-llama")
    assert placement_of(target) is not None and len(placement_of(target).blocks) == target.layout.num_layers
    assert placement_of(source) is None


@pytest.mark.gpu
@CUDA
@torch.inference_mode()
def test_a_model_split_across_cpu_and_gpu_explains_as_on_one_device(tiny_dirs, llama_runtime):
    model = load_directory("tiny-llama", tiny_dirs["llama"])
    place(model, spread(model.layout.num_layers, ["cpu", "cuda:0"]))
    assert {str(b.self_attn.q_proj.weight.device) for b in model.layout.blocks[2:]} == {"cuda:0"}
    config = GenerationConfig(max_new_tokens=6)
    got = patched_generate(TargetRuntime.build(model), _rows(model, layers=(0, 3)), config)
    want = patched_generate(llama_runtime, _rows(model, layers=(0, 3)), config)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]


@pytest.mark.gpu
@CUDA
def test_a_cpu_vector_is_written_into_a_gpu_block_through_first_device_indices():
    hidden = torch.zeros(2, 3, 4, device="cuda:0", dtype=torch.bfloat16)
    write_patches(hidden, torch.tensor([1]), torch.tensor([2]), torch.ones(1, 4))  # all on the CPU
    assert hidden[1, 2].tolist() == [1.0] * 4
