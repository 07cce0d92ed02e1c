"""The service's own settings: the `args:` of the application in a Ray Serve config file.

Deployment placement (replicas, `num_cpus`/`num_gpus`, `max_ongoing_requests`) stays in the Serve config's
`deployments:` list where Ray reads it; everything patchscope decides lives here, validated once when the
application is built so that a typo fails the deploy instead of the first request.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from patchscope.engine.options import EngineOptions, Forward, Gemm
from patchscope.explain.limits import Limits

if TYPE_CHECKING:
    from patchscope.engine.models.placement import BlockPlacement


class Batching(BaseModel):
    """Cross-request batching on TargetModel.

    `continuous` (lean-forward targets): every row of every request shares each decoding step, rows join
    at the next step and leave when they end (engine/scheduler.py). Otherwise, and for targets on
    transformers' forward, rows of one (model, template, options) share a batch that forms while
    `wait_ms` passes; `enabled` false runs each request alone.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    continuous: bool = True
    # How long a new batch waits for more requests with the same key before it starts (batches only).
    wait_ms: float = Field(5.0, ge=0)
    # Rows the target runs at once (one step, or one batch). A request that does not fit beside the rows
    # running is RESOURCE_EXHAUSTED at once; the cap used is at least limits.max_sites + 1 (the sites and
    # the control row), so that every request the limits admit can run.
    max_rows: int = Field(256, ge=1)
    # Batches generating at once; requests arriving while this many run wait and then start together.
    max_active_batches: int = Field(2, ge=1)
    # Tokens of one prefill chunk: a long template is prefilled a chunk at a time between decode steps,
    # and a request whose caller left stops before its next chunk.
    prefill_chunk_tokens: int = Field(128, ge=1)
    # Continuous batching's decode step: `eager` (exact shapes; the CPU default), `bucketed` (padded to
    # the fast path's shapes, run eagerly), `compiled` (torch.compile) or `cuda-graphs` (torch.compile's
    # reduce-overhead: a CUDA graph per bucket, for GPUs; compiles on the first steps of each bucket).
    step: Literal["eager", "bucketed", "compiled", "cuda-graphs"] = "eager"

    def step_options(self) -> dict[str, object]:
        """The scheduler's keywords for `step`."""
        modes = {"bucketed": None, "compiled": "default", "cuda-graphs": "reduce-overhead"}
        if self.step == "eager":
            return {"compiled_step": False}
        return {"compiled_step": True, "compile_mode": modes[self.step]}


class Placement(BaseModel):
    """A target larger than one GPU, split by decoder blocks across the replica's GPUs.

    Give the replica as many GPUs in `ray_actor_options.num_gpus` (Ray makes them cuda:0 .. N-1 inside
    it). A placed model runs transformers' forward and the eager loop (engine/models/placement.py says
    why), so its rows batch per template, not continuously.
    """

    model_config = ConfigDict(extra="forbid")

    # Spread the blocks evenly over cuda:0 .. num_gpus-1 ...
    num_gpus: int | None = Field(None, ge=1)
    # ... or over these devices, in block order ("cuda:0", "cuda:1"; "cpu" runs the same code on a CPU).
    devices: list[str] | None = Field(None, min_length=1)
    # Blocks per device, in the same order (their sum must be the model's layer count); default even.
    blocks: list[int] | None = None

    @model_validator(mode="after")
    def _one_way(self) -> Placement:
        if (self.num_gpus is None) == (self.devices is None):
            raise ValueError("placement: set exactly one of num_gpus or devices")
        if self.blocks is not None and len(self.blocks) != len(self.device_names()):
            raise ValueError(
                f"placement.blocks has {len(self.blocks)} counts for {len(self.device_names())} devices"
            )
        return self

    def device_names(self) -> list[str]:
        """The devices the blocks are spread over, in block order."""
        return list(self.devices) if self.devices is not None else [f"cuda:{k}" for k in range(self.num_gpus)]

    def block_placement(self, num_blocks: int) -> BlockPlacement:
        """The device of each of a model's `num_blocks` blocks (checked against this process's devices)."""
        from patchscope.engine.models.placement import spread  # torch and transformers: only when placing

        return spread(num_blocks, self.device_names(), self.blocks)


class Quotas(BaseModel):
    """Per API key, counted in one named actor for all ingress replicas; 0 turns a quota off."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int = Field(0, ge=0)
    concurrent_streams: int = Field(0, ge=0)


class Auth(BaseModel):
    """Bearer tokens checked by the ingress (Serve's gRPC proxy has no interceptors)."""

    model_config = ConfigDict(extra="forbid")

    # A file with one token per line, or the name of an environment variable holding one per line.
    tokens_file: str | None = None
    tokens_env: str | None = None
    # Off only when a config says so explicitly; the service prints a warning then.
    required: bool = True

    @model_validator(mode="after")
    def _has_tokens_when_required(self) -> Auth:
        if self.required and not (self.tokens_file or self.tokens_env):
            raise ValueError("auth.required is true but neither auth.tokens_file nor auth.tokens_env is set")
        return self

    def tokens(self) -> list[str]:
        lines: list[str] = []
        if self.tokens_file:
            lines += Path(self.tokens_file).expanduser().read_text().splitlines()
        if self.tokens_env:
            lines += os.environ.get(self.tokens_env, "").splitlines()
        return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


class ServiceConfig(BaseModel):
    """What the service hosts and how it treats requests."""

    model_config = ConfigDict(extra="forbid")

    sources: list[str] = Field(min_length=1)
    targets: list[str] = Field(min_length=1)
    # Extra model ids registered by local path (a transformers directory or a .gguf file), from the config
    # only: a request never names a path.
    models: dict[str, str] = {}
    # Mapping registry directory; default $PATCHSCOPE_HOME/mappings.
    registry: str | None = None
    # Compute dtype of the hosted models ("float32", "bfloat16"); "auto" is bfloat16 on a GPU.
    dtype: str = "float32"
    device: str = "auto"
    # The engine's performance knobs (engine/options.py, where the defaults and their reasons live, shared
    # with the CLI and the benches): the linear layers' kernel, and the forward of patched generation.
    # The decode loop is not a setting here: the service streams and cancels, which only the eager loop does.
    gemm: Gemm = EngineOptions.gemm
    forward: Forward = EngineOptions.forward
    # Torch threads per model process: one where source and target share a small machine (None: torch's
    # default, for GPUs).
    torch_threads: int | None = Field(1, ge=1)
    # Split the TargetModel replica's models by blocks across its devices (None: each on `device`; sources
    # always load on `device`).
    placement: Placement | None = None
    limits: Limits = Limits()
    batching: Batching = Batching()
    auth: Auth = Field(default_factory=Auth)
    quotas: Quotas = Quotas()

    def max_rows(self) -> int:
        """The target's row cap: the configured one, raised to what one admitted request may need."""
        return max(self.batching.max_rows, self.limits.max_sites + 1)

    def engine_options(self) -> EngineOptions:
        """The options the hosted models are loaded and run with."""
        return EngineOptions(gemm=self.gemm, forward=self.forward)

    @model_validator(mode="after")
    def _placement_fits(self) -> ServiceConfig:
        if self.placement is None:
            return self
        if self.device != "auto":
            raise ValueError("placement names the devices: leave device at auto when placement is set")
        if self.forward == "lean":
            raise ValueError("a placed model runs transformers' forward: set forward to auto or transformers")
        if self.gemm != "aten":
            raise ValueError("oneDNN-packed linears stay on the CPU: set gemm to aten when placement is set")
        return self

    @model_validator(mode="after")
    def _known_dtype(self) -> ServiceConfig:
        if self.dtype not in {"float32", "bfloat16", "float16", "auto"}:
            raise ValueError(f"dtype must be float32, bfloat16, float16 or auto, got {self.dtype!r}")
        return self
