"""Calibrators in the mapping registry's `calibrations/` folder, found by (source, target, preset)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from patchscope.calibration.artefact import (
    CalibratorCorrupt,
    CalibratorInfo,
    LoadedCalibrator,
    load_calibrator,
    read_info,
)
from patchscope.explain.plan import ModelInfo

SUFFIX = ".safetensors"


def calibrator_id(source: str, target: str, preset: str) -> str:
    return f"{source}.{target}.{preset}.calibrator"


@dataclass(frozen=True)
class Listing:
    """Readable calibrators, and files that could not be used with the reason (never hidden)."""

    calibrators: list[CalibratorInfo]
    unreadable: list[tuple[str, str]]


class CalibrationRegistry:
    """One folder; rescanned on lookup when its files change (a prepare job may add calibrators)."""

    def __init__(self, mappings_root: Path) -> None:
        self.root = Path(mappings_root) / "calibrations"
        self._cache: dict[Path, tuple[float, LoadedCalibrator | None]] = {}
        self._lock = threading.Lock()

    def path(self, source: str, target: str, preset: str) -> Path:
        return self.root / f"{calibrator_id(source, target, preset)}{SUFFIX}"

    def scan(self) -> Listing:
        infos, bad = [], []
        for file in sorted(self.root.glob(f"*{SUFFIX}")) if self.root.is_dir() else []:
            try:
                infos.append(read_info(file))
            except CalibratorCorrupt as error:
                bad.append((file.name, str(error)))
        return Listing(infos, bad)

    def _load(self, path: Path) -> LoadedCalibrator | None:
        """The calibrator at `path`, None if absent or unusable (a corrupt file never hides the others)."""
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        with self._lock:
            hit = self._cache.get(path)
            if hit is not None and hit[0] == mtime:
                return hit[1]
        try:
            loaded: LoadedCalibrator | None = load_calibrator(path)
        except CalibratorCorrupt:
            loaded = None
        with self._lock:
            self._cache[path] = (mtime, loaded)
        return loaded

    def lookup(self, source: ModelInfo, target: ModelInfo, preset: str) -> LoadedCalibrator | None:
        """The pipeline's `CalibratorLookup`: only a calibrator fitted on exactly these two models."""
        loaded = self._load(self.path(source.id, target.id, preset))
        if loaded is None or not loaded.fits(source.fingerprint, target.fingerprint):
            return None
        return loaded
