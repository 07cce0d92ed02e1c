"""The engine runs in bf16 and on CUDA as well as in fp32 on the CPU."""

import pytest
import torch

from patchscope.engine import GenerationConfig, PatchedRow, RowPatch, extract, patched_generate
from patchscope.engine.lens import logit_lens
from patchscope.engine.models import load_directory
from patchscope.engine.presets import PRESETS
from patchscope.engine.runtime import TargetRuntime

IDENTITY = PRESETS["identity"]


def sweep_is_consistent(model) -> None:
    """Cached equals uncached, and the logit lens reads fp32 states of the model."""
    states = extract(model, "The lobster is red", list(range(4))).states[:, 0]
    rows = [
        PatchedRow(IDENTITY.template, IDENTITY.filler, (RowPatch(layer, states[layer]),))
        for layer in range(4)
    ]
    config = GenerationConfig(max_new_tokens=5)
    runtime = TargetRuntime.build(model)
    cached = patched_generate(runtime, rows, config)
    uncached = patched_generate(runtime, rows, config, use_prefix_cache=False)
    assert [r.token_ids for r in cached] == [r.token_ids for r in uncached]
    top, pairs = logit_lens(model, states[3], 3)
    assert top == pairs[0][0] and len(pairs) == 3


def test_bfloat16_sweep_on_cpu(tiny_dirs):
    model = load_directory("tiny-llama-bf16", tiny_dirs["llama"], dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert extract(model, "a b c", [1]).states.dtype == torch.float32  # states leave the engine as fp32
    sweep_is_consistent(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sweep_on_cuda(tiny_dirs, dtype):
    model = load_directory("tiny-gemma-cuda", tiny_dirs["gemma3_text"], dtype=dtype, device="cuda")
    assert model.device.type == "cuda"
    sweep_is_consistent(model)
