"""Loading a converted model into a `LoadedModel`: weights, tokenizer, hook points and fingerprint.

`LoadedModel` is a plain record of what was loaded. What a target keeps between calls (prefix cache, lean
forward, static decoder) lives a level up, in `engine/runtime.py`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from patchscope.engine.models.convert import embedding_fingerprint
from patchscope.engine.models.layout import Layout, discover
from patchscope.engine.models.packed import pack_linears, resolve_gemm
from patchscope.engine.models.registry import CACHE_META, ModelRegistry
from patchscope.engine.options import DEFAULTS, EngineOptions
from patchscope.engine.validation import ModelFacts

os.environ.setdefault("HF_HUB_OFFLINE", "1")
hf_logging.disable_progress_bar()  # patchscope reports its own progress; per-tensor bars drown it

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class LoadedModel:
    """A model ready for extraction and patched generation."""

    id: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layout: Layout
    fingerprint: str

    @property
    def facts(self) -> ModelFacts:
        cfg = self.model.config
        return ModelFacts(
            model_id=self.id,
            num_layers=self.layout.num_layers,
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            max_positions=getattr(cfg, "max_position_embeddings", None),
        )

    @functools.cached_property
    def tokenizer_fingerprint(self) -> str:
        """sha256 of the vocabulary and special tokens: two models pair positions directly only if equal."""
        vocab = sorted(self.tokenizer.get_vocab().items())
        record = json.dumps([vocab, sorted(self.tokenizer.all_special_tokens)], ensure_ascii=False)
        return hashlib.sha256(record.encode()).hexdigest()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def load_directory(
    model_id: str,
    directory: Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    options: EngineOptions = DEFAULTS,
) -> LoadedModel:
    """Load a transformers directory (never with remote code) and resolve its hook points.

    Of `options` only `gemm` matters here: packing the linear layers changes the model's modules, so it
    happens at load; the forward and the decode loop are the runtime's (`TargetRuntime.build`).
    """
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
    model.to(device).eval()
    if resolve_gemm(options.gemm, torch.device(device), dtype) == "onednn":
        pack_linears(model)  # before `discover`, so the layout holds the packed head
    layout = discover(model)
    meta_file = directory / CACHE_META
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    fingerprint = meta.get("fingerprint") or embedding_fingerprint(directory, layout.paths.embed + ".weight")
    return LoadedModel(id=model_id, model=model, tokenizer=tokenizer, layout=layout, fingerprint=fingerprint)


def load_model(
    model_id: str,
    *,
    registry: ModelRegistry | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    progress=lambda _: None,
    options: EngineOptions = DEFAULTS,
) -> LoadedModel:
    """Load a registered model by id, converting it into the cache first if this is its first use."""
    registry = registry or ModelRegistry()
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    directory = registry.prepare(model_id, progress=progress)
    return load_directory(model_id, directory, dtype=dtype, device=device, options=options)
