"""Calibrators: fitted honestly, stored as safetensors, refused for other models, visible when broken."""

from __future__ import annotations

import json

import pytest
import torch

from patchscope.calibration.artefact import (
    CalibratorCorrupt,
    CalibratorInfo,
    load_calibrator,
    write_calibrator,
)
from patchscope.calibration.fit import auroc, fit_logistic, reliability
from patchscope.calibration.registry import CalibrationRegistry, calibrator_id
from patchscope.engine.runtime import TargetRuntime
from patchscope.explain import ExplainRequest, LocalBackend, TargetSpec, explain
from patchscope.explain.local import model_info
from patchscope.explain.signals import Features


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right answers where the patch moved the target: a signal a calibrator must find."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, len(Features.NAMES), generator=g)
    y = (torch.rand(n, generator=g) < x[:, 0]).double()  # P(right) = patch_effect
    return x, y


def test_logistic_fit_ranks_and_calibrates_held_out_data():
    model = fit_logistic(*synthetic(2000, 0))
    x, y = synthetic(2000, 1)
    p = model.probability(x)
    _, ece = reliability(p, y)
    assert auroc(p, y) > 0.75 and ece < 0.05
    assert auroc(torch.rand(2000, dtype=torch.float64), y) == pytest.approx(0.5, abs=0.05)  # a baseline


def info_for(source, target, preset="identity") -> CalibratorInfo:
    return CalibratorInfo(
        id=calibrator_id(source.id, target.id, preset),
        source_model=source.id,
        source_fingerprint=source.fingerprint,
        target_model=target.id,
        target_fingerprint=target.fingerprint,
        preset=preset,
        features=json.dumps(list(Features.NAMES)),
        data="synthetic",
        data_fingerprint="0" * 64,
        seed=0,
        examples_train=10,
        examples_test=10,
        accuracy_test=0.5,
        auroc=0.8,
        ece=0.05,
        reliability="[]",
    )


def test_artefact_round_trips_and_refuses_other_models(tmp_path, tiny_models):
    llama, qwen = tiny_models["llama"], tiny_models["qwen2"]
    registry = CalibrationRegistry(tmp_path)
    model = fit_logistic(*synthetic(200, 0))
    write_calibrator(registry.path(llama.id, llama.id, "identity"), info_for(llama, llama), model)
    loaded = registry.lookup(model_info(llama), model_info(llama), "identity")
    assert loaded is not None and loaded.info == info_for(llama, llama)
    x, _ = synthetic(5, 2)
    features = Features(*x[0].tolist())
    assert loaded.confidence(features) == pytest.approx(float(model.probability(x[:1])[0]))
    # same ids, other weights: a calibrator is never applied to models it was not fitted on
    impostor = model_info(qwen).__class__(id=llama.id, fingerprint=qwen.fingerprint, facts=llama.facts)
    assert registry.lookup(impostor, model_info(llama), "identity") is None
    assert registry.lookup(model_info(llama), model_info(llama), "attribute") is None


def test_a_corrupt_calibrator_is_named_and_hides_no_other(tmp_path, tiny_models):
    llama = tiny_models["llama"]
    registry = CalibrationRegistry(tmp_path)
    write_calibrator(
        registry.path(llama.id, llama.id, "identity"), info_for(llama, llama), fit_logistic(*synthetic(50, 0))
    )
    bad = registry.root / "x.y.identity.calibrator.safetensors"
    bad.write_bytes(b"not a safetensors file")
    listing = registry.scan()
    assert [c.id for c in listing.calibrators] == [calibrator_id(llama.id, llama.id, "identity")]
    assert [name for name, _ in listing.unreadable] == [bad.name]
    with pytest.raises(CalibratorCorrupt):
        load_calibrator(bad)


def test_a_registered_calibrator_gives_every_site_a_confidence(tmp_path, llama, llama_runtime):
    registry = CalibrationRegistry(tmp_path)
    write_calibrator(
        registry.path(llama.id, llama.id, "identity"), info_for(llama, llama), fit_logistic(*synthetic(50, 0))
    )
    request = ExplainRequest(
        source=llama.id, prompt="The lobster is red", layers=(1, 2), target=TargetSpec(model=llama.id)
    )
    results = explain(LocalBackend.of(llama, llama_runtime), request, calibrators=registry.lookup).results
    assert all(0.0 < r.control.confidence < 1.0 for r in results)
    assert all(r.control.calibrator_id == calibrator_id(llama.id, llama.id, "identity") for r in results)


def test_calibrate_refuses_data_without_both_outcomes(tmp_path, llama):
    """Tiny random models never name the word: no calibrator can be fitted, and the error says why."""
    from patchscope.calibration.calibrate import calibrate
    from patchscope.data import data_root
    from patchscope.engine.errors import InvalidArgument
    from patchscope.mapping.registry import MappingRegistry

    with pytest.raises(InvalidArgument, match="both right and wrong"):
        calibrate(
            llama, TargetRuntime.build(llama), "identity", MappingRegistry(tmp_path), data_root(), examples=20
        )
    assert not CalibrationRegistry(tmp_path).scan().calibrators
