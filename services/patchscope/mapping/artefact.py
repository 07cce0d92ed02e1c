"""The mapping artefact: one safetensors file whose string metadata says what it is and where it belongs.

A mapping refuses models it was not fitted on: both models' fingerprints (embedding matrices) and sizes are
recorded and checked on load, like tuned-lens's `unembed_hash`.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from patchscope.engine.errors import PatchscopeError
from patchscope.engine.validation import ModelFacts
from patchscope.mapping.fit import apply

FORMAT_VERSION = "1"


class MappingCorrupt(PatchscopeError):
    """A mapping file cannot be read or lacks required metadata."""


class MappingIncompatible(PatchscopeError):
    """A mapping does not belong to the models it is asked to connect (FAILED_PRECONDITION)."""


@dataclass(frozen=True)
class MappingInfo:
    """Everything recorded beside the weights (all values are stored as strings)."""

    id: str
    method: str
    hyperparameters: str  # JSON
    source_model: str
    source_fingerprint: str
    source_tokenizer: str
    source_layer: int
    source_dim: int
    target_model: str
    target_fingerprint: str
    target_tokenizer: str
    target_layer: int
    target_dim: int
    corpus: str
    corpus_fingerprint: str
    corpus_words: int
    pairs_train: int
    pairs_validation: int
    pairs_test: int
    r2: float
    r2_mean_dim: float
    cosine: float
    mse: float
    target_norm_mean: float
    target_norm_p99: float
    mapped_norm_mean: float  # mean norm of mapped held-out states: compare with target_norm_mean
    fit_seconds: float
    created: str
    format_version: str = FORMAT_VERSION
    # Behaviour on the validation split (no fit trains on it; mapping/behaviour_metrics.py); a count of 0
    # means not measured (older files lack them).
    # Not NaN: a NaN field would make two readings of one file compare unequal.
    identity_rate: float = 0.0  # validation words the patched target repeats
    identity_n: int = 0
    attribute_accuracy: float = 0.0  # validation LRE subjects the target knows: object named
    attribute_reference: float = 0.0  # the same samples, same-model target patched at ℓ* itself
    attribute_n: int = 0
    unpatched_share: float = 0.0  # attribute explanations equal to the template's unpatched output

    @property
    def has_behaviour(self) -> bool:
        return self.identity_n > 0 or self.attribute_n > 0

    def behaviour_score(self) -> float:
        """What `auto` ranks maps with behaviour metrics by: identity + attribute − unpatched share."""

        def value(x: float) -> float:
            return 0.0 if math.isnan(x) else x

        return value(self.identity_rate) + value(self.attribute_accuracy) - value(self.unpatched_share)

    def to_metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> MappingInfo:
        kinds = {f.name: f.type for f in fields(cls)}
        optional = {f.name for f in fields(cls) if f.default is not MISSING}
        missing = [k for k in kinds if k not in meta and k not in optional]
        if missing:
            raise MappingCorrupt(f"mapping metadata lacks {', '.join(missing)}")
        if meta.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise MappingCorrupt(
                f"mapping format {meta['format_version']} is not supported (need {FORMAT_VERSION})"
            )
        convert = {"int": int, "float": float, "str": str}
        return cls(**{k: convert[str(t)](meta[k]) for k, t in kinds.items() if k in meta})


def mapping_id(source: str, target: str, source_layer: int, target_layer: int, method: str) -> str:
    return f"{source}.{target}.{source_layer}-{target_layer}.{method}"


def write_mapping(path: Path, info: MappingInfo, tensors: dict[str, torch.Tensor]) -> None:
    """Atomic write: a temp file in the same directory, then rename; readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous().float() for k, v in tensors.items()}, tmp, metadata=info.to_metadata())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_info(path: Path) -> MappingInfo:
    """Metadata only (no weights read): what `patchscope mappings` lists."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise MappingCorrupt(f"{path.name} is not a readable safetensors file: {error}") from None
    return MappingInfo.from_metadata(meta)


class ModelLike(Protocol):
    """What a mapping is checked against: a loaded model, or the service's card of a hosted one."""

    @property
    def id(self) -> str: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def facts(self) -> ModelFacts: ...


@dataclass
class LoadedMapping:
    """A mapping ready to apply: `map(states)` takes [..., d_s] and returns [..., d_t] float32."""

    info: MappingInfo
    tensors: dict[str, torch.Tensor]

    def map(self, states: torch.Tensor) -> torch.Tensor:
        if states.shape[-1] != self.info.source_dim:
            raise MappingIncompatible(
                f"mapping {self.info.id} takes states of size {self.info.source_dim}, got {states.shape[-1]}"
            )
        return apply(self.tensors, states)

    def check(self, source: ModelLike, target: ModelLike) -> None:
        """Refuse models the mapping was not fitted on (fingerprint or size differ)."""
        for role, model, fingerprint, dim in (
            ("source", source, self.info.source_fingerprint, self.info.source_dim),
            ("target", target, self.info.target_fingerprint, self.info.target_dim),
        ):
            if model.fingerprint != fingerprint:
                raise MappingIncompatible(
                    f"mapping {self.info.id} was fitted on a {role} model with fingerprint "
                    f"{fingerprint[:12]}…, but {model.id} has {model.fingerprint[:12]}…; "
                    "refit it with `patchscope fit-mapping`"
                )
            if model.facts.hidden_size != dim:
                raise MappingIncompatible(
                    f"mapping {self.info.id} expects a {role} hidden size of {dim}, {model.id} has "
                    f"{model.facts.hidden_size}"
                )


def load_mapping(path: Path) -> LoadedMapping:
    info = read_info(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise MappingCorrupt(f"{path.name}: weights unreadable: {error}") from None
    if tensors.get("weight") is None or tuple(tensors["weight"].shape) != (info.source_dim, info.target_dim):
        raise MappingCorrupt(f"{path.name}: weight shape does not match its metadata")
    return LoadedMapping(info, tensors)
