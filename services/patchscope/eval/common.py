"""What the experiments share: batched first-token and short generations, LRE data, scoring, output."""

from __future__ import annotations

import codecs
import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from patchscope.engine.generation import GenerationConfig, PatchedRow, RowPatch, iter_patched_generate
from patchscope.engine.layer_stats import LayerStats, layer_stats
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


# A subject is read inside this context, never alone: alone, its first token sits at position 0, the
# attention sink (SmolLM2 has no BOS), a state no map was fitted on and no target reads as a word.
SOURCE_CONTEXT = "Here is {}"
TEMPLATE_LEAD = "Fact:"


def target_template(template: str) -> str:
    """The LRE template, led by `TEMPLATE_LEAD` when it begins with the placeholder (never position 0)."""
    return f"{TEMPLATE_LEAD} {template}" if template.startswith("{}") else template


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
    range_name: str = ""  # what the objects are ("country"), from the file's properties
    domain_name: str = ""  # what the subjects are


def _unescape(text: str) -> str:
    r"""LRE files hold some names with literal `\\u00ed` escapes; decode those, leave the rest alone."""
    if "\\u" not in text:
        return text
    return codecs.decode(text.encode("latin-1", "backslashreplace"), "unicode_escape")


def read_relations(root: Path | Sequence[Path], names: Sequence[str] | None = None) -> list[Relation]:
    """The LRE relations under `root` (`<kind>/<name>.json`; several folders: all of them), sorted."""
    roots = [root] if isinstance(root, Path) else list(root)
    for folder in roots:
        if not folder.is_dir():
            raise FileNotFoundError(
                f"LRE folder {folder} does not exist: pass --lre DIR (<kind>/<name>.json)"
            )
    relations = []
    for path in sorted(p for folder in roots for p in folder.glob("*/*.json")):
        if names and path.stem not in names:
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        samples = tuple(Sample(_unescape(s["subject"]), _unescape(s["object"])) for s in data["samples"])
        props = data.get("properties", {})
        relations.append(
            Relation(
                path.stem,
                path.parent.name,
                data["prompt_templates"][0],
                samples,
                props.get("range_name", ""),
                props.get("domain_name", ""),
            )
        )
    if names:
        missing = sorted(set(names) - {r.name for r in relations})
        if missing:
            raise FileNotFoundError(
                f"no LRE relation named {', '.join(missing)} under {', '.join(map(str, roots))}"
            )
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


# ---- scoring rules, baselines and statistics shared by the experiments ----------------------------------


def mentions(text: str, answer: str) -> bool:
    """The object appears in `text` as whole words (case-insensitive): "a" does not match "What".

    The paper's rule is a plain substring test; on short objects that passes on almost any text, so the
    experiments use this word-boundary version and exclude one-character objects altogether.
    """
    answer = answer.strip()
    if not answer:
        return False
    return re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", text, flags=re.IGNORECASE) is not None


def trivial_object(answer: str) -> bool:
    """Objects a text matches by accident (single letters, digits): such samples are not scored."""
    return len(answer.strip()) <= 1


def proportion(k: int, n: int) -> dict:
    """A share with its n and 95% Wilson interval, as every figure on the results page carries them."""
    low, high = wilson(k, n)
    return {"k": int(k), "n": int(n), "p": (k / n) if n else 0.0, "ci": [round(low, 4), round(high, 4)]}


def _resamples(n: int, draws: int, seed: int) -> torch.Tensor:
    """[draws, n] item indices drawn with replacement, seeded."""
    return torch.randint(n, (draws, n), generator=torch.Generator().manual_seed(seed))


def bootstrap_ci(values: Sequence[float], *, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of `values` (resampling items)."""
    if not values:
        return (0.0, 0.0)
    x = torch.tensor(list(values), dtype=torch.float64)
    means = x[_resamples(len(x), draws, seed)].mean(dim=1)
    return (float(means.quantile(0.025)), float(means.quantile(0.975)))


def bootstrap_ratio_ci(
    numerator: Sequence[float], denominator: Sequence[float], *, draws: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile bootstrap interval of sum(numerator) / sum(denominator), resampling paired items.

    Why paired: a map's hits and the same-model reference's hits are read on the same samples, so an
    interval of their ratio must resample each sample's two readings together.
    """
    if not numerator or sum(denominator) == 0:
        return (math.nan, math.nan)
    num = torch.tensor(list(numerator), dtype=torch.float64)
    den = torch.tensor(list(denominator), dtype=torch.float64)
    index = _resamples(len(num), draws, seed)
    ratios = num[index].sum(dim=1) / den[index].sum(dim=1).clamp_min(1)
    return (float(ratios.quantile(0.025)), float(ratios.quantile(0.975)))


def sign_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Exact two-sided sign test of paired per-item scores (ties dropped): does `a` differ from `b`."""
    wins = sum(x > y for x, y in zip(a, b, strict=True))
    losses = sum(x < y for x, y in zip(a, b, strict=True))
    n = wins + losses
    if n == 0:
        return {"wins": 0, "losses": 0, "p": 1.0}
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return {"wins": wins, "losses": losses, "p": min(1.0, 2 * tail)}


def cv_folds(n: int, folds: int, seed: int) -> list[list[int]]:
    """A seeded partition of range(n) into `folds` test folds (fewer when n is smaller)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = max(1, min(folds, n))
    return [sorted(order[f::k]) for f in range(k)]


def majority_baseline(labels: Sequence[str], *, folds: int = 3, seed: int = 0) -> list[bool]:
    """Per item: whether the training folds' most common label is this item's (the probe's folds)."""
    out = [False] * len(labels)
    for test in cv_folds(len(labels), folds, seed):
        train = [labels[i] for i in range(len(labels)) if i not in set(test)]
        if not train:
            continue
        guess = Counter(train).most_common(1)[0][0]
        for i in test:
            out[i] = labels[i] == guess
    return out


def logistic_probe(
    states: torch.Tensor,
    labels: Sequence[str],
    *,
    folds: int = 3,
    seed: int = 0,
    l2: float = 1e-2,
    steps: int = 200,
) -> list[bool]:
    """Per item: whether a multinomial logistic regression's held-out prediction is right (states [N, d]).

    Standardised features, L2-regularised, fitted by L-BFGS on the other folds; an object absent from the
    training folds cannot be predicted and counts as wrong (the majority baseline has the same handicap).
    """
    n = len(labels)
    out = [False] * n
    x_all = states.double()
    for test in cv_folds(n, folds, seed):
        held = set(test)
        train = [i for i in range(n) if i not in held]
        classes = sorted({labels[i] for i in train})
        if not train or not test:
            continue
        if len(classes) == 1:
            for i in test:
                out[i] = labels[i] == classes[0]
            continue
        x = x_all[train]
        mean, std = x.mean(dim=0), x.std(dim=0, unbiased=False) + 1e-6
        x = (x - mean) / std  # [n_train, d]
        y = torch.tensor([classes.index(labels[i]) for i in train])
        weight = torch.zeros(x.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
        optimiser = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

        def closure(optimiser=optimiser, x=x, y=y, weight=weight, bias=bias) -> torch.Tensor:
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + l2 * (weight**2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimiser.step(closure)
        with torch.no_grad():
            predicted = (((x_all[test] - mean) / std) @ weight + bias).argmax(dim=-1).tolist()
        for i, p in zip(test, predicted, strict=True):
            out[i] = classes[p] == labels[i]
    return out


_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenisation: lower case, runs of [a-z0-9], no stemming."""
    return _ROUGE_TOKEN.findall(text.lower())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of tokens), as rouge-score's `rougeL` computes it."""
    c, r = rouge_tokens(candidate), rouge_tokens(reference)
    if not c or not r:
        return 0.0
    previous = [0] * (len(r) + 1)
    for token in c:
        current = [0]
        for j, other in enumerate(r):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def unpatched_texts(
    model: LoadedModel, template: str, filler: str, max_new_tokens: int, count: int = 1
) -> list[str]:
    """The no-patch control: the template with its filler and nothing patched, `count` copies.

    Greedy decoding makes every copy the same; callers compare each explanation with it.
    """
    (text,) = patched_texts(
        model, [PatchedRow(template, filler, ())], max_new_tokens, phase="no-patch control"
    )
    return [text] * count


def mean_state_texts(
    model: LoadedModel,
    template: str,
    filler: str,
    layers: Sequence[int],
    max_new_tokens: int,
    *,
    stats: LayerStats | None = None,
) -> dict[int, str]:
    """The mean-state control: per layer ℓ*, the template with ℓ*'s mean state patched at the placeholder.

    The mean holds nothing about any subject, so what the target says with it is the template's and the
    layer's own answer; an explanation that equals it shows nothing. One batched call for all layers.
    """
    means = (stats or layer_stats(model)).means
    rows = [PatchedRow(template, filler, (RowPatch(layer=b, vector=means[b]),)) for b in layers]
    texts = patched_texts(model, rows, max_new_tokens, phase="mean-state control")
    return dict(zip(layers, texts, strict=True))


def equal_share(answers: Sequence[str], control: Sequence[str]) -> dict:
    """How many answers equal their no-patch control (compared case-insensitively, stripped)."""
    same = sum(a.strip().lower() == c.strip().lower() for a, c in zip(answers, control, strict=True))
    return proportion(same, len(answers))


def layer_grid(num_layers: int, step: int) -> list[int]:
    """Every `step`-th layer from 0, and always the last one."""
    layers = list(range(0, num_layers, max(1, step)))
    if layers[-1] != num_layers - 1:
        layers.append(num_layers - 1)
    return layers


def hits_string(hits: Sequence[bool]) -> str:
    """Per-item outcomes stored compactly in the JSON ("0110…"), so figures and tests can be recomputed."""
    return "".join("1" if h else "0" for h in hits)
