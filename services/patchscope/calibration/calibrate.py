"""Fit a calibrator for one (source, target, preset) on the shipped data and register it."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from patchscope.calibration.artefact import CalibratorInfo, write_calibrator
from patchscope.calibration.examples import (
    Labelled,
    attribute_items,
    default_pairs,
    identity_items,
    is_test,
    label,
)
from patchscope.calibration.fit import auroc, fit_logistic, reliability
from patchscope.calibration.registry import CalibrationRegistry, calibrator_id
from patchscope.engine.errors import InvalidArgument
from patchscope.engine.models import LoadedModel
from patchscope.engine.runtime import TargetRuntime
from patchscope.explain import LocalBackend
from patchscope.explain.signals import Features
from patchscope.mapping.registry import MappingRegistry
from patchscope.mapping.resolve import registry_resolver

PRESETS = ("identity", "attribute")


@dataclass(frozen=True)
class Report:
    """What `patchscope calibrate` prints: the artefact's record and where it went."""

    info: CalibratorInfo
    path: Path
    examples: list[Labelled]


def _data_fingerprint(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                digest.update(file.name.encode())
                digest.update(file.read_bytes())
    return digest.hexdigest()


def calibrate(
    source: LoadedModel,
    target: TargetRuntime,
    preset: str,
    mappings: MappingRegistry,
    data: Path,
    *,
    examples: int = 120,
    seed: int = 0,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> Report:
    """Label `examples` items at every layer pair, fit on half the groups, measure on the other half."""
    if preset not in PRESETS:
        raise InvalidArgument(
            "preset", "no labelled data for this preset", limit=", ".join(PRESETS), value=preset
        )
    if preset == "identity":
        sources = [data / "wikitext-2" / "valid.txt"]
        items = identity_items(sources[0], examples, seed)
    else:
        sources = [data / "lre"]
        items = attribute_items(sources[0], examples, seed)
    registered = (
        []
        if source.fingerprint == target.model.fingerprint
        else list(mappings.best(source.id, target.model.id))
    )
    pairs = default_pairs(source, target.model, registered)
    backend = LocalBackend([source], [target])
    labelled = label(
        source, backend, target.model.id, preset, items, pairs, registry_resolver(mappings), progress=progress
    )
    train = [x for x in labelled if not is_test(x.group, seed)]
    test = [x for x in labelled if is_test(x.group, seed)]
    if not train or not test or len({x.correct for x in train}) < 2:
        raise InvalidArgument(
            "examples",
            "too few labelled sites with both right and wrong answers to fit a calibrator",
            limit="more --examples",
            value=len(labelled),
        )

    def tensors(rows: list[Labelled]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor([r.features.vector() for r in rows]), torch.tensor(
            [float(r.correct) for r in rows]
        )

    x_train, y_train = tensors(train)
    x_test, y_test = tensors(test)
    model = fit_logistic(x_train, y_train, seed=seed)
    p_test = model.probability(x_test)
    bins, ece = reliability(p_test, y_test)
    target_model = target.model
    info = CalibratorInfo(
        id=calibrator_id(source.id, target_model.id, preset),
        source_model=source.id,
        source_fingerprint=source.fingerprint,
        target_model=target_model.id,
        target_fingerprint=target_model.fingerprint,
        preset=preset,
        features=json.dumps(list(Features.NAMES)),
        data=f"{'; '.join(p.name for p in sources)}: {len(items)} items × {len(pairs)} layer pairs",
        data_fingerprint=_data_fingerprint(sources),
        seed=seed,
        examples_train=len(train),
        examples_test=len(test),
        accuracy_test=float(y_test.mean()),
        auroc=auroc(p_test, y_test),
        ece=ece,
        reliability=json.dumps(
            [
                [
                    b.low,
                    b.high,
                    b.count,
                    None if math.isnan(b.mean_confidence) else round(b.mean_confidence, 4),
                    None if math.isnan(b.accuracy) else round(b.accuracy, 4),
                ]
                for b in bins
            ]
        ),
    )
    registry = CalibrationRegistry(mappings.root)
    path = registry.path(source.id, target_model.id, preset)
    write_calibrator(path, info, model)
    return Report(info, path, labelled)
