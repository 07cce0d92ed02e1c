"""Shared fixtures: a tiny BPE tokenizer trained on real text, and tiny random models of each architecture.

Tiny models are saved with `save_pretrained` and loaded back through the same loader as real models, so
unit tests exercise the real loading path, hook-point table and fingerprinting.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from patchscope.engine.models import LoadedModel, load_directory  # noqa: E402
from patchscope.engine.runtime import TargetRuntime  # noqa: E402

VOCAB = 512
DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)


def data_dir() -> Path:
    """The packaged data (`patchscope/data/`), or `$PATCHSCOPE_DATA` when `make test DATA=...` sets it."""
    from patchscope.data import data_root

    try:
        path = data_root()
    except FileNotFoundError as error:
        pytest.exit(str(error), returncode=2)
    if not (path / "wikitext-2" / "valid.txt").exists():
        pytest.exit(f"test data missing at {path}: set PATCHSCOPE_DATA or DATA=... for make", returncode=2)
    return path


def tiny_configs() -> dict[str, object]:
    common = dict(
        vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.1, bos_token_id=0, eos_token_id=1
    )
    return {
        "llama": LlamaConfig(**DIMS, num_key_value_heads=2, tie_word_embeddings=False, **common),
        "mistral": MistralConfig(**DIMS, num_key_value_heads=2, sliding_window=None, **common),
        "qwen2": Qwen2Config(**DIMS, num_key_value_heads=2, **common),
        "qwen3": Qwen3Config(**DIMS, num_key_value_heads=2, head_dim=16, **common),
        # A sliding window shorter than the templates exercises Gemma's mixed cache layers.
        "gemma3_text": Gemma3TextConfig(
            **DIMS,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=8,
            final_logit_softcapping=30.0,
            **common,
        ),
        "gpt2": GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=4,
            n_head=4,
            n_positions=256,
            initializer_range=0.1,
            bos_token_id=0,
            eos_token_id=1,
        ),
        "gpt_neox": GPTNeoXConfig(**DIMS, **common),
    }


ARCHS = list(tiny_configs())
NO_BOS = {"gpt2", "gpt_neox"}  # GPT-2-style tokenizers add no BOS: both paths must work


def train_tokenizer(add_bos: bool, vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    text = (data_dir() / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()[:3000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    tokenizers = {True: train_tokenizer(True), False: train_tokenizer(False)}
    dirs = {}
    for seed, (arch, config) in enumerate(tiny_configs().items()):
        torch.manual_seed(seed)  # distinct weights, so distinct fingerprints
        model = AutoModelForCausalLM.from_config(config)
        path = root / arch
        model.save_pretrained(path)
        tokenizers[arch not in NO_BOS].save_pretrained(path)
        dirs[arch] = path
    return dirs


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs) -> dict[str, LoadedModel]:
    return {arch: load_directory(f"tiny-{arch}", path) for arch, path in tiny_dirs.items()}


@pytest.fixture(scope="session")
def tiny_runtimes(tiny_models) -> dict[str, TargetRuntime]:
    """A target runtime (default engine options) per tiny model, keyed like `tiny_models`."""
    return {arch: TargetRuntime.build(model) for arch, model in tiny_models.items()}


@pytest.fixture(params=ARCHS)
def tiny(request, tiny_models) -> LoadedModel:
    """One tiny random model per architecture (the test runs once for each)."""
    return tiny_models[request.param]


@pytest.fixture
def tiny_runtime(tiny, tiny_runtimes) -> TargetRuntime:
    """The runtime of the test's `tiny` model, its prefix cache empty."""
    runtime = tiny_runtimes[tiny.id.removeprefix("tiny-")]
    runtime.prefix_cache.clear()
    return runtime


@pytest.fixture(scope="session")
def llama(tiny_models) -> LoadedModel:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def llama_runtime(tiny_runtimes) -> TargetRuntime:
    return tiny_runtimes["llama"]


# The real models are converted once into the shared cache ($PATCHSCOPE_HOME) by `make test`.
@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    from patchscope.engine.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3() -> LoadedModel:
    from patchscope.engine.models import load_model

    return load_model("gemma3-270m")
