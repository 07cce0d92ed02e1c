"""What the experiments share: batched first-token and short generations, LRE data, scoring, output."""

from __future__ import annotations

import codecs
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from patchscope.engine.generation import GenerationConfig, PatchedRow, RowPatch, iter_patched_generate
from patchscope.engine.models import LoadedModel
from patchscope.engine.runtime import TargetRuntime

Progress = Callable[[str, int, int], None]  # (phase, done, total)


def no_progress(phase: str, done: int, total: int) -> None:
    pass


def chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


@torch.inference_mode()
def first_token_logits(
    target: LoadedModel,
    template: str,
    filler: str,
    patches: Sequence[tuple[int, torch.Tensor]],
    *,
    batch: int = 128,
    progress: Progress = no_progress,
    phase: str = "patchscope",
) -> Iterator[tuple[int, torch.Tensor]]:
    """(row, log-probabilities [V]) of the target's next token after `template`, one row per patch.

    Each patch `(layer, vector)` replaces the placeholder's state at `layer`; rows share the template's
    prefix cache and run in batches of `batch`.
    """
    config = GenerationConfig(max_new_tokens=1)
    runtime = TargetRuntime.build(target)  # one prefix cache for all blocks of this template
    for block in chunks(len(patches), batch):
        rows = [
            PatchedRow(template, filler, (RowPatch(layer=patches[i][0], vector=patches[i][1]),))
            for i in block
        ]
        for step in iter_patched_generate(runtime, rows, config, keep_logits=True):
            assert step.logits is not None
            logprobs = torch.log_softmax(step.logits.float(), dim=-1)
            for k, row in enumerate(step.rows):
                yield block[row], logprobs[k]
        progress(phase, block.stop, len(patches))


@torch.inference_mode()
def patched_texts(
    target: LoadedModel,
    rows: Sequence[PatchedRow],
    max_new_tokens: int,
    *,
    batch: int = 128,
    progress: Progress = no_progress,
    phase: str = "patchscope",
) -> list[str]:
    """Greedy continuations of patched rows (batched by the engine; rows of one template share a batch)."""
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    out: list[list[int]] = [[] for _ in rows]
    runtime = TargetRuntime.build(target)
    for block in chunks(len(rows), batch):
        for step in iter_patched_generate(runtime, [rows[i] for i in block], config):
            for row, token, stop in zip(step.rows, step.token_ids, step.finished, strict=True):
                if not stop:
                    out[block[row]].append(token)
        progress(phase, block.stop, len(rows))
    return [target.tokenizer.decode(ids, skip_special_tokens=True) for ids in out]


def plain_texts(
    model: LoadedModel, prompts: Sequence[str], max_new_tokens: int, *, progress: Progress = no_progress
) -> list[str]:
    """Greedy continuations of plain prompts: the model as anyone would prompt it, nothing patched."""
    rows = [PatchedRow("{}", prompt, ()) for prompt in prompts]
    return patched_texts(model, rows, max_new_tokens, progress=progress, phase="plain prompts")


def placeholder_template(template: str) -> tuple[str, str]:
    """An LRE template (`"The capital of {} is"`) as an engine template and filler.

    The placeholder takes the space before it (`"The capital of{} is"` with `" x"`), so that it is one
    ordinary word token, as the paper's `x` is.
    """
    if " {}" in template:
        return template.replace(" {}", "{}", 1), " x"
    return template, "x"


def contains(text: str, answer: str) -> bool:
    """The paper's attribute score: the object appears in the generated text (case-insensitive)."""
    return bool(answer.strip()) and answer.strip().lower() in text.lower()


@dataclass(frozen=True)
class Sample:
    """One LRE fact: the subject and the object the relation gives it."""

    subject: str
    object: str


@dataclass(frozen=True)
class Relation:
    """One LRE relation: its name, kind (factual, commonsense, linguistic), template and samples."""

    name: str
    kind: str
    template: str
    samples: tuple[Sample, ...]


def _unescape(text: str) -> str:
    r"""LRE files hold some names with literal `\\u00ed` escapes; decode those, leave the rest alone."""
    if "\\u" not in text:
        return text
    return codecs.decode(text.encode("latin-1", "backslashreplace"), "unicode_escape")


def read_relations(root: Path, names: Sequence[str] | None = None) -> list[Relation]:
    """The LRE relations under `root` (`<kind>/<name>.json`), sorted by kind and name."""
    relations = []
    for path in sorted(root.glob("*/*.json")):
        if names and path.stem not in names:
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        samples = tuple(Sample(_unescape(s["subject"]), _unescape(s["object"])) for s in data["samples"])
        relations.append(Relation(path.stem, path.parent.name, data["prompt_templates"][0], samples))
    if names:
        missing = sorted(set(names) - {r.name for r in relations})
        if missing:
            raise FileNotFoundError(f"no LRE relation named {', '.join(missing)} under {root}")
    return relations


def subsample(items: Sequence, count: int | None, seed: int) -> list:
    """A seeded sample of at most `count` items, in their original order."""
    if count is None or len(items) <= count:
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), count))
    return [items[i] for i in keep]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def save_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def save_figure(fig, path: Path) -> Path:
    """Lay out, write and close a figure (the folder is made if missing)."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def pyplot():
    """Matplotlib's pyplot on the file-only backend, or a clear error naming the install."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("patchscope eval plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
