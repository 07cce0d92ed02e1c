"""The batch job's inputs: files of captured states, read into rows or refused with a one-line reason.

Two formats. `patchscope`: what `patchscope-client extract --out` writes (and the capture helper's
`Captured` encoded the same way): one tensor `states` [rows, hidden] with each row's layer, position and
token and the model's fingerprint as JSON strings in the safetensors metadata. `vllm`: one file per
request from vLLM's `ExampleHiddenStatesConnector` (batch/vllm.py). Only safetensors is read (never
pickle); every file is checked on its own so one bad dump never stops the job.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open

Format = Literal["auto", "patchscope", "vllm"]
FORMATS: tuple[str, ...] = ("auto", "patchscope", "vllm")
PATCHSCOPE_TENSOR = "states"


class Refused(Exception):
    """One input file cannot be explained; the message is the one-line reason in the job summary."""


@dataclass(frozen=True)
class Refusal:
    """A file the job skipped, and why."""

    file: str
    reason: str


@dataclass(frozen=True)
class InputLimits:
    """Bounds on one input file, so one huge or hostile file cannot exhaust the machine."""

    max_file_bytes: int = 4 << 30
    max_rows: int = 4096


@dataclass(frozen=True)
class FileRows:
    """The rows of one input file, in the project's layer numbering, ready to become requests.

    `positions` holds absolute 0-based positions (BOS counted) or None where the file does not say.
    """

    file: str
    sha256: str
    format: str
    states: torch.Tensor  # [n, d] float32
    layers: tuple[int, ...]
    positions: tuple[int | None, ...]
    tokens: tuple[str, ...]
    request_id: str | None = None
    model: str = ""
    fingerprint: str = ""  # empty: the file does not say which weights produced it

    def __len__(self) -> int:
        return self.states.shape[0]


def expand(inputs: Iterable[str]) -> tuple[list[str], list[Refusal]]:
    """Files named by paths, globs and directories (every `*.safetensors` below), sorted, each once.

    Sorted so that parts are the same files in every run of the job, which is what resuming relies on.
    """
    files: set[str] = set()
    refused: list[Refusal] = []
    for spec in inputs:
        if glob.has_magic(spec):
            matches = [m for m in glob.glob(spec, recursive=True) if Path(m).is_file()]
        elif Path(spec).is_dir():
            matches = [str(p) for p in Path(spec).rglob("*.safetensors") if p.is_file()]
        elif Path(spec).is_file():
            matches = [spec]
        else:
            refused.append(Refusal(spec, "no such file"))
            continue
        if not matches:
            refused.append(Refusal(spec, "matches no file"))
        files.update(str(Path(m).resolve()) for m in matches)
    return sorted(files), refused


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_finite(states: torch.Tensor) -> None:
    bad = (~torch.isfinite(states)).any(dim=-1).nonzero()
    if len(bad):
        raise Refused(f"row {int(bad[0])} holds NaN or Inf ({len(bad)} rows in all)")


def detect(names: Sequence[str]) -> str:
    if PATCHSCOPE_TENSOR in names:
        return "patchscope"
    if {"hidden_states", "token_ids"} <= set(names):
        return "vllm"
    raise Refused(
        f"unknown format: tensors {sorted(names)}; expected '{PATCHSCOPE_TENSOR}' "
        "(patchscope-client extract) or 'hidden_states' + 'token_ids' (vLLM's ExampleHiddenStatesConnector)"
    )


def _json_list(meta: dict[str, str], key: str) -> list:
    try:
        value = json.loads(meta.get(key, "[]"))
    except json.JSONDecodeError as error:
        raise Refused(f"metadata {key!r} is not JSON: {error}") from None
    if not isinstance(value, list):
        raise Refused(f"metadata {key!r} must be a JSON list, got {type(value).__name__}")
    return value


def _per_row(key: str, values: list, n: int, default) -> list:
    if len(values) == n:
        return values
    if len(values) == 1:
        return values * n
    if not values:
        return [default] * n
    raise Refused(f"metadata {key!r} has {len(values)} entries for {n} rows (needs 1 or {n})")


def read_patchscope(path: str, handle, limits: InputLimits) -> dict:
    """Rows of a `patchscope-client extract --out` file: states and per-row provenance from metadata."""
    meta = handle.metadata() or {}
    states = handle.get_tensor(PATCHSCOPE_TENSOR)
    if states.ndim != 2:
        raise Refused(f"tensor '{PATCHSCOPE_TENSOR}' must be [rows, hidden], got shape {list(states.shape)}")
    if not states.is_floating_point():
        raise Refused(f"tensor '{PATCHSCOPE_TENSOR}' must hold floats, got {states.dtype}")
    n = states.shape[0]
    if n == 0:
        raise Refused("holds no rows")
    if n > limits.max_rows:
        raise Refused(f"{n} rows, over the limit of {limits.max_rows} per file (--max-rows-per-file)")
    layers = _json_list(meta, "layers")
    if not layers:
        raise Refused("metadata names no layers (a file from `patchscope-client extract --out` does)")
    layers = _per_row("layers", layers, n, None)
    positions = _per_row("positions", _json_list(meta, "positions"), n, None)
    tokens = _per_row("tokens", _json_list(meta, "tokens"), n, "")
    for key, values, kind in (
        ("layers", layers, int),
        ("positions", positions, int),
        ("tokens", tokens, str),
    ):
        for k, value in enumerate(values):
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise Refused(f"metadata {key!r}[{k}] must be {kind.__name__}, got {value!r}")
    return dict(
        states=states,
        layers=tuple(layers),
        positions=tuple(positions),
        tokens=tuple(tokens),
        request_id=meta.get("request_id") or None,
        model=meta.get("model", ""),
        fingerprint=meta.get("fingerprint", ""),
    )


# (path, open safetensors handle, limits) -> the fields of FileRows other than file, sha256, format
Reader = Callable[[str, object, InputLimits], dict]


def read_file(
    path: str,
    fmt: str,
    limits: InputLimits,
    *,
    vllm: Reader | None = None,
    hidden_size: int | None = None,
) -> FileRows:
    """One file's rows, or `Refused` with the reason: size, format, shape, dtype, NaN/Inf, hidden size.

    `vllm` reads the vLLM format (it needs the source's layer ids and tokenizer, so the job binds it).
    """
    try:
        size = os.stat(path).st_size
    except OSError as error:
        raise Refused(f"cannot read: {error.strerror or error}") from None
    if size > limits.max_file_bytes:
        raise Refused(f"{size} bytes, over the limit of {limits.max_file_bytes} (--max-file-bytes)")
    if size < 8:
        raise Refused(f"not a safetensors file: {size} bytes is shorter than its header length")
    try:
        with safe_open(path, framework="pt") as handle:
            kind = detect(list(handle.keys())) if fmt == "auto" else fmt
            if kind == "patchscope":
                if PATCHSCOPE_TENSOR not in handle.keys():
                    raise Refused(f"no tensor '{PATCHSCOPE_TENSOR}' (is it a vLLM dump? try --format auto)")
                fields = read_patchscope(path, handle, limits)
            elif vllm is None:
                raise Refused("a vLLM dump, but the job was not given --vllm-layers")
            else:
                fields = vllm(path, handle, limits)
    except SafetensorError as error:
        raise Refused(f"not a readable safetensors file (truncated or corrupt?): {error}") from None
    except (OSError, ValueError, RuntimeError) as error:
        raise Refused(f"cannot read the tensors (truncated or corrupt?): {error}") from None
    states = fields.pop("states").to(torch.float32)
    if hidden_size is not None and states.shape[-1] != hidden_size:
        raise Refused(f"hidden size {states.shape[-1]}, but the source's is {hidden_size}")
    check_finite(states)
    return FileRows(file=path, sha256=sha256_file(path), format=kind, states=states.contiguous(), **fields)
