"""Behavioural fitting: a map trained so that the target does with the mapped state what it does with its own.

A ridge map reproduces the variance-weighted bulk of the target's states, which is enough to name a word
but not to carry what the source knows about it: the directions the target's upper layers read an
attribute from have little variance. This fit starts from the ridge solution and minimises, over rows of
(template, text), the KL divergence between the target's next-token distributions at the template's
continuation when patched at ℓ* with its own state of the text and when patched with the mapped source
state of the same text, back-propagating through the target's blocks above ℓ* (its parameters frozen),
plus the MSE to the target's state as a regulariser that keeps the map near the state manifold.

Costs stay small on a CPU: the template's prefix before the placeholder is run once (its keys and values
do not depend on the patch), so a step runs only the placeholder and the few tokens after it, in the
layers above ℓ*; the reference distributions are computed once and kept as their top-K tokens plus the
rest of the mass, a coarsening of the KL that keeps memory at K numbers per position instead of the
vocabulary.

`behaviour_metrics` measures what the registry records beside R²: the identity rate on held-out words, the
attribute accuracy on held-out LRE subjects (only samples the target knows when prompted in plain text,
next to the same-model reference at ℓ*), and the share of attribute explanations equal to the unpatched
control.
"""

from __future__ import annotations

import copy
import hashlib
import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from patchscope.engine.generation import PatchedRow, RowPatch
from patchscope.engine.kv_cache import cache_kwarg
from patchscope.engine.models import LoadedModel
from patchscope.engine.patch import block_hidden
from patchscope.engine.presets import PRESETS, identity_answer
from patchscope.engine.template import TemplateTokens, tokenize_template
from patchscope.eval.common import (
    Relation,
    contains,
    patched_texts,
    placeholder_template,
    plain_texts,
    read_relations,
)
from patchscope.mapping.collect import _states, shared_words
from patchscope.mapping.corpus import CARRIERS
from patchscope.mapping.fit import FittedMap, apply
from patchscope.mapping.metrics import evaluate

IDENTITY_PROMPT = "I saw the {}"  # the source prompt of the identity metric (as bench_mapping.py's)
SPLITS = ("train", "validation", "test")


def split_of(key: str, seed: int, shares: tuple[float, float] = (0.7, 0.1)) -> str:
    """The split of `key` from a seeded hash: a subject or word lands in one split only."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "train" if u < shares[0] else "validation" if u < shares[0] + shares[1] else "test"


@dataclass(frozen=True)
class BehaviourTemplate:
    """A target template the fit patches: its text, its filler and what kind of reading it asks for."""

    name: str
    template: str
    filler: str


def templates_for(relations: Sequence[Relation]) -> dict[str, BehaviourTemplate]:
    """The identity and description presets and every relation's attribute template."""
    out = {
        name: BehaviourTemplate(name, PRESETS[name].template, PRESETS[name].filler)
        for name in ("identity", "description")
    }
    for relation in relations:
        template, filler = placeholder_template(relation.template)
        out[relation.name] = BehaviourTemplate(relation.name, template, filler)
    return out


@dataclass(frozen=True)
class TextRow:
    """One training example before any model runs: a source text read at its last token, a template."""

    text: str
    template: str  # a key of the templates dict


@dataclass
class BehaviourData:
    """Texts and templates of each split, and the held-out evaluation sets of `behaviour_metrics`."""

    templates: dict[str, BehaviourTemplate]
    rows: dict[str, list[TextRow]]
    identity_words: list[str]  # held-out words for the identity rate
    attribute_samples: list[tuple[str, str, str]]  # held-out (relation, subject, object)
    relations: dict[str, Relation] = field(default_factory=dict)


def build_data(
    source: LoadedModel,
    target: LoadedModel,
    relations: Sequence[Relation],
    *,
    seed: int = 0,
    subjects_per_relation: int = 24,
    words: int = 600,
    identity_eval: int = 100,
    attribute_eval_per_relation: int = 8,
    exclude_words: set[str] | None = None,
) -> BehaviourData:
    """Rows split by subject (LRE) and by word (shared single-token words), never by row.

    A subject gives an attribute row (its relation's template) and an identity row; a word, put at the end
    of one of the corpus carriers, gives an identity row and a description row. Test subjects and words
    give the held-out KL rows and the metrics' samples; no fit sees them.
    """
    templates = templates_for(relations)
    rows: dict[str, list[TextRow]] = {s: [] for s in SPLITS}
    attribute_samples: list[tuple[str, str, str]] = []
    caps = {
        "train": subjects_per_relation,
        "validation": max(2, subjects_per_relation // 6),
        "test": attribute_eval_per_relation,
    }
    for relation in relations:
        taken = {s: 0 for s in SPLITS}
        seen: set[str] = set()
        for sample in relation.samples:
            if sample.subject in seen or not sample.subject.strip():
                continue
            seen.add(sample.subject)
            part = split_of(sample.subject, seed)
            if part == "test" and taken["test"] < attribute_eval_per_relation:
                attribute_samples.append((relation.name, sample.subject, sample.object))
            if taken[part] >= caps[part]:
                continue
            taken[part] += 1
            rows[part].append(TextRow(sample.subject, relation.name))
            rows[part].append(TextRow(sample.subject, "identity"))
    vocabulary = shared_words(source, target, exclude_words or set())
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for word in vocabulary:
        by_split[split_of("word:" + word, seed)].append(word)
    rng = random.Random(seed)
    budget = {"train": words, "validation": max(20, words // 8), "test": identity_eval}
    chosen = {}
    for part in SPLITS:
        chosen[part] = rng.sample(by_split[part], min(budget[part], len(by_split[part])))
        for word in chosen[part]:
            text = rng.choice(CARRIERS).format(word)
            rows[part].append(TextRow(text, "identity"))
            rows[part].append(TextRow(text, "description"))
    identity_words = sorted(chosen["test"])
    return BehaviourData(templates, rows, identity_words, attribute_samples, {r.name: r for r in relations})


# --- the differentiable patched forward -------------------------------------------------------------------


@contextmanager
def frozen(model: torch.nn.Module):
    """Parameters without gradients for the block; gradients flow only into the patched vectors."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


class TemplateForward:
    """The target on one template, patched at (placeholder, ℓ*), from the template's cached prefix.

    `logprobs(vectors, continuation)` gives the next-token log-probabilities ([B, k, V]) at the template's
    last position and after each of the first k − 1 continuation tokens (teacher-forced), with
    `vectors` ([B, d]) written at the placeholder; with autograd on they carry gradients to `vectors`.
    """

    def __init__(self, target: LoadedModel, template: BehaviourTemplate, layer: int) -> None:
        self.target, self.layer = target, layer
        self.head: torch.Tensor | None = None  # [V', d] rows of the head when restricted (`restrict`)
        self.tokens: TemplateTokens = tokenize_template(target.tokenizer, template.template, template.filler)
        self.shared = self.tokens.prefix_len  # the prefix, identical and unpatched in every row
        self.base = target.model.base_model
        self._prefix = None
        if self.shared > 0:
            kv = DynamicCache(config=target.model.config)
            ids = torch.tensor([self.tokens.ids[: self.shared]], device=target.device)  # [1, P]
            with torch.no_grad():
                self.base(ids, use_cache=True, **{cache_kwarg(type(self.base)): kv})
            self._prefix = kv

    def restrict(self, head: torch.Tensor | None) -> None:
        """Compute logits over the head rows `head` only ([V', d]), or the whole vocabulary (None)."""
        self.head = head

    @property
    def suffix(self) -> list[int]:
        return list(self.tokens.ids[self.shared :])

    def logprobs(self, vectors: torch.Tensor, continuation: torch.Tensor | None = None) -> torch.Tensor:
        batch, device = vectors.shape[0], self.target.device
        suffix = torch.tensor(self.suffix, device=device).expand(batch, -1)  # [B, S]
        ids = suffix if continuation is None else torch.cat([suffix, continuation.to(device)], dim=1)
        k = 1 if continuation is None else continuation.shape[1] + 1
        column = self.tokens.placeholder - self.shared  # the placeholder inside this forward

        def hook(_module, _args, output):
            hidden = block_hidden(output)
            patched = hidden.clone()
            patched[:, column] = vectors.to(hidden.device, hidden.dtype)
            return (patched, *output[1:]) if isinstance(output, tuple) else patched

        kwargs = {}
        if self._prefix is not None:
            kv = copy.deepcopy(self._prefix)
            if batch > 1:
                kv.batch_repeat_interleave(batch)
            kwargs[cache_kwarg(type(self.base))] = kv
        handle = self.target.layout.blocks[self.layer].register_forward_hook(hook)
        try:
            normed = self.base(ids, use_cache=self._prefix is not None, **kwargs).last_hidden_state
        finally:
            handle.remove()
        last = normed[:, -k:].reshape(batch * k, -1)  # [B·k, d]: the positions predicting the continuation
        layout = self.target.layout
        if self.head is None:
            logits = layout.unembed_normed(last).float()  # [B·k, V]
        else:
            logits = layout.capped(last.float() @ self.head.T)  # [B·k, V']
        return torch.log_softmax(logits, dim=-1).view(batch, k, -1)


@dataclass
class Reference:
    """The target's own behaviour on each row: top-K log-probabilities per continuation position."""

    index: torch.Tensor  # [N, k, K] token ids
    logprobs: torch.Tensor  # [N, k, K]
    continuation: torch.Tensor  # [N, k − 1] greedy tokens fed back (teacher forcing)
    mask: torch.Tensor  # [N, k] positions before the first stop token (inclusive)


def coarse_kl(
    predicted: torch.Tensor, reference: Reference, rows: torch.Tensor, lookup: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean KL(reference ‖ predicted) over the reference's top-K tokens plus one bin for the rest ([]).

    `predicted` ([B, k, V']) is over a restricted vocabulary when `lookup` ([V] → column in V', −1 for
    absent) is given; reference tokens outside it count in the rest.
    """
    index, ref = reference.index[rows], reference.logprobs[rows]  # [B, k, K]
    mask = reference.mask[rows].float()  # [B, k]
    column = index if lookup is None else lookup[index]
    inside = (column >= 0).float()
    pred = predicted.gather(-1, column.clamp_min(0))  # [B, k, K]
    p_ref = ref.exp() * inside
    rest_ref = (1 - p_ref.sum(-1)).clamp_min(1e-6)  # [B, k]
    rest_pred = (1 - (pred.exp() * inside).sum(-1)).clamp_min(1e-6)
    kl = (p_ref * (ref - pred)).sum(-1) + rest_ref * (rest_ref.log() - rest_pred.log())  # [B, k]
    return (kl * mask).sum() / mask.sum().clamp_min(1)


@dataclass
class Vocabulary:
    """The tokens the fit scores: every token in some train or validation row's reference top-K.

    The target's head has 262k rows for Gemma; a row's reference outside its top-K is one bin anyway, so
    logits over the union of the top-K sets cost a fraction of the head and change the KL only through
    the normaliser.
    """

    ids: torch.Tensor  # [V'] token ids
    lookup: torch.Tensor  # [V] column in ids, −1 for tokens outside

    @classmethod
    def of(cls, references: Sequence[Reference], size: int) -> Vocabulary:
        ids = torch.unique(torch.cat([r.index.flatten() for r in references]))
        lookup = torch.full((size,), -1, dtype=torch.long)
        lookup[ids] = torch.arange(len(ids))
        return cls(ids, lookup)

    def restrict(self, target: LoadedModel, forwards: dict[str, TemplateForward]) -> None:
        head = target.layout.unembed.weight.detach()[self.ids.to(target.device)].float()  # [V', d]
        for forward in forwards.values():
            forward.restrict(head)


@dataclass
class Prepared:
    """One split's rows ready for training: states, template groups and the reference behaviour."""

    x: torch.Tensor  # [N, d_s] source state of each row's text at ℓ
    y: torch.Tensor  # [N, d_t] target state of the same text at ℓ*
    groups: dict[str, torch.Tensor]  # template -> row indices
    reference: Reference


def _last_token_states(model: LoadedModel, texts: list[str], layer: int) -> torch.Tensor:
    """States ([N, d]) at the last token of each text: a multi-token subject is read where it ends."""
    seqs = [list(model.tokenizer(t).input_ids) for t in texts]
    states = _states(model, seqs, [[len(s) - 1] for s in seqs], [layer], batch_tokens=2048)
    return torch.stack([s[layer][0] for s in states])


def _stop_ids(target: LoadedModel) -> set[int]:
    ids = {target.tokenizer.eos_token_id}
    eos = getattr(target.model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if i is not None}


def prepare(
    source: LoadedModel,
    target: LoadedModel,
    rows: list[TextRow],
    forwards: dict[str, TemplateForward],
    a: int,
    b: int,
    *,
    positions: int = 1,
    top_k: int = 64,
    batch: int = 64,
) -> Prepared:
    """States of both models for `rows` and the target's own behaviour on them (no gradients)."""
    texts = sorted({r.text for r in rows})
    where = {t: i for i, t in enumerate(texts)}
    xs, ys = _last_token_states(source, texts, a), _last_token_states(target, texts, b)
    pick = torch.tensor([where[r.text] for r in rows])
    x, y = xs[pick], ys[pick]
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.template, []).append(i)
    n = len(rows)
    index = torch.zeros(n, positions, top_k, dtype=torch.long)
    logprobs = torch.zeros(n, positions, top_k)
    continuation = torch.zeros(n, positions - 1, dtype=torch.long)
    stops = torch.tensor(sorted(_stop_ids(target)))
    with torch.no_grad():
        for name, members in groups.items():
            forward = forwards[name]
            for start in range(0, len(members), batch):
                idx = torch.tensor(members[start : start + batch])
                fed = torch.zeros(len(idx), 0, dtype=torch.long)
                for _ in range(positions):  # greedy continuation, one token at a time
                    lp = forward.logprobs(y[idx], fed if fed.shape[1] else None)  # [B, j+1, V]
                    fed = torch.cat([fed, lp[:, -1].argmax(-1, keepdim=True).cpu()], dim=1)
                top = lp.topk(top_k, dim=-1)  # the last pass holds every position, teacher-forced
                index[idx], logprobs[idx] = top.indices.cpu(), top.values.cpu()
                continuation[idx] = fed[:, : positions - 1]
    stopped = torch.isin(continuation, stops)  # [N, k − 1]
    # Position j is scored while no earlier continuation token was a stop token.
    mask = torch.cat([torch.ones(n, 1, dtype=torch.bool), ~stopped.cumsum(1).bool()], dim=1)
    reference = Reference(index, logprobs, continuation, mask)
    return Prepared(x, y, {k: torch.tensor(v) for k, v in groups.items()}, reference)


# --- the fit ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BehaviouralOptions:
    """Hyperparameters of `fit_behavioural` (recorded in the artefact)."""

    hidden: int = 0  # 0: affine; > 0: affine + a GELU MLP residual of this width
    lr: float = 3e-4
    batch_size: int = 32
    max_steps: int = 300
    eval_every: int = 10
    patience: int = 5
    mse_weight: float = 0.2
    positions: int = 1  # next-token distributions per row: the template's last position (and after it)
    top_k: int = 64
    restrict_vocabulary: bool = True  # logits over the train and validation rows' top-K tokens only
    calibrate_norm: bool = True
    gains: tuple[float, ...] = (0.9, 1.0, 1.2, 1.5)  # each costs one pass over the validation rows


class Map(torch.nn.Module):
    """`x @ W + b (+ W2 gelu(x W1 + b1) + b2)`: the tensors `fit.apply` reads, as trainable parameters."""

    def __init__(self, start: FittedMap, hidden: int, x_std: float, generator: torch.Generator) -> None:
        super().__init__()
        d_s, d_t = start.weight.shape
        self.weight = torch.nn.Parameter(start.weight.clone())
        self.bias = torch.nn.Parameter(start.bias.clone())
        self.mlp = torch.nn.ParameterDict()
        if hidden > 0:
            w1 = torch.randn(d_s, hidden, generator=generator) / (d_s**0.5 * max(x_std, 1e-6))
            self.mlp.update(
                {
                    "w1": torch.nn.Parameter(w1),
                    "b1": torch.nn.Parameter(torch.zeros(hidden)),
                    "w2": torch.nn.Parameter(torch.zeros(hidden, d_t)),  # zero: starts at the ridge map
                    "b2": torch.nn.Parameter(torch.zeros(d_t)),
                }
            )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias, **{f"mlp.{k}": v for k, v in self.mlp.items()}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply(self.tensors(), x)


def split_kl(
    forwards: dict[str, TemplateForward],
    data: Prepared,
    mapped: Callable[[torch.Tensor], torch.Tensor],
    batch: int = 64,
    lookup: torch.Tensor | None = None,
) -> float:
    """Mean coarse KL over every row of `data` (no gradients): the validation behaviour."""
    total, count = 0.0, 0
    with torch.no_grad():
        for name, members in data.groups.items():
            for start in range(0, len(members), batch):
                idx = members[start : start + batch]
                cont = data.reference.continuation[idx]
                lp = forwards[name].logprobs(mapped(data.x[idx]), cont if cont.shape[1] else None)
                total += float(coarse_kl(lp, data.reference, idx, lookup)) * len(idx)
                count += len(idx)
    return total / max(1, count)


@contextmanager
def _unrestricted_after(forwards: dict[str, TemplateForward]):
    try:
        yield
    finally:
        for forward in forwards.values():
            forward.restrict(None)


def fit_behavioural(
    start: FittedMap,
    target: LoadedModel,
    forwards: dict[str, TemplateForward],
    train: Prepared,
    val: Prepared,
    options: BehaviouralOptions = BehaviouralOptions(),
    *,
    seed: int = 0,
    on_step: Callable[[int, int, float | None], None] = lambda _s, _t, _kl: None,
) -> FittedMap:
    """Adam on KL + mse_weight · MSE/Var from `start`; the best validation KL wins (early stopping).

    With `calibrate_norm`, the start is first scaled about the target layer's mean state by the gain (of
    `gains`) with the lowest validation KL: ridge shrinks mapped states toward the mean, and a target
    reads a short state as a weak one.
    """
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    start = copy.deepcopy(start)
    y_mean = train.y.mean(dim=0)
    gain = 1.0
    lookup = None
    if options.restrict_vocabulary:
        vocabulary = Vocabulary.of([train.reference, val.reference], target.layout.unembed.weight.shape[0])
        vocabulary.restrict(target, forwards)
        lookup = vocabulary.lookup
    with frozen(target.model), _unrestricted_after(forwards):
        if options.calibrate_norm:

            def scaled(g: float) -> Callable[[torch.Tensor], torch.Tensor]:
                return lambda x: y_mean + g * (apply(start.tensors(), x) - y_mean)

            kls = {g: split_kl(forwards, val, scaled(g), lookup=lookup) for g in options.gains}
            gain = min(kls, key=lambda g: (kls[g], abs(g - 1)))
            start.weight = start.weight * gain
            start.bias = y_mean + gain * (start.bias - y_mean)
        model = Map(start, options.hidden, float(train.x.std()), generator)
        optimiser = torch.optim.Adam(model.parameters(), lr=options.lr)
        target_var = float(train.y.var(dim=0).sum())
        start_kl = split_kl(forwards, val, model, lookup=lookup)
        best_kl, best_state, best_step, stale = start_kl, copy.deepcopy(model.state_dict()), 0, 0
        # Minibatches come from one template each (one forward per step), in a seeded order.
        batches: list[tuple[str, torch.Tensor]] = []
        step = 0
        while step < options.max_steps:
            if not batches:
                for name, members in train.groups.items():
                    order = members[torch.randperm(len(members), generator=generator)]
                    batches += [(name, chunk) for chunk in order.split(options.batch_size)]
                perm = torch.randperm(len(batches), generator=generator).tolist()
                batches = [batches[i] for i in perm]
            name, idx = batches.pop()
            mapped = model(train.x[idx])
            cont = train.reference.continuation[idx]
            lp = forwards[name].logprobs(mapped, cont if cont.shape[1] else None)
            loss = coarse_kl(lp, train.reference, idx, lookup)
            if options.mse_weight > 0:
                loss = loss + options.mse_weight * ((mapped - train.y[idx]) ** 2).sum(-1).mean() / target_var
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            step += 1
            value = None
            if step % options.eval_every == 0 or step == options.max_steps:
                value = split_kl(forwards, val, model, lookup=lookup)
                if value < best_kl - 1e-4:
                    best_kl, best_state, best_step, stale = value, copy.deepcopy(model.state_dict()), step, 0
                else:
                    stale += 1
            on_step(step, options.max_steps, value)
            if stale >= options.patience:
                break
        model.load_state_dict(best_state)
    tensors = {k: v.detach().clone() for k, v in model.tensors().items()}
    with torch.no_grad():
        validation = evaluate(apply(tensors, val.x), val.y)
    hyper: dict[str, float | int | str] = {
        "init": "affine",
        "hidden": options.hidden,
        "lr": options.lr,
        "batch_size": options.batch_size,
        "steps": step,
        "best_step": best_step,
        "patience": options.patience,
        "mse_weight": options.mse_weight,
        "positions": options.positions,
        "top_k": options.top_k,
        "vocabulary": len(lookup[lookup >= 0]) if lookup is not None else 0,
        "norm_gain": gain,
        "val_kl_start": round(start_kl, 5),
        "val_kl": round(best_kl, 5),
        "train_rows": int(train.x.shape[0]),
        "val_rows": int(val.x.shape[0]),
        **{f"affine_{k}": v for k, v in start.hyperparameters.items()},
    }
    mlp = {k.removeprefix("mlp."): v for k, v in tensors.items() if k.startswith("mlp.")}
    method = "behavioural-mlp" if options.hidden > 0 else "behavioural"
    return FittedMap(
        method,
        tensors["weight"],
        tensors["bias"],
        hyper,
        validation,
        mlp,
        time.perf_counter() - started,
    )


# --- behaviour metrics ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BehaviourMetrics:
    """Held-out behaviour of one map (NaN where not measured), recorded beside R²."""

    identity_rate: float = math.nan
    identity_n: int = 0
    attribute_accuracy: float = math.nan
    attribute_reference: float = math.nan  # the same-model target at ℓ* on the same samples
    attribute_n: int = 0
    unpatched_share: float = math.nan  # attribute explanations equal to the template's unpatched output
    kl: float = math.nan  # coarse KL on the held-out rows, when measured

    @property
    def measured(self) -> bool:
        return self.identity_n > 0 or self.attribute_n > 0


@dataclass
class MetricSet:
    """What `behaviour_metrics` reuses across maps of one target layer: known samples, controls, reference."""

    words: list[str]
    samples: list[tuple[str, str, str]]  # known by the target in plain text: (relation, subject, object)
    controls: dict[str, str]  # relation -> the template's output with no patch
    reference_hits: dict[int, list[bool]] = field(default_factory=dict)  # ℓ* -> same-model hits


def metric_set(target: LoadedModel, data: BehaviourData, *, max_new_tokens: int = 8) -> MetricSet:
    """The held-out samples the target answers when prompted in plain text, and the unpatched controls."""
    samples = data.attribute_samples
    prompts = [data.relations[r].template.format(s) for r, s, _ in samples]
    plain = plain_texts(target, prompts, max_new_tokens)
    known = [smp for smp, text in zip(samples, plain, strict=True) if contains(text, smp[2])]
    names = sorted({r for r, _, _ in known})
    rows = [PatchedRow(data.templates[r].template, data.templates[r].filler, ()) for r in names]
    controls = dict(zip(names, patched_texts(target, rows, max_new_tokens), strict=True))
    return MetricSet(data.identity_words, known, controls)


def _attribute_texts(
    target: LoadedModel,
    data: BehaviourData,
    samples: list[tuple[str, str, str]],
    vectors: torch.Tensor,
    layer: int,
    max_new_tokens: int,
) -> list[str]:
    rows = [
        PatchedRow(data.templates[r].template, data.templates[r].filler, (RowPatch(layer, vectors[i]),))
        for i, (r, _, _) in enumerate(samples)
    ]
    return patched_texts(target, rows, max_new_tokens)


def behaviour_metrics(
    source: LoadedModel,
    target: LoadedModel,
    a: int,
    b: int,
    mapping: Callable[[torch.Tensor], torch.Tensor],
    data: BehaviourData,
    metrics: MetricSet,
    *,
    max_new_tokens: int = 8,
) -> BehaviourMetrics:
    """Identity rate, attribute accuracy (with the same-model reference) and the unpatched share."""
    identity_hits = 0
    if metrics.words:
        x = _last_token_states(source, [IDENTITY_PROMPT.format(w) for w in metrics.words], a)
        with torch.no_grad():
            mapped = mapping(x)
        preset = PRESETS["identity"]
        rows = [PatchedRow(preset.template, preset.filler, (RowPatch(b, v),)) for v in mapped]
        texts = patched_texts(target, rows, 4)
        identity_hits = sum(
            identity_answer(t).lower() == w.lower() for t, w in zip(texts, metrics.words, strict=True)
        )
    samples = metrics.samples
    accuracy = reference = share = math.nan
    if samples:
        subjects = [s for _, s, _ in samples]
        with torch.no_grad():
            mapped = mapping(_last_token_states(source, subjects, a))
        texts = _attribute_texts(target, data, samples, mapped, b, max_new_tokens)
        hits = [contains(t, o) for t, (_, _, o) in zip(texts, samples, strict=True)]
        if b not in metrics.reference_hits:
            own = _last_token_states(target, subjects, b)
            own_texts = _attribute_texts(target, data, samples, own, b, max_new_tokens)
            metrics.reference_hits[b] = [
                contains(t, o) for t, (_, _, o) in zip(own_texts, samples, strict=True)
            ]
        accuracy = sum(hits) / len(samples)
        reference = sum(metrics.reference_hits[b]) / len(samples)
        same = [t == metrics.controls[r] for t, (r, _, _) in zip(texts, samples, strict=True)]
        share = sum(same) / len(samples)
    n_words = len(metrics.words)
    return BehaviourMetrics(
        identity_rate=identity_hits / n_words if n_words else math.nan,
        identity_n=n_words,
        attribute_accuracy=accuracy,
        attribute_reference=reference,
        attribute_n=len(samples),
        unpatched_share=share,
    )


def default_relations() -> list[Relation]:
    from patchscope.data import data_root

    return read_relations(data_root() / "lre")
