"""Request limits: every one is checked by the planning step, before any model runs."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from patchscope.engine.generation import MAX_NEW_TOKENS


class Limits(BaseModel):
    """Over a limit is INVALID_ARGUMENT naming the field and the limit (RESOURCE_EXHAUSTED for queues)."""

    model_config = ConfigDict(extra="forbid")

    max_prompt_chars: int = Field(8192, ge=1)
    max_prompt_tokens: int = Field(2048, ge=1)
    # Templates are prompts too: a long one is a long prefill on the target's only worker thread.
    max_template_chars: int = Field(4096, ge=1)
    max_sites: int = Field(512, ge=1)
    # Layers of one ExtractHiddenStates call (duplicates count): each is a [positions, hidden] tensor.
    max_layers: int = Field(256, ge=1)
    # float32 bytes of one ExtractHiddenStates answer (layers × positions × hidden × 4).
    max_extract_bytes: int = Field(256 << 20, ge=1)
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS)
    max_top_k: int = Field(100, ge=1)
    max_activation_bytes: int = Field(16 << 20, ge=1)
    # Characters of one provenance token: each is echoed in every event of its site.
    max_token_chars: int = Field(256, ge=1)
    # Rows waiting for the target model; more is RESOURCE_EXHAUSTED with retry advice.
    max_queued_rows: int = Field(4096, ge=1)
