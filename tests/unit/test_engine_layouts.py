"""The client's copy of the architecture table is the engine's table (`make layouts` writes it)."""

import json
from pathlib import Path

from patchscope.engine.models.layout import ARCHITECTURES, client_copy
from patchscope_client.capture import decoder_blocks, layouts

COPY = Path(__file__).resolve().parents[2] / "clients" / "python" / "patchscope_client" / "layouts.json"


def test_the_clients_copy_equals_the_engines_table():
    assert json.loads(COPY.read_text()) == client_copy(), "the copy is stale: run `make layouts`"
    assert layouts() == client_copy()  # the installed client reads the same file
    assert set(client_copy()) == set(ARCHITECTURES)


def test_the_capture_helper_finds_every_tiny_architectures_blocks(tiny_models):
    for model in tiny_models.values():
        assert decoder_blocks(model.model) is model.layout.blocks
