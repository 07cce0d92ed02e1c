"""Model registry, conversion cache, loading and hook-point discovery."""

from patchscope.engine.models.convert import convert_gguf, embedding_fingerprint
from patchscope.engine.models.layout import ARCHITECTURES, HookPoints, Layout, discover
from patchscope.engine.models.loading import DTYPES, LoadedModel, load_directory, load_model
from patchscope.engine.models.registry import BUILTIN, ModelRegistry, ModelSpec, ModelStatus, patchscope_home

__all__ = [
    "ARCHITECTURES",
    "BUILTIN",
    "DTYPES",
    "HookPoints",
    "Layout",
    "LoadedModel",
    "ModelRegistry",
    "ModelSpec",
    "ModelStatus",
    "convert_gguf",
    "discover",
    "embedding_fingerprint",
    "load_directory",
    "load_model",
    "patchscope_home",
]
