"""The calibrator artefact: a safetensors file of the logistic weights, with what it was fitted on.

Like a mapping, a calibrator belongs to its models: both fingerprints are recorded and a calibrator is
never applied to other models (a mismatch is reported in listings, and the service answers without
`confidence` rather than with a wrong one).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from patchscope.calibration.fit import Logistic
from patchscope.engine.errors import PatchscopeError
from patchscope.explain.signals import Features

FORMAT = "patchscope-calibrator/1"


class CalibratorCorrupt(PatchscopeError):
    """A calibrator file cannot be read or lacks required metadata."""


@dataclass(frozen=True)
class CalibratorInfo:
    """Everything recorded beside the weights (stored as strings in the safetensors metadata)."""

    id: str
    source_model: str
    source_fingerprint: str
    target_model: str
    target_fingerprint: str
    preset: str
    features: str  # JSON list: the order of the weights
    data: str  # what the labelled examples came from
    data_fingerprint: str
    seed: int
    examples_train: int
    examples_test: int
    accuracy_test: float  # share of right answers among the held-out examples (the base rate)
    auroc: float  # held-out
    ece: float  # held-out, 10 equal-width bins
    reliability: str  # JSON rows: [low, high, count, mean confidence, accuracy]


def _to_metadata(info: CalibratorInfo) -> dict[str, str]:
    return {"format": FORMAT, **{k: str(v) for k, v in asdict(info).items()}}


def read_info(path: Path) -> CalibratorInfo:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CalibratorCorrupt(f"{path.name}: not a safetensors file ({error})") from None
    if meta.get("format") != FORMAT:
        raise CalibratorCorrupt(f"{path.name}: not a calibrator (format {meta.get('format')!r})")
    values = {}
    for field in fields(CalibratorInfo):
        if field.name not in meta:
            raise CalibratorCorrupt(f"{path.name}: metadata lacks {field.name!r}")
        raw = meta[field.name]
        try:
            values[field.name] = {"int": int, "float": float}.get(str(field.type), str)(raw)
        except ValueError:
            raise CalibratorCorrupt(f"{path.name}: {field.name}={raw!r} is not a {field.type}") from None
    return CalibratorInfo(**values)


@dataclass(frozen=True)
class LoadedCalibrator:
    """A calibrator ready to score sites (the pipeline's `Calibrator`)."""

    info: CalibratorInfo
    model: Logistic

    @property
    def id(self) -> str:
        return self.info.id

    def confidence(self, features: Features) -> float:
        x = torch.tensor([features.vector()], dtype=torch.float64)  # [1, F]
        return float(self.model.probability(x)[0])

    def fits(self, source_fingerprint: str, target_fingerprint: str) -> bool:
        return (self.info.source_fingerprint, self.info.target_fingerprint) == (
            source_fingerprint,
            target_fingerprint,
        )


def load_calibrator(path: Path) -> LoadedCalibrator:
    info = read_info(path)
    if json.loads(info.features) != list(Features.NAMES):
        raise CalibratorCorrupt(f"{path.name}: fitted on features {info.features}, this server reads others")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k).double() for k in f.keys()}
        model = Logistic(tensors["weight"], tensors["bias"], tensors["mean"], tensors["std"])
    except (SafetensorError, OSError, ValueError, KeyError) as error:
        raise CalibratorCorrupt(f"{path.name}: weights unreadable ({error})") from None
    width = len(Features.NAMES)
    if any(t.shape != (width,) for t in (model.weight, model.mean, model.std)) or model.bias.shape != (1,):
        raise CalibratorCorrupt(f"{path.name}: weights do not have {width} features")
    if not all(bool(torch.isfinite(t).all()) for t in (model.weight, model.bias, model.mean, model.std)):
        raise CalibratorCorrupt(f"{path.name}: weights contain NaN or Inf")
    return LoadedCalibrator(info, model)


def write_calibrator(path: Path, info: CalibratorInfo, model: Logistic) -> None:
    """Atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "weight": model.weight.double().contiguous(),
        "bias": model.bias.double().contiguous(),
        "mean": model.mean.double().contiguous(),
        "std": model.std.double().contiguous(),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=_to_metadata(info))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
