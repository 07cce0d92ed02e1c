"""A calibrator fitted on smollm2's own identity explanations ranks held-out sites better than chance."""

import pytest

from patchscope.calibration.artefact import load_calibrator
from patchscope.calibration.calibrate import calibrate
from patchscope.data import data_root
from patchscope.engine.runtime import TargetRuntime
from patchscope.mapping.registry import MappingRegistry

pytestmark = pytest.mark.realmodel


def test_identity_calibrator_on_smollm2_beats_chance_on_held_out_words(smollm2, tmp_path):
    report = calibrate(
        smollm2, TargetRuntime.build(smollm2), "identity", MappingRegistry(tmp_path), data_root(), examples=40
    )
    info = load_calibrator(report.path).info
    assert 0.0 < info.accuracy_test < 1.0  # both outcomes among held-out sites
    assert info.auroc > 0.6, info
