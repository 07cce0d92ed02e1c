"""Conversion into the cache: a GGUF dequantised once into an fp32 safetensors directory, and fingerprints.

Apart from loading: the registry converts on first use and writes the cache record; it never imports the
loader.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from patchscope.engine.models.layout import hook_points


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


def convert_gguf(gguf: Path, out_dir: Path) -> str:
    """Dequantise a GGUF into an fp32 safetensors directory with its tokenizer; returns its fingerprint."""
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
    return embedding_fingerprint(out_dir, hook_points(model.config.model_type).embed + ".weight")
