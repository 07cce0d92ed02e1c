"""Behavioural maps: the fit lowers the target's held-out KL, is deterministic; `auto` prefers behaviour."""

import pytest
import torch
from tests.conftest import data_dir

from patchscope.engine.template import leading_special_ids, tokenize_template
from patchscope.eval.common import SOURCE_CONTEXT, Relation, Sample
from patchscope.mapping import behaviour_data as bd
from patchscope.mapping import behaviour_forward as bf
from patchscope.mapping import behavioural as bh
from patchscope.mapping.artefact import read_info
from patchscope.mapping.fit import RidgeBasis, apply, fit_affine
from patchscope.mapping.pipeline import fit_mappings
from patchscope.mapping.registry import MappingRegistry
from patchscope.mapping.resolve import resolve_mappings

WIKITEXT = data_dir() / "wikitext-2" / "valid.txt"
WORDS = (
    "the city of river king album war game team season church film song army house state year music ship "
    "world school party line station species road town island"
).split()


def relations(count: int = 2, obj: str | None = None) -> list[Relation]:
    """Made-up relations over two-word subjects: the tiny models know nothing, but behave all the same.

    With `obj` every sample's object is that string (a letter any text contains makes samples "known").
    """
    templates = ["{} is part of the", "The capital of {} is", "{} was created by"]
    return [
        Relation(
            f"rel_{k}",
            "factual",
            templates[k],
            tuple(Sample(f"{u} {v}", obj or v) for u in WORDS for v in WORDS[k * 7 : k * 7 + 7] if u != v),
        )
        for k in range(count)
    ]


@pytest.fixture(scope="module")
def setup(tiny_models):
    """Source tiny-llama layer 2, target tiny-qwen2 layer 1, rows of both relations, ridge start."""
    source, target = tiny_models["llama"], tiny_models["qwen2"]
    data = bd.build_data(source, target, relations(), subjects_per_relation=120, words=0, identity_eval=0)
    forwards = {name: bf.TemplateForward(target, t, 1) for name, t in data.templates.items()}
    # Two positions: the template's next token and the one after the greedy first (teacher-forced).
    prepared = {
        part: bf.prepare(source, target, data.rows[part], forwards, 2, 1, positions=2) for part in bd.SPLITS
    }
    train, val = prepared["train"], prepared["validation"]
    start = fit_affine(RidgeBasis.of(train.x), train.y, val.x, val.y)
    return source, target, forwards, prepared, start


def test_splits_are_by_subject_and_multi_token_subjects_are_read_at_their_last_token(setup):
    source, target, *_ = setup
    data = bd.build_data(source, target, relations(), subjects_per_relation=120, words=0, identity_eval=0)
    subjects = {part: {r.text for r in data.rows[part]} for part in bd.SPLITS}
    assert not subjects["train"] & subjects["test"] and not subjects["train"] & subjects["validation"]
    text = data.rows["test"][0].text
    ids = target.tokenizer(text).input_ids
    assert len(ids) > 2  # BOS and two words at least: the state must come from the last one
    full = bf._last_token_states(target, [text], 1)[0]
    from patchscope.engine.hooks import extract

    torch.testing.assert_close(full, extract(target, text, [1], [len(ids) - 1]).states[0, 0])


def test_subjects_are_read_in_the_experiments_context_and_no_placeholder_opens_a_template(setup):
    """A subject alone would put its first token at position 0, the attention sink no map is fitted on."""
    source, target, *_ = setup
    made_up = relations(3)
    data = bd.build_data(source, target, made_up, subjects_per_relation=6, words=0, identity_eval=0)
    subjects = {s.subject for relation in made_up for s in relation.samples}
    prefix = SOURCE_CONTEXT.split("{}")[0]
    read = [r.text for part in bd.SPLITS for r in data.rows[part] if r.template.startswith("rel_")]
    assert read and all(t.startswith(prefix) for t in read)
    assert {t.removeprefix(prefix) for t in read} <= subjects
    for name, template in data.templates.items():
        tokens = tokenize_template(target.tokenizer, template.template, template.filler)
        assert tokens.placeholder > len(leading_special_ids(target.tokenizer)), name


def test_validation_and_test_samples_and_the_fits_subject_texts_never_share_a_subject(setup):
    source, target, *_ = setup
    data = bd.build_data(source, target, relations(), subjects_per_relation=120, identity_eval=20)
    val = {s for _, s, _ in data.validation_samples}
    test = {s for _, s, _ in data.attribute_samples}
    assert val and test and not val & test
    fitted = set(data.subject_texts("train")) | set(data.subject_texts("validation"))
    assert fitted and all(t.startswith(SOURCE_CONTEXT.format("")) for t in fitted)
    assert not fitted & {SOURCE_CONTEXT.format(s) for s in test}
    validation_words = data.evaluation("validation")[0]
    assert validation_words and all(bd.split_of("word:" + w, 0) == "validation" for w in validation_words)
    wider = bd.build_data(
        source,
        target,
        relations(),
        subjects_per_relation=120,
        identity_eval=20,
        validation_eval_per_relation=30,
    )
    assert wider.attribute_samples == data.attribute_samples  # a wider validation set leaves test alone
    assert set(data.validation_samples) < set(wider.validation_samples)
    assert not {s for _, s, _ in wider.validation_samples} & test


def test_subject_texts_add_the_training_subjects_to_the_ridge_fit(tiny_models, tmp_path):
    source, target = tiny_models["llama"], tiny_models["qwen2"]
    data = bd.build_data(source, target, relations(), subjects_per_relation=30, words=0, identity_eval=0)
    common = dict(max_words=300, vocab_words=0, behaviour_data=data)
    plain = fit_mappings(
        source, target, [(2, 1)], "affine", WIKITEXT, MappingRegistry(tmp_path / "a"), **common
    )
    more = fit_mappings(
        source,
        target,
        [(2, 1)],
        "affine",
        WIKITEXT,
        MappingRegistry(tmp_path / "b"),
        subject_texts=True,
        **common,
    )
    # "Here is <two words>": each subject text adds at least its last word's pair to train / validation.
    for part in ("train", "validation"):
        assert more.pairs[part] >= plain.pairs[part] + len(data.subject_texts(part)) > plain.pairs[part]
    assert more.pairs["test"] == plain.pairs["test"]  # test texts stay corpus text
    assert '"subject_texts": 1' in more.infos[0].hyperparameters
    assert more.infos[0].r2 != plain.infos[0].r2


def test_the_identity_map_of_the_targets_own_state_has_zero_kl(setup):
    _, _, forwards, prepared, _ = setup
    test = prepared["test"]
    # Patching the target's own state reproduces the reference exactly (same forward, same rows).
    by_row = torch.zeros(test.x.shape[0], dtype=torch.long)
    for name, members in test.groups.items():
        cont = test.reference.continuation[members]
        with torch.no_grad():
            lp = forwards[name].logprobs(test.y[members], cont)
        assert float(bf.coarse_kl(lp, test.reference, members)) < 1e-5
        by_row[members] = 1
    assert bool(by_row.all())


def test_the_behavioural_fit_lowers_the_held_out_kl_of_its_ridge_start(setup):
    _, target, forwards, prepared, start = setup
    test = prepared["test"]
    options = bh.BehaviouralOptions(lr=3e-3, max_steps=100, eval_every=10, calibrate_norm=False)
    fitted = bh.fit_behavioural(start, target, forwards, prepared["train"], prepared["validation"], options)
    before = bh.split_kl(forwards, test, lambda x: apply(start.tensors(), x))
    after = bh.split_kl(forwards, test, lambda x: apply(fitted.tensors(), x))
    assert after < 0.95 * before, (before, after)
    assert (
        fitted.method == "behavioural"
        and fitted.hyperparameters["val_kl"] < fitted.hyperparameters["val_kl_start"]
    )
    assert all(p.grad is None for p in target.model.parameters())  # frozen: no gradient reached the model
    assert all(torch.isfinite(v).all() for v in fitted.tensors().values())


def test_the_fit_is_deterministic_with_a_seed_and_the_mlp_variant_starts_at_the_ridge_map(setup):
    _, target, forwards, prepared, start = setup
    options = bh.BehaviouralOptions(hidden=16, lr=1e-3, max_steps=20, eval_every=5)
    train, val = prepared["train"], prepared["validation"]
    one = bh.fit_behavioural(start, target, forwards, train, val, options, seed=3)
    two = bh.fit_behavioural(start, target, forwards, train, val, options, seed=3)
    assert one.tensors().keys() == two.tensors().keys() and "mlp.w1" in one.tensors()
    for key, value in one.tensors().items():
        assert torch.equal(value, two.tensors()[key]), key
    other = bh.fit_behavioural(start, target, forwards, train, val, options, seed=4)
    assert one.method == "behavioural-mlp"
    assert not torch.equal(one.tensors()["mlp.w1"], other.tensors()["mlp.w1"])
    # Zero second layer: before any step the MLP variant is the ridge map.
    model = bh.Map(start, 16, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(val.x), apply(start.tensors(), val.x))


def test_behavioural_artefacts_round_trip_their_behaviour_metrics(tiny_models, tmp_path):
    source, target = tiny_models["llama"], tiny_models["qwen2"]
    registry = MappingRegistry(tmp_path)
    options = bh.BehaviouralOptions(max_steps=10, eval_every=5, gains=(1.0, 1.5))
    report = fit_mappings(
        source,
        target,
        [(2, 1)],
        "behavioural",
        WIKITEXT,
        registry,
        max_words=400,
        vocab_words=0,
        behavioural_options=options,
        relations=relations(obj="e"),
    )
    (info,) = report.infos
    assert info.method == "behavioural" and info.has_behaviour
    assert info.attribute_n + info.identity_n > 0
    back = read_info(registry.path(info.id))
    assert back == info  # every behaviour field, counts included, survives the file
    loaded = registry.load(info.id)
    assert loaded.map(torch.zeros(1, source.facts.hidden_size)).shape == (1, target.facts.hidden_size)


def _save(registry, info, **changes):
    from dataclasses import replace

    info = replace(info, **changes)
    registry.save(
        info, {"weight": torch.zeros(info.source_dim, info.target_dim), "bias": torch.zeros(info.target_dim)}
    )
    return info


def test_auto_prefers_behaviour_metrics_over_r2(tiny_models, tmp_path):
    source, target = tiny_models["llama"], tiny_models["qwen2"]
    registry = MappingRegistry(tmp_path)
    (base,) = fit_mappings(
        source, target, [(2, 1)], "affine", WIKITEXT, registry, max_words=300, vocab_words=0
    ).infos
    assert not base.has_behaviour  # affine records no behaviour unless asked
    high_r2 = _save(registry, base, id="hi-r2", r2=0.99)
    plain = resolve_mappings(registry, source, target, [(2, 1)])
    assert plain.describe(2, 1)[0] == high_r2.id  # without behaviour metrics, R² decides
    weak = dict(identity_n=50, attribute_n=40, unpatched_share=0.1, attribute_reference=0.9)
    _save(registry, base, id="behaves-a", r2=0.2, identity_rate=0.5, attribute_accuracy=0.3, **weak)
    _save(registry, base, id="behaves-b", r2=0.1, identity_rate=0.6, attribute_accuracy=0.6, **weak)
    chosen = resolve_mappings(registry, source, target, [(2, 1)])
    assert chosen.describe(2, 1)[0] == "behaves-b"


def test_fit_mappings_trains_on_the_rows_it_is_given(tiny_models, tmp_path):
    """A caller comparing methods passes its rows; the fit must not build default-sized ones instead."""
    import json

    source, target = tiny_models["llama"], tiny_models["qwen2"]
    data = bd.build_data(source, target, relations(), subjects_per_relation=10, words=0, identity_eval=0)
    options = bh.BehaviouralOptions(max_steps=2, eval_every=1, gains=(1.0,))
    (info,) = fit_mappings(
        source,
        target,
        [(2, 1)],
        "behavioural",
        WIKITEXT,
        MappingRegistry(tmp_path),
        max_words=300,
        vocab_words=0,
        behavioural_options=options,
        behaviour_eval=False,
        behaviour_data=data,
    ).infos
    hyper = json.loads(info.hyperparameters)
    assert hyper["train_rows"] == len(data.rows["train"]) == 40  # 10 subjects × 2 relations × 2 templates
    assert hyper["val_rows"] == len(data.rows["validation"])


def test_a_mixed_batch_loss_is_the_row_weighted_mean_of_each_templates_kl(setup):
    """Batches mix templates: one forward per template present, each weighted by its share of the rows."""
    _, _, forwards, prepared, start = setup
    train = prepared["train"]
    of_row, names = bh.template_of_rows(train)
    first, second = names[0], names[1]
    idx = torch.cat([train.groups[first][:6], train.groups[second][:3]])
    with torch.no_grad():
        mapped = apply(start.tensors(), train.x[idx])
        mixed = float(bh.mixed_kl(forwards, train, idx, mapped, of_row[idx], names, None))
        parts = []
        for name, rows in ((first, idx[:6]), (second, idx[6:])):
            cont = train.reference.continuation[rows]
            lp = forwards[name].logprobs(apply(start.tensors(), train.x[rows]), cont)
            parts.append(float(bf.coarse_kl(lp, train.reference, rows)))
    assert len(set(of_row[idx].tolist())) == 2
    assert mixed == pytest.approx((6 * parts[0] + 3 * parts[1]) / 9, rel=1e-5)
