"""What a batch job is asked to do: one validated record, shared by the CLI, the in-process run and Ray.

The fields that change a row's result form the job's `spec`, saved beside its parts: a rerun with the
same `--out` resumes only if its spec is the same, so one table never mixes two jobs.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from patchscope.batch.inputs import Format, InputLimits
from patchscope.engine.errors import InvalidArgument
from patchscope.engine.presets import DEFAULT_PRESET, DEFAULT_TOP_K
from patchscope.explain.request import AUTO


class BatchOptions(BaseModel):
    """A batch job: where states come from, how the target verbalises them, how the work is cut."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="source model id (or a local model directory): the states' model")
    target: str = Field(description="target model id; the source again for same-model explanations")
    format: Format = Field("auto", description="input format; auto tells them apart by tensor names")
    vllm_layers: tuple[int, ...] = Field(
        (), description="vLLM's eagle_aux_hidden_state_layer_ids, in the dumps' layer-axis order"
    )
    positions: tuple[int, ...] | None = Field(
        (-1,),
        description="positions of a vLLM dump to explain (BOS counted, negative from the end); None: all",
    )
    preset: str = DEFAULT_PRESET
    template: str | None = Field(None, description="the target prompt; {} marks the placeholder")
    target_layers: dict[int, int] | int | None = Field(
        None, description="one target layer for all, or source layer -> target layer; None: by depth"
    )
    mapping: str = Field(AUTO, description="'auto' (best held-out R² per layer pair) or a mapping id")
    max_new_tokens: int = Field(10, ge=1)
    top_k: int = Field(DEFAULT_TOP_K, ge=1)
    dtype: str = Field("float32", pattern="^(float32|bfloat16|float16)$")
    allow_other_weights: bool = Field(
        False, description="explain files whose fingerprint is not the source's (flagged in the table)"
    )
    files_per_part: int = Field(64, ge=1, description="input files per part: the most a crash can lose")
    batch_rows: int = Field(256, ge=1, le=4096, description="rows of one patched generation")
    max_file_bytes: int = Field(InputLimits.max_file_bytes, ge=8)
    max_rows_per_file: int = Field(InputLimits.max_rows, ge=1)
    # Where, not what: not part of the spec.
    registry: str | None = Field(None, description="mapping registry directory")
    device: str = "cpu"

    @field_validator("vllm_layers")
    @classmethod
    def _distinct(cls, ids: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(ids)) != len(ids):
            raise ValueError(f"--vllm-layers names a layer twice: {list(ids)}")
        if any(i < 1 for i in ids):
            raise ValueError(
                f"--vllm-layers {list(ids)}: vLLM's id 0 is the embeddings, no block output "
                "(id k is block k-1's output, k >= 1)"
            )
        return ids

    @model_validator(mode="after")
    def _vllm_needs_layers(self) -> BatchOptions:
        if self.format == "vllm" and not self.vllm_layers:
            raise ValueError("--format vllm needs --vllm-layers (the dumps do not record their layer ids)")
        return self

    @property
    def limits(self) -> InputLimits:
        return InputLimits(max_file_bytes=self.max_file_bytes, max_rows=self.max_rows_per_file)

    def spec(self) -> dict:
        """The options that decide a row's content or a part's files (compared when resuming)."""
        return self.model_dump(mode="json", exclude={"registry", "device"})

    def target_layer(self, source_layer: int) -> int | None:
        """The target layer asked for `source_layer`; None lets planning choose (same layer, or by depth)."""
        if self.target_layers is None or isinstance(self.target_layers, int):
            return self.target_layers
        if source_layer not in self.target_layers:
            raise InvalidArgument(
                "--target-layers",
                f"names no target layer for source layer {source_layer}",
                limit=f"one of the source layers {sorted(self.target_layers)}",
                value=source_layer,
            )
        return self.target_layers[source_layer]


def parse_target_layers(spec: str | None) -> dict[int, int] | int | None:
    """`--target-layers`: empty (by depth), one layer (`4`) or pairs (`2:1,6:4`)."""
    if not spec or spec == "same":
        return None
    if ":" not in spec:
        return int(spec)
    pairs = {}
    for part in spec.split(","):
        source, _, target = part.partition(":")
        pairs[int(source)] = int(target)
    return pairs
