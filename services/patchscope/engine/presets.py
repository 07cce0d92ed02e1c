"""Target prompts from the paper, each a named preset with its filler and its answer rule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from patchscope.engine.errors import InvalidArgument
from patchscope.engine.validation import check_template

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
    """A named target prompt; `generates` is False for the logit lens, which reads the state directly."""

    name: str
    template: str
    filler: str
    answer: Callable[[str], str]
    generates: bool = True
    summary: str = ""


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
        ),
        Preset(
            name="attribute",
            template="The capital of{} is",
            filler=" x",
            answer=first_line_answer,
            summary="attribute extraction: pass a relation template with --template (LRE templates fit)",
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
