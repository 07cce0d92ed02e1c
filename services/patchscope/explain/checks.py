"""Checks of single request fields against the limits: what planning is made of, each one named.

Every check raises one `InvalidArgument` naming the field, the limit and the value; none needs a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from patchscope.engine.errors import InvalidArgument
from patchscope.engine.generation import GenerationConfig
from patchscope.engine.validation import check_prompt
from patchscope.explain.limits import MAX_TEMPERATURE, MIN_TEMPERATURE, Limits


def check_prompt_size(field: str, prompt: str, limits: Limits) -> None:
    """The prompt's characters, checked before it is tokenised."""
    check_prompt(field, prompt)
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidArgument(
            field, "too long", limit=f"<= {limits.max_prompt_chars} characters", value=len(prompt)
        )


def check_token_count(field: str, num_tokens: int, limits: Limits) -> None:
    if num_tokens > limits.max_prompt_tokens:
        raise InvalidArgument(
            field, "too many tokens", limit=f"<= {limits.max_prompt_tokens} tokens", value=num_tokens
        )


def check_count(field: str, values: Sequence, maximum: int, what: str) -> None:
    """A list's length, checked before its entries are looked at (a long list costs the ingress time)."""
    if len(values) > maximum:
        raise InvalidArgument(field, f"too many {what}", limit=f"<= {maximum}", value=len(values))


def check_decoding(generation: GenerationConfig) -> None:
    """Finite and in range, or sampling would make NaN probabilities on the target."""
    temperature = generation.temperature
    if not (
        isinstance(temperature, float | int)
        and math.isfinite(temperature)
        and (temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE)
    ):
        raise InvalidArgument(
            "target.generation.temperature",
            "out of range",
            limit=f"0 (greedy) or {MIN_TEMPERATURE}..{MAX_TEMPERATURE:g}",
            value=temperature,
        )


def check_mapping_id(mapping: str, limits: Limits) -> None:
    """A mapping id names a registry file: bounded, printable, no path separators."""
    size = len(mapping.encode("utf-8", "surrogatepass"))
    if size > limits.max_mapping_id_bytes:
        raise InvalidArgument(
            "target.mapping", "too long", limit=f"<= {limits.max_mapping_id_bytes} bytes", value=size
        )
    if not mapping.isprintable() or any(c in mapping for c in "/\\"):
        raise InvalidArgument(
            "target.mapping",
            "must be printable, without path separators",
            limit="'auto' or a mapping id",
            value=mapping[:64],
        )


# Tokens a template may take beyond one per UTF-8 byte of its text and its filler: the target tokenises
# prefix, filler and suffix apart, each may take a dummy-prefix "▁" (Llama-2-style SentencePiece), and its
# leading specials are at most BOS; the placeholder's 2 bytes are not tokenised: 1 + 3 - 2.
TEMPLATE_TOKEN_SLACK = 2


def template_token_bound(template: str, filler: str, growth: int = 1) -> int:
    """At most this many target tokens for `template` with `filler`, for any supported tokenizer.

    Why it holds without the target's tokenizer: byte-level BPE maps each byte to one symbol and every
    token covers at least one; SentencePiece-style BPE with byte fallback gives a piece it lacks one token
    per byte. A normaliser may first rewrite the text into at most `growth` times its bytes (the target's
    `ModelInfo.normaliser_growth`: 3 for Qwen2's NFC). tests/unit/test_template_token_bound.py checks it on
    random text for each supported family, the real models' tokenizers among them.
    """
    size = len(template.encode("utf-8", "surrogatepass")) + len(filler.encode("utf-8"))
    return growth * size + TEMPLATE_TOKEN_SLACK


def check_token_steps(
    rows: int, template: str, filler: str, new_tokens: int, limits: Limits, growth: int = 1
) -> None:
    """The work of one request within the budget; a template's tokens bounded by `template_token_bound`."""
    steps = rows * (template_token_bound(template, filler, growth) + new_tokens)
    if steps > limits.max_token_steps:
        raise InvalidArgument(
            "target",
            "too much work for one request: rows (sites + control) × (template tokens + max_new_tokens)",
            limit=f"<= {limits.max_token_steps} token-steps",
            value=steps,
        )


def check_sites(count: int, limits: Limits, field: str) -> None:
    if count > limits.max_sites:
        raise InvalidArgument(field, "too many sites", limit=f"<= {limits.max_sites}", value=count)


def per_row(field: str, values: Sequence, n: int, *, default=None, required: bool = False) -> list:
    """One value per row: n values, one value for all, or (when not required) none for the default."""
    if len(values) == n:
        return list(values)
    if len(values) == 1:
        return list(values) * n
    if not values and not required:
        return [default] * n
    raise InvalidArgument(
        field, "must have one entry, or one per row of the states", limit=f"1 or {n}", value=len(values)
    )
