"""`fit-mapping` end to end: corpus → paired states → fits → held-out metrics → artefacts in the registry."""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from patchscope.engine.errors import IncompatibleModels, InvalidArgument
from patchscope.engine.models import LoadedModel
from patchscope.engine.validation import check_layers
from patchscope.eval.next_token_readers import usable_positions
from patchscope.mapping import behaviour_data as bd
from patchscope.mapping import behaviour_forward as bf
from patchscope.mapping import behaviour_metrics as bm
from patchscope.mapping import behavioural as bh
from patchscope.mapping import next_token_fit as nt
from patchscope.mapping.artefact import MappingInfo, mapping_id
from patchscope.mapping.collect import PairedStates, collect_pairs, shared_words
from patchscope.mapping.corpus import (
    Split,
    file_fingerprint,
    read_documents,
    split_documents,
    take_words,
    vocabulary_texts,
)
from patchscope.mapping.fit import (
    FittedMap,
    KLTerm,
    RidgeBasis,
    apply,
    fit_affine,
    fit_learned,
    identity_map,
)
from patchscope.mapping.metrics import evaluate
from patchscope.mapping.registry import MappingRegistry

METHODS = ("affine", "learned", "identity", "tuned-lens", "behavioural", "behavioural-mlp", "next-token")
BEHAVIOURAL = ("behavioural", "behavioural-mlp")
SPLIT_SHARES = {"train": 0.75, "validation": 0.08, "test": 0.17}


@dataclass
class FitReport:
    """What one `fit-mapping` run produced and where its time went."""

    infos: list[MappingInfo] = field(default_factory=list)
    extract_s: float = 0.0
    solve_s: float = 0.0
    pairs: dict[str, int] = field(default_factory=dict)
    # The paired states of each split: pass them back as `paired_states` to fit another method on them.
    states: dict[str, PairedStates] = field(default_factory=dict, repr=False)


class Progress:
    """Hooks for a progress display; the CLI draws bars, tests pass nothing."""

    def start(self, phase: str, total: int) -> None: ...

    def advance(self, phase: str, done: int) -> None: ...

    def note(self, phase: str, text: str) -> None:
        """A line about a phase (e.g. the validation KL of a behavioural fit)."""


def depth_proportional(layer: int, source_layers: int, target_layers: int) -> int:
    """round(ℓ·(L*−1)/(L−1)): the target layer at the same relative depth (2→1, 6→4, 10→6 for 30→18)."""
    return round(layer * (target_layers - 1) / max(1, source_layers - 1))


def parse_pairs(spec: str, source: LoadedModel, target: LoadedModel) -> list[tuple[int, int]]:
    """`2:1,6:4`, `all` (every source × target layer) or `depth` (every source layer, depth-proportional)."""
    L, L_star = source.facts.num_layers, target.facts.num_layers
    if spec == "all":
        return [(a, b) for a in range(L) for b in range(L_star)]
    if spec == "depth":
        return [(a, depth_proportional(a, L, L_star)) for a in range(L)]
    pairs = []
    for part in spec.split(","):
        left, sep, right = part.partition(":")
        if not sep:
            raise InvalidArgument(
                "pairs", "each pair is SOURCE:TARGET", limit="e.g. 2:1,6:4,10:6", value=part
            )
        (a,) = check_layers("pairs (source layer)", [int(left)], source.facts)
        (b,) = check_layers("pairs (target layer)", [int(right)], target.facts)
        pairs.append((a, b))
    return pairs


def fit_mappings(
    source: LoadedModel,
    target: LoadedModel,
    pairs: list[tuple[int, int]],
    method: str,
    corpus: Path,
    registry: MappingRegistry,
    *,
    max_words: int | None = 20_000,
    progress: Progress | None = None,
    learned_options: dict[str, float] | None = None,
    seed: int = 0,
    vocab_words: int = 0,
    exclude_words: set[str] | None = None,
    kl_weight: float = 0.0,
    behavioural_options: bh.BehaviouralOptions | None = None,
    behaviour_eval: bool | None = None,
    relations: list | None = None,
    paired_states: dict[str, PairedStates] | None = None,
    behaviour_data: bd.BehaviourData | None = None,
    subject_texts: bool | None = None,
    next_token_options: nt.NextTokenOptions | None = None,
) -> FitReport:
    """Fit `method` for every (ℓ, ℓ*) in `pairs` and write one artefact per pair into `registry`.

    `kl_weight` > 0 (learned only) adds the KL term on the target's head over the shared single-token
    words (`head_lens`). The behavioural methods start from the affine fit and train on the target's
    behaviour (`behavioural.py`) over `relations` (default: the packaged LRE relations) and shared words.
    `behaviour_eval` (default: on for the behavioural methods only) measures and records the held-out
    behaviour metrics that `auto` prefers to R²; it costs a few hundred patched generations per map.
    `paired_states` (a previous report's `states`, fitted with the same corpus, words and layers) skips the
    extraction. `behaviour_data` (from `build_data`, same seed and excluded words) replaces the default-sized
    rows, so that a caller comparing methods fits and measures every one on the same rows.
    `subject_texts` (default: on for the behavioural methods only) adds the training and validation
    subjects of the relations, read in `SOURCE_CONTEXT`, to the ridge fit's texts of those splits (test
    subjects never). The behaviour metrics recorded are those of the validation split, so that `auto`'s
    choice leaves the test split to report it. `next-token` starts from the affine fit and trains on the
    source's next token at positions of the train and validation documents (`next_token_fit.py`).
    """
    progress = progress or Progress()
    if method not in METHODS:
        raise InvalidArgument("method", "unknown method", limit=", ".join(METHODS), value=method)
    if method in ("identity", "tuned-lens") and source.fingerprint != target.fingerprint:
        raise IncompatibleModels(f"method {method} maps within one model; got {source.id} -> {target.id}")
    if method == "identity" and source.facts.hidden_size != target.facts.hidden_size:
        raise IncompatibleModels("identity needs equal hidden sizes")
    if not pairs:
        raise InvalidArgument("pairs", "must name at least one layer pair")
    if kl_weight < 0 or (kl_weight > 0 and method != "learned"):
        raise InvalidArgument("kl_weight", "a non-negative weight, for method learned only", value=kl_weight)
    behavioural = method in BEHAVIOURAL
    options = behavioural_options or bh.BehaviouralOptions(hidden=256 if method == "behavioural-mlp" else 0)
    if behavioural and (options.hidden > 0) != (method == "behavioural-mlp"):
        raise InvalidArgument(
            "hidden", "behavioural-mlp needs a hidden width > 0, behavioural none", value=options.hidden
        )
    next_options = next_token_options or nt.NextTokenOptions()
    if method == "next-token":
        for name in (
            "train_positions",
            "validation_positions",
            "per_text",
            "batch_size",
            "max_steps",
            "top_k",
        ):
            if getattr(next_options, name) < 1:
                raise InvalidArgument(name, "must be at least 1", value=getattr(next_options, name))
    if behaviour_eval is None:
        behaviour_eval = behavioural
    if subject_texts is None:
        subject_texts = behavioural
    if behaviour_eval and method in ("identity", "tuned-lens"):
        behaviour_eval = False  # same-model maps: the reference is the state itself

    split = split_documents(read_documents(corpus), seed=seed)
    if method == "next-token":  # before any model runs: more positions than the documents hold is an error
        _check_positions(source, split, next_options)
    budget = {
        k: None if max_words is None else max(1, int(max_words * share)) for k, share in SPLIT_SHARES.items()
    }
    texts = {
        "train": take_words(split.train, budget["train"]),
        "validation": take_words(split.validation, budget["validation"]),
        "test": take_words(split.test, budget["test"]),
    }
    data = behaviour_data
    if data is None and (behavioural or behaviour_eval or subject_texts):
        relations = relations if relations is not None else bd.default_relations()
        data = bd.build_data(source, target, relations, seed=seed, exclude_words=exclude_words)
    if subject_texts:
        assert data is not None
        texts["train"] += data.subject_texts("train")
        texts["validation"] += data.subject_texts("validation")
    words = shared_words(source, target, exclude_words or set()) if vocab_words > 0 or kl_weight > 0 else []
    kl = head_lens(target, words, kl_weight) if kl_weight > 0 else None
    if vocab_words > 0:  # training texts only: validation and test stay plain corpus text
        texts["train"] += vocabulary_texts(words, vocab_words, seed=seed)
    source_layers = sorted({a for a, _ in pairs})
    target_layers = sorted({b for _, b in pairs})

    report = FitReport()
    started = time.perf_counter()
    states: dict[str, PairedStates] = {}
    for name, part in texts.items():
        if paired_states is not None:
            states[name] = paired_states[name]
        else:
            phase = f"extract {name}"
            progress.start(phase, len(part))
            states[name] = collect_pairs(
                source, target, part, source_layers, target_layers, lambda k, p=phase: progress.advance(p, k)
            )
        report.pairs[name] = states[name].num_pairs
    report.states = states
    report.extract_s = time.perf_counter() - started

    started = time.perf_counter()
    train, val, test = states["train"], states["validation"], states["test"]
    progress.start("fit", len(pairs))
    by_source: dict[int, list[int]] = {}
    for a, b in pairs:
        by_source.setdefault(a, []).append(b)
    done = 0
    corpus_fp = file_fingerprint(corpus)
    metric_set = None
    if behaviour_eval:
        assert data is not None
        progress.note("fit", "behaviour metrics: finding the validation samples the target knows")
        metric_set = bm.metric_set(target, data, split="validation")
    forwards_by_layer: dict[int, dict[str, bf.TemplateForward]] = {}
    predictions = None
    if method == "next-token":
        predictions = _prediction_rows(source, target, split, sorted(by_source), next_options, seed, progress)
    for a, targets in by_source.items():
        basis = RidgeBasis.of(train.source[a]) if method != "identity" else None
        for b in targets:
            if method == "identity":
                fitted = identity_map(source.facts.hidden_size)
            else:
                assert basis is not None
                fitted = fit_affine(basis, train.target[b], val.source[a], val.target[b])
                if method == "learned":
                    fitted = fit_learned(
                        fitted,
                        train.source[a],
                        train.target[b],
                        val.source[a],
                        val.target[b],
                        seed=seed,
                        kl=kl,
                        **(learned_options or {}),
                    )
                if behavioural:
                    assert data is not None
                    if b not in forwards_by_layer:
                        forwards_by_layer[b] = {
                            name: bf.TemplateForward(target, t, b) for name, t in data.templates.items()
                        }
                    fitted = _fit_behavioural(
                        source, target, a, b, fitted, data, forwards_by_layer[b], options, seed, progress
                    )
                if method == "next-token":
                    assert predictions is not None
                    fitted = _fit_next_token(
                        target,
                        a,
                        b,
                        fitted,
                        {part: rows[a] for part, rows in predictions.items()},
                        train.target[b].mean(dim=0),
                        next_options,
                        seed,
                        progress,
                    )
                    with torch.no_grad():
                        fitted.validation = evaluate(apply(fitted.tensors(), val.source[a]), val.target[b])
                fitted.method = method
            if vocab_words > 0:
                fitted.hyperparameters["vocab_words"] = vocab_words
            # Which documents were fitted on: eval refuses to test a map on them (eval/next_token.py).
            fitted.hyperparameters["split_seed"] = seed
            if exclude_words:
                fitted.hyperparameters["excluded_words"] = len(exclude_words)
            if subject_texts:
                fitted.hyperparameters["subject_texts"] = 1
            behaviour = bm.BehaviourMetrics()
            if behaviour_eval:
                assert data is not None and metric_set is not None
                phase = f"behaviour {a}:{b}"
                progress.note(phase, "measuring identity and attribute explanations on validation data")
                tensors = fitted.tensors()
                behaviour = bm.behaviour_metrics(
                    source, target, a, b, lambda x, t=tensors: apply(t, x), data, metric_set
                )
                progress.note(phase, describe(behaviour))
            info = _info(source, target, a, b, fitted, train, val, test, corpus, corpus_fp, behaviour)
            registry.save(info, fitted.tensors())
            report.infos.append(info)
            done += 1
            progress.advance("fit", done)
    report.solve_s = time.perf_counter() - started
    return report


def _fit_behavioural(
    source: LoadedModel,
    target: LoadedModel,
    a: int,
    b: int,
    start: FittedMap,
    data: bd.BehaviourData,
    forwards: dict[str, bf.TemplateForward],
    options: bh.BehaviouralOptions,
    seed: int,
    progress: Progress,
) -> FittedMap:
    phase = f"behavioural {a}:{b}"
    progress.note(phase, "reference behaviour of the target with its own states")
    prepared = {
        part: bf.prepare(
            source, target, data.rows[part], forwards, a, b, positions=options.positions, top_k=options.top_k
        )
        for part in ("train", "validation")
    }
    progress.start(phase, options.max_steps)

    def on_step(step: int, total: int, kl: float | None) -> None:
        progress.advance(phase, step)
        if kl is not None:
            progress.note(phase, f"step {step}/{total}: validation KL {kl:.4f}")

    fitted = bh.fit_behavioural(
        start,
        target,
        forwards,
        prepared["train"],
        prepared["validation"],
        options,
        seed=seed,
        on_step=on_step,
        on_note=lambda text: progress.note(phase, text),
    )
    h = fitted.hyperparameters
    progress.note(
        phase,
        f"validation KL {h['val_kl_start']} -> {h['val_kl']} (best step {h['best_step']}, "
        f"norm gain {h['norm_gain']}), {fitted.seconds:.0f}s",
    )
    return fitted


def _prediction_rows(
    source: LoadedModel,
    target: LoadedModel,
    split: Split,
    layers: list[int],
    options: nt.NextTokenOptions,
    seed: int,
    progress: Progress,
) -> dict[str, dict[int, nt.PredictionRows]]:
    """The next-token rows of the train and validation documents, every source layer from one pass each."""
    progress.note(
        "next-token", "the source's own next token at positions of the train and validation documents"
    )
    return {
        part: nt.prediction_rows(
            source, target, texts, layers, count, per_text=options.per_text, seed=seed, top_k=options.top_k
        )
        for part, (texts, count) in _position_documents(split, options).items()
    }


def _position_documents(split: Split, options: nt.NextTokenOptions) -> dict[str, tuple[list[str], int]]:
    """The texts the next-token rows of each split come from, and how many positions are asked of them."""
    return {
        "train": (take_words(split.train, None), options.train_positions),
        "validation": (take_words(split.validation, None), options.validation_positions),
    }


def _check_positions(source: LoadedModel, split: Split, options: nt.NextTokenOptions) -> None:
    fields = {"train": "train_positions", "validation": "validation_positions"}
    for part, (texts, count) in _position_documents(split, options).items():
        held = usable_positions(source, texts, per_text=options.per_text)
        if count > held:
            raise InvalidArgument(
                fields[part],
                f"the {part} documents hold {held} positions at {options.per_text} per text",
                limit=f"at most {held}",
                value=count,
            )


def _fit_next_token(
    target: LoadedModel,
    a: int,
    b: int,
    start: FittedMap,
    rows: dict[str, nt.PredictionRows],
    y_mean: torch.Tensor,
    options: nt.NextTokenOptions,
    seed: int,
    progress: Progress,
) -> FittedMap:
    phase = f"next-token {a}:{b}"
    progress.start(phase, options.max_steps)

    def on_step(step: int, total: int, loss: float | None) -> None:
        progress.advance(phase, step)
        if loss is not None:
            progress.note(phase, f"step {step}/{total}: validation cross-entropy {loss:.4f}")

    forward = nt.identity_forward(target, b)
    fitted = nt.fit_next_token(
        start, target, forward, rows["train"], rows["validation"], y_mean, options, seed=seed, on_step=on_step
    )
    h = fitted.hyperparameters
    progress.note(
        phase,
        f"validation cross-entropy {h['val_ce_start']} -> {h['val_ce']}, top-1 {h['val_top1_start']} -> "
        f"{h['val_top1']} (best step {h['best_step']}, norm gain {h['norm_gain']}), {fitted.seconds:.0f}s",
    )
    return fitted


def describe(m: bm.BehaviourMetrics) -> str:
    """One line of behaviour metrics, as the CLI and the logs print them."""
    return (
        f"identity {m.identity_rate:.1%} (n={m.identity_n}), attribute {m.attribute_accuracy:.1%} "
        f"vs same-model {m.attribute_reference:.1%} (n={m.attribute_n}), "
        f"equal to unpatched {m.unpatched_share:.1%}"
    )


def head_lens(target: LoadedModel, words: list[str], weight: float) -> KLTerm:
    """The target's own final norm and head, restricted to the tokens of `words` (one token each).

    The restriction keeps the KL term affordable (Gemma's head has 262k rows) and centred on the words an
    identity Patchscope names; callers leave evaluation words out of `words`.
    """
    ids = sorted({target.tokenizer(" " + w, add_special_tokens=False).input_ids[0] for w in words})
    if not ids:
        raise InvalidArgument("kl_weight", "the KL term needs shared single-token words; none were found")
    layout = target.layout
    head = layout.unembed.weight.detach()[ids].float()  # [V', d_t]
    # A private fp32 copy: the fit's states are fp32 whatever the model's dtype; the model's norm stays as is.
    norm = copy.deepcopy(layout.final_norm).float().requires_grad_(False)

    def lens(states: torch.Tensor) -> torch.Tensor:
        return layout.capped(norm(states) @ head.T)  # [n, V']

    return KLTerm(lens, weight, len(ids))


def _info(
    source: LoadedModel,
    target: LoadedModel,
    a: int,
    b: int,
    fitted: FittedMap,
    train: PairedStates,
    val: PairedStates,
    test: PairedStates,
    corpus: Path,
    corpus_fp: str,
    behaviour: bm.BehaviourMetrics | None = None,
) -> MappingInfo:
    behaviour = behaviour or bm.BehaviourMetrics()
    with torch.no_grad():
        mapped = apply(fitted.tensors(), test.source[a])
        metrics = evaluate(mapped, test.target[b])
    norms = train.target[b].norm(dim=-1)
    return MappingInfo(
        id=mapping_id(source.id, target.id, a, b, fitted.method),
        method=fitted.method,
        hyperparameters=json.dumps(fitted.hyperparameters),
        source_model=source.id,
        source_fingerprint=source.fingerprint,
        source_tokenizer=source.tokenizer_fingerprint,
        source_layer=a,
        source_dim=source.facts.hidden_size,
        target_model=target.id,
        target_fingerprint=target.fingerprint,
        target_tokenizer=target.tokenizer_fingerprint,
        target_layer=b,
        target_dim=target.facts.hidden_size,
        corpus=corpus.name,
        corpus_fingerprint=corpus_fp,
        corpus_words=train.words + val.words + test.words,
        pairs_train=train.num_pairs,
        pairs_validation=val.num_pairs,
        pairs_test=test.num_pairs,
        r2=metrics.r2,
        r2_mean_dim=metrics.r2_mean_dim,
        cosine=metrics.cosine,
        mse=metrics.mse,
        target_norm_mean=float(norms.mean()),
        target_norm_p99=float(norms.quantile(0.99)),
        mapped_norm_mean=float(mapped.norm(dim=-1).mean()),
        fit_seconds=fitted.seconds,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        identity_rate=_measured(behaviour.identity_rate),
        identity_n=behaviour.identity_n,
        attribute_accuracy=_measured(behaviour.attribute_accuracy),
        attribute_reference=_measured(behaviour.attribute_reference),
        attribute_n=behaviour.attribute_n,
        unpatched_share=_measured(behaviour.unpatched_share),
    )


def _measured(value: float) -> float:
    """The artefact's 0.0 for a figure not measured (its count says so), the figure otherwise."""
    return 0.0 if math.isnan(value) else value
