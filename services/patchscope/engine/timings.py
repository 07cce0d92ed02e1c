"""Where one Explain's time went, in seconds: one record for the engine, the pipeline and the service."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Timings:
    """Seconds per phase; each entry point fills the phases it runs (zero where it ran none)."""

    source_s: float = 0.0  # the source pass (zero for activations captured elsewhere)
    queue_s: float = 0.0  # waiting for a target batch (service only)
    prefill_s: float = 0.0  # the target's patched prompt pass
    decode_s: float = 0.0  # the target's decoding steps
