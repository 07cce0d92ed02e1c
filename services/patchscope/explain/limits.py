"""Request limits: every one is checked by the planning step, before any model runs."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from patchscope.engine.generation import MAX_NEW_TOKENS

# Sampling divides the logits by the temperature: below this it overflows to Inf (NaN probabilities), and
# its distribution is greedy decoding in all but name; 0 asks for greedy decoding itself.
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 100.0


class Limits(BaseModel):
    """Over a limit is INVALID_ARGUMENT naming the field and the limit (RESOURCE_EXHAUSTED for queues)."""

    model_config = ConfigDict(extra="forbid")

    max_prompt_chars: int = Field(8192, ge=1)
    max_prompt_tokens: int = Field(2048, ge=1)
    # Templates are prompts too: a long one is a long prefill on the target's only worker thread.
    max_template_chars: int = Field(4096, ge=1)
    # UTF-8 bytes of a template: a bound on its target tokens without the target's tokenizer. Every token
    # of a byte-level BPE or a byte-fallback SentencePiece vocabulary covers at least one byte, so tokens
    # <= g × (bytes + the filler's bytes) + 2 (BOS and up to three dummy-prefix "▁" less the placeholder's
    # two bytes), g the growth of the target's normaliser (3 for Qwen2's NFC): checks.template_token_bound,
    # shown on random text for every supported family in tests/unit/test_template_token_bound.py.
    max_template_bytes: int = Field(4096, ge=1)
    max_sites: int = Field(512, ge=1)
    # Layers of one ExtractHiddenStates call, or of one Explain, checked before they are resolved; an
    # extraction must name each layer once (each is a [positions, hidden] tensor on the wire).
    max_layers: int = Field(256, ge=1)
    # float32 bytes of one ExtractHiddenStates answer (layers × positions × hidden × 4).
    max_extract_bytes: int = Field(256 << 20, ge=1)
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS)
    max_top_k: int = Field(100, ge=1)
    max_activation_bytes: int = Field(16 << 20, ge=1)
    # Characters of one provenance token: each is echoed in every event of its site.
    max_token_chars: int = Field(256, ge=1)
    # UTF-8 bytes of all provenance tokens of one ExplainActivations together (their count is bounded by
    # the sites).
    max_provenance_bytes: int = Field(64 << 10, ge=1)
    # A mapping id names a file `<id>.safetensors` in the registry: 243 bytes keeps that name within the
    # 255 bytes file systems allow.
    max_mapping_id_bytes: int = Field(200, ge=1, le=243)
    # Serve's queue at each deployment (`max_queued_requests`): a call beyond it is RESOURCE_EXHAUSTED at
    # once with retry advice instead of waiting without bound.
    max_queued_requests: int = Field(512, ge=1)
    # Rows waiting for the target model; more is RESOURCE_EXHAUSTED with retry advice.
    max_queued_rows: int = Field(4096, ge=1)
    # Token-steps of one request on the target: rows (sites + the control) × (template tokens + new
    # tokens), the template's tokens bounded by `checks.template_token_bound`. No single request may hold
    # the target's worker longer than this bound allows.
    max_token_steps: int = Field(1 << 20, ge=1)
