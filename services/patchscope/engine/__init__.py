"""The Patchscope engine: pure torch + transformers, no Ray, no gRPC."""

from patchscope.engine.errors import (
    IncompatibleModels,
    InvalidArgument,
    ModelNotFound,
    ModelUnavailable,
    PatchscopeError,
    UnsupportedArchitecture,
)
from patchscope.engine.generation import (
    GeneratedRow,
    GenerationConfig,
    PatchedRow,
    RowPatch,
    iter_patched_generate,
    patched_generate,
)
from patchscope.engine.hooks import HiddenStates, extract, patching
from patchscope.engine.models import LoadedModel, ModelRegistry, load_directory, load_model
from patchscope.engine.options import EngineOptions
from patchscope.engine.patch import Patch
from patchscope.engine.presets import PRESETS, Preset, get_preset
from patchscope.engine.runtime import TargetRuntime
from patchscope.engine.static_decode import StaticDecoder

__all__ = [
    "PRESETS",
    "EngineOptions",
    "GeneratedRow",
    "GenerationConfig",
    "HiddenStates",
    "IncompatibleModels",
    "InvalidArgument",
    "LoadedModel",
    "ModelNotFound",
    "ModelRegistry",
    "ModelUnavailable",
    "Patch",
    "PatchedRow",
    "PatchscopeError",
    "Preset",
    "RowPatch",
    "StaticDecoder",
    "TargetRuntime",
    "UnsupportedArchitecture",
    "extract",
    "get_preset",
    "iter_patched_generate",
    "load_directory",
    "load_model",
    "patched_generate",
    "patching",
]
