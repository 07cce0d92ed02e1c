"""Next-token maps: trained on what the eval scores, they lower the held-out loss and register honestly."""

import json

import pytest
import torch
from tests.conftest import data_dir

from patchscope.engine.presets import get_preset
from patchscope.eval.common import first_token_logits
from patchscope.eval.next_token import check_held_out
from patchscope.eval.next_token_readers import sentences_of, source_states, usable_positions
from patchscope.mapping import next_token_fit as nt
from patchscope.mapping.fit import RidgeBasis, apply, fit_affine
from patchscope.mapping.pipeline import fit_mappings
from patchscope.mapping.registry import MappingRegistry
from patchscope.mapping.resolve import resolve_mappings

WIKITEXT = data_dir() / "wikitext-2" / "valid.txt"


@pytest.fixture(scope="module")
def setup(tiny_models):
    """Source tiny-llama layer 2, target tiny-qwen2 layer 1; rows from the train and test documents."""
    source, target = tiny_models["llama"], tiny_models["qwen2"]
    train = nt.prediction_rows(
        source, target, sentences_of(WIKITEXT, "fit", 0), [2], 480, per_text=16, seed=0
    )[2]
    val = nt.prediction_rows(
        source, target, sentences_of(WIKITEXT, "eval", 0), [2], 160, per_text=16, seed=1
    )[2]
    # A ridge start from the source layer to the target's layer-1 states is not needed to test the fit;
    # a least-squares map onto random targets of the right shape stands in for it.
    y = torch.randn(len(train.label), target.facts.hidden_size, generator=torch.Generator().manual_seed(0))
    start = fit_affine(RidgeBasis.of(train.x), y, val.x, y[: len(val.label)])
    forward = nt.identity_forward(target, 1)
    return source, target, forward, train, val, start, y.mean(dim=0)


def test_the_fit_trains_the_reading_the_next_token_experiment_scores(setup):
    """The identity forward the fit differentiates gives the eval's first-token log-probabilities."""
    _, target, forward, train, _, start, _ = setup
    vectors = apply(start.tensors(), train.x[:5])
    preset = get_preset("identity")
    expected = torch.stack(
        [
            lp
            for _, lp in first_token_logits(target, preset.template, preset.filler, [(1, v) for v in vectors])
        ]
    )
    with torch.no_grad():
        got = forward.logprobs(vectors)[:, 0]
    torch.testing.assert_close(got, expected[:, : got.shape[1]], atol=2e-4, rtol=1e-4)


def test_the_fit_lowers_the_held_out_cross_entropy_of_its_start_and_repeats_with_its_seed(setup):
    _, target, forward, train, val, start, y_mean = setup
    options = nt.NextTokenOptions(max_steps=40, eval_every=10, lr=3e-3, gains=(1.0,))
    fitted = nt.fit_next_token(start, target, forward, train, val, y_mean, options, seed=3)
    h = fitted.hyperparameters
    assert h["val_ce"] < h["val_ce_start"] - 0.05
    assert split_ce(forward, val, fitted) == pytest.approx(h["val_ce"], abs=1e-4)  # the best step is kept
    again = nt.fit_next_token(start, target, forward, train, val, y_mean, options, seed=3)
    torch.testing.assert_close(again.weight, fitted.weight, rtol=0, atol=0)


def split_ce(forward, rows, fitted) -> float:
    return nt.split_loss(forward, rows, lambda x: apply(fitted.tensors(), x))[0]


def test_fit_mappings_registers_next_token_maps_with_their_own_r2_and_split_seed(tiny_models, tmp_path):
    """The artefact's R² is measured on the trained weights, and eval's held-out check can read its seed."""
    source, target = tiny_models["llama"], tiny_models["qwen2"]
    registry = MappingRegistry(tmp_path)
    common = dict(max_words=600, vocab_words=0, seed=2)
    (affine,) = fit_mappings(source, target, [(2, 1)], "affine", WIKITEXT, registry, **common).infos
    options = nt.NextTokenOptions(
        train_positions=96, validation_positions=32, max_steps=4, eval_every=2, lr=3e-3
    )
    (info,) = fit_mappings(
        source, target, [(2, 1)], "next-token", WIKITEXT, registry, next_token_options=options, **common
    ).infos
    hyper = json.loads(info.hyperparameters)
    assert info.method == "next-token" and hyper["split_seed"] == 2 and hyper["train_rows"] == 96
    loaded = registry.load(info.id)
    mapping = resolve_mappings(registry, source, target, [(2, 1)], choice=info.id)
    check_held_out(mapping, WIKITEXT, 2)  # fitted on seed 2's train documents: evaluable with seed 2
    assert hyper["best_step"] > 0 and info.r2 != affine.r2  # the trained weights', not the start's
    assert loaded.info.r2 == info.r2


def test_soft_labels_lead_with_the_argmax_label_and_are_a_distribution(setup):
    *_, train, val, _, _ = setup
    for rows in (train, val):
        assert rows.soft_ids.shape == (len(rows.label), 16)
        # The label is the most likely token (an fp16 tie may order it behind an equal one).
        at_label = rows.soft_ids == rows.label[:, None]
        assert bool(at_label.any(dim=1).all())
        torch.testing.assert_close((rows.soft_probs * at_label).max(dim=1).values, rows.soft_probs[:, 0])
        torch.testing.assert_close(rows.soft_probs.sum(-1), torch.ones(len(rows.label)))
        assert bool((rows.soft_probs[:, :-1] >= rows.soft_probs[:, 1:]).all())


def test_usable_positions_counts_what_the_sampler_can_take(tiny_models):
    """The tokenizer-only count equals what `source_states` samples: all of it, and not one more."""
    source = tiny_models["llama"]
    texts = sentences_of(WIKITEXT, "fit", 0)[:12]
    held = usable_positions(source, texts, per_text=5)
    assert 0 < held < 5 * len(texts) + 1
    assert source_states(source, texts, held, per_text=5, seed=0).states.shape[1] == held
    with pytest.raises(ValueError, match=f"only {held} usable positions"):
        source_states(source, texts, held + 1, per_text=5, seed=0)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (nt.NextTokenOptions(train_positions=0), "train_positions"),
        (nt.NextTokenOptions(train_positions=10**7), r"train_positions: the train documents hold \d+"),
        (nt.NextTokenOptions(validation_positions=10**7), "validation_positions"),
    ],
)
def test_next_token_fits_asking_for_impossible_positions_are_refused_before_any_model_runs(
    tiny_models, tmp_path, monkeypatch, options, named
):
    from patchscope.engine.errors import InvalidArgument
    from patchscope.mapping import pipeline

    def no_forward(*_args, **_kwargs):
        raise AssertionError("a model ran before the options were checked")

    monkeypatch.setattr(pipeline, "collect_pairs", no_forward)
    monkeypatch.setattr(nt, "source_states", no_forward)
    source, target = tiny_models["llama"], tiny_models["qwen2"]
    with pytest.raises(InvalidArgument, match=named):
        fit_mappings(
            source,
            target,
            [(2, 1)],
            "next-token",
            WIKITEXT,
            MappingRegistry(tmp_path),
            next_token_options=options,
        )
    assert not list(tmp_path.iterdir())
