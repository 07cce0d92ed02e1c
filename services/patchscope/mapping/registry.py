"""A directory of mapping artefacts, listed from their metadata and chosen by held-out behaviour, then R²."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from patchscope.engine.errors import PatchscopeError
from patchscope.engine.models import patchscope_home
from patchscope.mapping.artefact import (
    LoadedMapping,
    MappingCorrupt,
    MappingInfo,
    load_mapping,
    read_info,
    write_mapping,
)

SUFFIX = ".safetensors"


class MappingNotFound(PatchscopeError, LookupError):
    """No registered mapping by that id, or none for the requested layer pair (NOT_FOUND)."""


def default_registry_dir() -> Path:
    return patchscope_home() / "mappings"


@dataclass(frozen=True)
class Listing:
    """The readable mappings and, separately, the files that could not be read (never silently hidden)."""

    mappings: list[MappingInfo]
    unreadable: list[tuple[str, str]]


class MappingRegistry:
    """Mappings in one directory; ids are file names without `.safetensors`."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_registry_dir()
        self._cache: dict[str, tuple[float, LoadedMapping]] = {}
        self._lock = threading.Lock()

    def path(self, mapping_id: str) -> Path:
        if not mapping_id or "/" in mapping_id or "\\" in mapping_id or mapping_id.startswith("."):
            raise MappingNotFound(f"{mapping_id!r} is not a mapping id")
        return self.root / f"{mapping_id}{SUFFIX}"

    def scan(self) -> Listing:
        """Read every artefact's metadata (a rescan: files added by another process appear)."""
        infos, bad = [], []
        for file in sorted(self.root.glob(f"*{SUFFIX}")) if self.root.is_dir() else []:
            try:
                infos.append(read_info(file))
            except MappingCorrupt as error:
                bad.append((file.name, str(error)))
        return Listing(infos, bad)

    def save(self, info: MappingInfo, tensors: dict[str, torch.Tensor]) -> Path:
        path = self.path(info.id)
        write_mapping(path, info, tensors)
        return path

    def load(self, mapping_id: str) -> LoadedMapping:
        path = self.path(mapping_id)
        if not path.exists():
            known = [i.id for i in self.scan().mappings]
            raise MappingNotFound(
                f"mapping {mapping_id!r} is not registered in {self.root}; "
                f"known: {', '.join(known) or 'none'}"
            )
        mtime = path.stat().st_mtime
        with self._lock:
            hit = self._cache.get(mapping_id)
            if hit and hit[0] == mtime:
                return hit[1]
        loaded = load_mapping(path)
        with self._lock:
            self._cache[mapping_id] = (mtime, loaded)
        return loaded

    def best(self, source: str, target: str) -> dict[tuple[int, int], MappingInfo]:
        """For each (ℓ, ℓ*) of this model pair, its best mapping by `rank` (one scan)."""
        best: dict[tuple[int, int], MappingInfo] = {}
        for info in self.scan().mappings:
            pair = (info.source_layer, info.target_layer)
            if (info.source_model, info.target_model) == (source, target) and (
                pair not in best or rank(info) > rank(best[pair])
            ):
                best[pair] = info
        return best


def rank(info: MappingInfo) -> tuple[bool, float, float]:
    """Behaviour first, then R²: the key `best` maximises.

    A map with behaviour metrics (validation split) beats one without, and among those the better
    `behaviour_score` wins; R² only decides between maps with no behaviour measured (or ties).

    R² rewards reproducing the target's high-variance directions, which is not what makes the target read
    the mapped state the way it reads its own.
    """
    behaviour = info.behaviour_score() if info.has_behaviour else 0.0
    return (info.has_behaviour, behaviour, info.r2)
