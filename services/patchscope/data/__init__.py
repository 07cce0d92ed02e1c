"""The data the two README commands need, shipped with the package (small, licensed slices).

`PATCHSCOPE_DATA` (set by `make ... DATA=DIR`) points elsewhere for other data; the folder it names has
the same layout (`wikitext-2/`, `lre/`). A missing path is an error that names it, never a fallback.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGED = Path(__file__).resolve().parent


def data_root() -> Path:
    """The data folder: `$PATCHSCOPE_DATA` if set, else the slices shipped in this package."""
    configured = os.environ.get("PATCHSCOPE_DATA")
    root = Path(configured) if configured else PACKAGED
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist (PATCHSCOPE_DATA or DATA=...)")
    return root
