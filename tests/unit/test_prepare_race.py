"""Two replicas preparing one model at once: one converts, the other waits and reuses its cache."""

from __future__ import annotations

import threading
import time

from patchscope.engine.models import convert
from patchscope.engine.models.registry import ModelRegistry


def test_two_concurrent_prepares_convert_once_and_share_the_cache(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    calls: list[int] = []

    def slow_convert(path, out):  # stands in for dequantising: slow enough for the two to overlap
        calls.append(1)
        out.mkdir(parents=True)
        time.sleep(0.5)
        (out / "model.safetensors").write_bytes(b"weights")
        return "fingerprint"

    monkeypatch.setattr(convert, "convert_gguf", slow_convert)
    results, errors = [], []

    def prepare() -> None:
        registry = ModelRegistry(home=tmp_path / "home")  # one registry per replica
        registry.register("m", gguf)
        try:
            results.append(registry.prepare("m"))
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len(calls) == 1, f"converted {len(calls)} times"
    assert len(set(results)) == 1 and (results[0] / "model.safetensors").read_bytes() == b"weights"
