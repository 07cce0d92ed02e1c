"""Choosing the mapping for each layer pair of a cross-model request."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from patchscope.engine.errors import InvalidArgument
from patchscope.mapping.artefact import LoadedMapping, ModelLike
from patchscope.mapping.registry import MappingNotFound, MappingRegistry

AUTO = "auto"


@dataclass
class MappingSet:
    """The engine's `Mapping`: one loaded artefact per (ℓ, ℓ*)."""

    by_pair: dict[tuple[int, int], LoadedMapping]

    def __call__(self, state: torch.Tensor, source_layer: int, target_layer: int) -> torch.Tensor:
        return self.by_pair[(source_layer, target_layer)].map(state)

    def describe(self, source_layer: int, target_layer: int) -> tuple[str, float | None]:
        info = self.by_pair[(source_layer, target_layer)].info
        return info.id, info.r2


def fit_command(source: str, target: str, pairs: Iterable[tuple[int, int]]) -> str:
    spec = ",".join(f"{a}:{b}" for a, b in sorted(set(pairs)))
    return f"patchscope fit-mapping --source {source} --target {target} --pairs {spec} --method affine"


def resolve_mappings(
    registry: MappingRegistry,
    source: ModelLike,
    target: ModelLike,
    pairs: Iterable[tuple[int, int]],
    choice: str = AUTO,
) -> MappingSet:
    """One mapping per layer pair: `auto` or a named one.

    `auto` takes the registered mapping of exactly (ℓ, ℓ*) that ranks best (`registry.rank`: held-out
    behaviour metrics when a map has them, else held-out R²; never compared across target layers); a
    named mapping must fit every pair.
    """
    pairs = sorted(set(pairs))
    by_pair: dict[tuple[int, int], LoadedMapping] = {}
    if choice != AUTO:
        loaded = registry.load(choice)
        for pair in pairs:
            if pair != (loaded.info.source_layer, loaded.info.target_layer):
                raise InvalidArgument(
                    "mapping",
                    f"{choice} maps layer {loaded.info.source_layer} to {loaded.info.target_layer}, "
                    f"but the request needs {pair[0]} -> {pair[1]}",
                    limit="'auto' or a mapping of exactly the requested layer pair",
                )
            by_pair[pair] = loaded
    else:
        best = registry.best(source.id, target.id)
        missing = [pair for pair in pairs if pair not in best]
        by_pair = {pair: registry.load(best[pair].id) for pair in pairs if pair in best}
        if missing:
            raise MappingNotFound(
                f"no mapping registered for {source.id} -> {target.id} at layer pairs "
                f"{', '.join(f'{a}:{b}' for a, b in missing)}; create them with: "
                f"{fit_command(source.id, target.id, missing)}"
            )
    for loaded in {id(m): m for m in by_pair.values()}.values():
        loaded.check(source, target)
    return MappingSet(by_pair)


def registry_resolver(registry: MappingRegistry):
    """The pipeline's `MappingResolver` over `registry` (rescanned on every call: files may be added)."""

    def resolve(
        source: ModelLike, target: ModelLike, pairs: Iterable[tuple[int, int]], choice: str
    ) -> MappingSet:
        return resolve_mappings(registry, source, target, pairs, choice)

    return resolve
