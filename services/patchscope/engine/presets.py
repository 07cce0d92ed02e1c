r"""Target prompts from the paper, each a named preset with its filler, its answer rule and default stop.

A preset's default stop ends a row as soon as the rest of its text can no longer change its `answer`, so
the decoding steps after it are saved. A preset names one only where that holds for every text the
target can produce (proved by test_presets_and_explain.py's property tests):

- `description` and `attribute` answer with the first line, stripped: cutting the text at its first
  "\n" keeps exactly that line, so "\n" is their default stop.
- `identity` has none. Its answer falls back to the first word of the whole text when the first line
  has no `->`, so a text whose first line is blank ("\n-> late arrow") answers with a word the "\n"
  stop would cut away; any other stop can occur before the first word and cut it away too.
- `logit-lens` generates nothing.

The stop is applied to greedy decoding only: sampled rows of one batch draw from one generator, so a row
that ends early changes the draws, and the answers, of the rows beside it. A request's own stop
sequences replace the default (they never add to it). Signals computed over the explanation's tokens
(`explanation_logprob`, `dependence`, a calibrator's confidence) do see the shorter text: calibrators
must be fitted with the same default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from patchscope.engine.errors import InvalidArgument
from patchscope.engine.validation import check_template

if TYPE_CHECKING:
    from patchscope.engine.generation import GenerationConfig

DEFAULT_PRESET = "identity"
DEFAULT_TOP_K = 5  # (token, probability) pairs the logit-lens preset reports


def first_word(text: str) -> str:
    words = text.split()
    return words[0] if words else ""


def identity_answer(explanation: str) -> str:
    """The first word after `->` on the first line, else the first word (few-shot `x -> x` format)."""
    first_line = explanation.split("\n", 1)[0]
    if "->" in first_line:
        return first_word(first_line.split("->", 1)[1])
    return first_word(explanation)


def first_line_answer(explanation: str) -> str:
    """The first line, stripped: descriptions and attributes are phrases, not single words."""
    return explanation.split("\n", 1)[0].strip()


@dataclass(frozen=True)
class Preset:
    """A named target prompt; `generates` is False for the logit lens, which reads the state directly.

    `default_stop`: stop sequences after which `answer` cannot change (the module docstring says which
    presets have them and why); empty where no stop is safe.
    """

    name: str
    template: str
    filler: str
    answer: Callable[[str], str]
    generates: bool = True
    summary: str = ""
    default_stop: tuple[str, ...] = ()


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="identity",
            template="cat -> cat\n1135 -> 1135\nhello -> hello\n{}",
            filler="?",
            answer=identity_answer,
            summary="few-shot token identity: the target repeats the token the state encodes",
        ),
        Preset(
            name="description",
            template=(
                "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: South Korean "
                "multinational major appliance and consumer electronics corporation,{}"
            ),
            filler=" x",
            answer=first_line_answer,
            summary="entity description: the target describes the entity the state encodes",
            default_stop=("\n",),
        ),
        Preset(
            name="attribute",
            template="The capital of{} is",
            filler=" x",
            answer=first_line_answer,
            summary="attribute extraction: pass a relation template with --template (LRE templates fit)",
            default_stop=("\n",),
        ),
        Preset(
            name="logit-lens",
            template="{}",
            filler="?",
            answer=lambda text: text.strip(),
            generates=False,
            summary="final norm + unembedding of the state itself: the baseline",
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidArgument("preset", "unknown preset", limit=", ".join(PRESETS), value=name) from None


def resolve_template(preset: Preset, template: str | None) -> str:
    """The preset's template unless the caller overrides it; an override is validated here, once."""
    if template is None:
        return preset.template
    check_template("template", template)
    return template


def with_default_stop(preset: Preset, generation: GenerationConfig) -> GenerationConfig:
    """`generation` with the preset's default stop when the request names none and decoding is greedy.

    A request's own stop sequences win: they replace the default. Sampled decoding keeps no default
    (the module docstring says why).
    """
    if generation.stop or not preset.default_stop or generation.temperature > 0.0:
        return generation
    return dataclasses.replace(generation, stop=preset.default_stop)
