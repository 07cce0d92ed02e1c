"""Loading a converted model into a `LoadedModel`: weights, tokenizer, hook sites and fingerprint."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from patchscope.engine.models.layout import Layout, discover, site_paths
from patchscope.engine.models.lean import Forward, LeanDecoder, resolve_forward
from patchscope.engine.models.packed import Gemm, pack_linears, resolve_gemm
from patchscope.engine.models.registry import CACHE_META, ModelRegistry
from patchscope.engine.prefix_cache import PrefixCache
from patchscope.engine.validation import ModelFacts

if TYPE_CHECKING:
    from patchscope.engine.static_decode import StaticDecoder

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
    prefix_cache: PrefixCache = field(default_factory=PrefixCache)
    # Patched generation runs this forward instead of transformers' when set (lean.py; `forward=` at load).
    lean: LeanDecoder | None = field(default=None, repr=False)
    # Set by `enable_static_decode`: greedy, non-streaming generation then decodes through compiled steps.
    static_decoder: StaticDecoder | None = field(default=None, repr=False)

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


def embedding_fingerprint(directory: Path, embed_key: str) -> str:
    """sha256 of the embedding matrix as float32, read from the safetensors files on disk.

    Reading from disk (not from the loaded module) keeps the fingerprint independent of the runtime
    dtype and device, so a mapping fitted in fp32 on a CPU matches the same model served in bf16 on a GPU.
    """
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            if embed_key in f.keys():
                tensor = f.get_tensor(embed_key).to(torch.float32).contiguous()
                return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()
    raise FileNotFoundError(f"no tensor {embed_key} in the safetensors files of {directory}")


def convert_gguf(gguf: Path, out_dir: Path, meta: dict[str, str | None]) -> None:
    """Dequantise a GGUF into an fp32 safetensors directory with its tokenizer and fingerprint."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # The GGUF quantizer config would make transformers try to re-quantise on every later load.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    paths = site_paths(model.config.model_type)
    record = dict(meta, fingerprint=embedding_fingerprint(out_dir, paths.embed + ".weight"))
    (out_dir / CACHE_META).write_text(json.dumps(record, indent=2))


def load_directory(
    model_id: str,
    directory: Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    gemm: Gemm = "auto",
    forward: Forward = "auto",
) -> LoadedModel:
    """Load a transformers directory (never with remote code) and resolve its hook sites.

    `gemm` picks the kernel of the linear layers: `auto` packs them for oneDNN on an fp32 CPU (packed.py).
    `forward` picks the forward of patched generation: `auto` writes it out for the supported decoder
    families on a CPU (lean.py).
    """
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
    model.to(device).eval()
    if resolve_gemm(gemm, torch.device(device), dtype) == "onednn":
        pack_linears(model)  # before `discover`, so the layout holds the packed head
    layout = discover(model)
    meta_file = directory / CACHE_META
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    fingerprint = meta.get("fingerprint") or embedding_fingerprint(directory, layout.paths.embed + ".weight")
    lean = LeanDecoder(model) if resolve_forward(forward, model) == "lean" else None
    return LoadedModel(
        id=model_id, model=model, tokenizer=tokenizer, layout=layout, fingerprint=fingerprint, lean=lean
    )


def load_model(
    model_id: str,
    *,
    registry: ModelRegistry | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    progress=lambda _: None,
    gemm: Gemm = "auto",
    forward: Forward = "auto",
) -> LoadedModel:
    """Load a registered model by id, converting it into the cache first if this is its first use."""
    registry = registry or ModelRegistry()
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    directory = registry.prepare(model_id, progress=progress)
    return load_directory(model_id, directory, dtype=dtype, device=device, gemm=gemm, forward=forward)
