"""Mappings: fits against known relations, alignment across tokenizers, the artefact and its registry."""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.conftest import data_dir, train_tokenizer

from patchscope.engine import InvalidArgument
from patchscope.engine.runtime import TargetRuntime
from patchscope.explain import ExplainRequest, LocalBackend, TargetSpec, explain
from patchscope.mapping import artefact as artefact_module
from patchscope.mapping.align import encode, pair_positions, word_end_offsets
from patchscope.mapping.artefact import MappingCorrupt, MappingIncompatible, load_mapping, read_info
from patchscope.mapping.collect import _states
from patchscope.mapping.corpus import read_documents, split_documents
from patchscope.mapping.fit import KLTerm, RidgeBasis, apply, fit_affine, fit_learned
from patchscope.mapping.pipeline import depth_proportional, fit_mappings
from patchscope.mapping.registry import MappingNotFound, MappingRegistry
from patchscope.mapping.resolve import registry_resolver, resolve_mappings

WIKITEXT = data_dir() / "wikitext-2" / "valid.txt"


def test_affine_fit_recovers_a_known_linear_relation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 24, generator=g), torch.randn(24, generator=g)
    x = torch.randn(2000, 16, generator=g) * 3 + 1
    x_val = torch.randn(300, 16, generator=g)
    fitted = fit_affine(RidgeBasis.of(x), x @ a + b, x_val, x_val @ a + b)
    torch.testing.assert_close(fitted.weight, a, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(fitted.bias, b, atol=1e-3, rtol=1e-3)
    assert fitted.validation.r2 > 0.999999


def test_learned_fit_starts_at_affine_and_never_ends_worse_on_validation():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(8, 6, generator=g)

    def relation(x: torch.Tensor) -> torch.Tensor:  # partly non-linear; train and validation share it
        return torch.cat([x @ a, torch.tanh(3 * x[:, :2])], dim=1)

    x, x_val = torch.randn(3000, 8, generator=g), torch.randn(400, 8, generator=g)
    y, y_val = relation(x), relation(x_val)
    start = fit_affine(RidgeBasis.of(x), y, x_val, y_val)
    learned = fit_learned(start, x, y, x_val, y_val, hidden=64, max_epochs=30, patience=5)
    assert learned.validation.r2 >= start.validation.r2
    assert set(learned.mlp) == {"w1", "b1", "w2", "b2"}
    assert apply(learned.tensors(), x_val).shape == (400, 8)


def test_a_kl_term_lowers_the_validation_divergence_through_the_head_and_is_recorded():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(8, 6, generator=g)
    head = torch.randn(6, 40, generator=g) * 3  # a fixed "head" reading 40 tokens off a target state

    def relation(x: torch.Tensor) -> torch.Tensor:
        return x @ a + 0.5 * torch.tanh(4 * x[:, :6])

    x, x_val = torch.randn(3000, 8, generator=g), torch.randn(400, 8, generator=g)
    y, y_val = relation(x), relation(x_val)
    start = fit_affine(RidgeBasis.of(x), y, x_val, y_val)
    kl = KLTerm(lambda states: states @ head, weight=1.0, vocabulary=40)
    learned = fit_learned(start, x, y, x_val, y_val, hidden=64, max_epochs=30, patience=5, kl=kl)
    with torch.no_grad():
        before = float(kl(apply(start.tensors(), x_val), y_val))
        after = float(kl(apply(learned.tensors(), x_val), y_val))
    assert after < before
    assert learned.hyperparameters["kl_weight"] == 1.0 and learned.hyperparameters["kl_vocabulary"] == 40


def test_a_kl_weight_is_refused_for_methods_other_than_learned(llama, tmp_path):
    with pytest.raises(InvalidArgument, match="kl_weight"):
        fit_mappings(llama, llama, [(0, 0)], "affine", WIKITEXT, MappingRegistry(tmp_path), kl_weight=1.0)


def test_depth_proportional_layers_of_the_default_pair():
    assert [depth_proportional(layer, 30, 18) for layer in (0, 2, 6, 10, 29)] == [0, 1, 4, 6, 17]


@pytest.fixture(scope="module")
def two_tokenizers():
    return train_tokenizer(True), train_tokenizer(False, vocab=320)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.sampled_from(["The", "lobster", "swims", "quickly,", "Atlantic", "(24", "in)", "red."]),
        min_size=1,
        max_size=12,
    )
)
def test_alignment_pairs_tokens_that_end_at_the_same_word_end(two_tokenizers, words):
    text = " ".join(words)
    a, b = two_tokenizers
    ea, eb = encode(a, text), encode(b, text)
    pairs = pair_positions(ea, eb, same_tokenizer=False)
    ends = word_end_offsets(text)
    offsets_a = a(text, return_offsets_mapping=True).offset_mapping
    offsets_b = b(text, return_offsets_mapping=True).offset_mapping
    for i, j in pairs:
        assert i > 0 and j > 0
        assert offsets_a[i][1] == offsets_b[j][1] and offsets_a[i][1] in ends
    # every word end both tokenizers end a token on is paired, once
    assert (
        len({offsets_a[i][1] for i, _ in pairs})
        == len(pairs)
        == len(ea.word_ends.keys() & eb.word_ends.keys())
    )


def test_alignment_on_a_hand_made_string(two_tokenizers):
    a, b = two_tokenizers
    text = "The lobster swims"
    pairs = pair_positions(encode(a, text), encode(b, text), same_tokenizer=False)
    ids_a, ids_b = a(text).input_ids, b(text).input_ids
    for i, j in pairs:
        assert a.decode(ids_a[: i + 1], skip_special_tokens=True) == b.decode(
            ids_b[: j + 1], skip_special_tokens=True
        )
    assert a.decode(ids_a[: pairs[-1][0] + 1], skip_special_tokens=True) == text


def test_same_tokenizer_pairs_every_position_but_zero_and_specials(two_tokenizers):
    a, _ = two_tokenizers
    enc = encode(a, "The lobster swims")
    assert pair_positions(enc, enc, same_tokenizer=True) == [(i, i) for i in range(1, len(enc.ids))]


def test_corpus_splits_by_document_and_drops_unknown_words():
    split = split_documents(read_documents(WIKITEXT))
    titles = [{id(d) for d in part} for part in (split.train, split.validation, split.test)]  # titles repeat
    assert all(titles) and not (titles[0] & titles[1] or titles[0] & titles[2] or titles[1] & titles[2])
    text = " ".join(p for d in split.train for p in d.paragraphs)
    assert "<unk>" not in text and " @-@ " not in text and " , " not in text


@torch.inference_mode()
def test_batched_collection_equals_one_text_at_a_time(llama):
    texts = ["The lobster swims in the sea", "Red", "It may grow to a length of 60 cm and a mass of 6 kg"]
    seqs = [llama.tokenizer(t).input_ids for t in texts]
    positions = [list(range(1, len(s))) for s in seqs]
    batched = _states(llama, seqs, positions, [0, 2], batch_tokens=4096)
    alone = _states(llama, seqs, positions, [0, 2], batch_tokens=1)
    for x, y in zip(batched, alone, strict=True):
        for layer in (0, 2):
            torch.testing.assert_close(x[layer], y[layer], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def fitted_registry(tiny_models, tmp_path_factory):
    registry = MappingRegistry(tmp_path_factory.mktemp("mappings"))
    source, target = tiny_models["llama"], tiny_models["qwen2"]
    report = fit_mappings(
        source, target, [(1, 1), (1, 2), (3, 2)], "affine", WIKITEXT, registry, max_words=1500
    )
    return registry, report


def test_fit_writes_one_artefact_per_pair_with_metadata(fitted_registry, tiny_models):
    registry, report = fitted_registry
    ids = sorted(i.id for i in registry.scan().mappings)
    assert ids == sorted(i.id for i in report.infos) and len(ids) == 3
    info = read_info(registry.path("tiny-llama.tiny-qwen2.1-2.affine"))
    assert (info.source_layer, info.target_layer, info.source_dim, info.target_dim) == (1, 2, 64, 64)
    assert info.source_fingerprint == tiny_models["llama"].fingerprint
    assert info.pairs_train > info.pairs_test > info.pairs_validation > 0
    assert info.target_norm_p99 >= info.target_norm_mean > 0
    assert -1 < info.r2 <= 1 and info.corpus == "valid.txt"


def test_artefact_round_trips(fitted_registry):
    registry, report = fitted_registry
    path = registry.path(report.infos[0].id)
    loaded = load_mapping(path)
    assert loaded.info == report.infos[0] == read_info(path)
    x = torch.randn(5, 64)
    torch.testing.assert_close(loaded.map(x), x @ loaded.tensors["weight"] + loaded.tensors["bias"])


def test_mismatched_fingerprint_or_size_is_refused(fitted_registry, tiny_models):
    registry, report = fitted_registry
    loaded = registry.load(report.infos[0].id)
    with pytest.raises(MappingIncompatible, match="fitted on a source model with fingerprint"):
        loaded.check(tiny_models["mistral"], tiny_models["qwen2"])
    with pytest.raises(MappingIncompatible, match="takes states of size 64, got 32"):
        loaded.map(torch.zeros(32))


def test_corrupt_and_truncated_files_are_reported_and_leave_the_registry_intact(fitted_registry, tmp_path):
    registry, report = fitted_registry
    good = registry.path(report.infos[0].id)
    copy = MappingRegistry(tmp_path)
    copy.path("good").write_bytes(good.read_bytes())
    copy.path("garbage").write_bytes(b"not a safetensors file at all")
    copy.path("truncated").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    listing = copy.scan()
    assert [m.id for m in listing.mappings] == [report.infos[0].id]
    assert sorted(name for name, _ in listing.unreadable) == ["garbage.safetensors", "truncated.safetensors"]
    for bad in ("garbage", "truncated"):
        with pytest.raises(MappingCorrupt, match=bad):
            copy.load(bad)
    assert copy.load("good").info == report.infos[0]


def test_interrupted_write_keeps_the_old_file_and_leaves_no_temp(fitted_registry, tmp_path, monkeypatch):
    registry, report = fitted_registry
    info = report.infos[0]
    target = MappingRegistry(tmp_path)
    target.save(info, registry.load(info.id).tensors)
    before = target.path(info.id).read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(artefact_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        target.save(info, {"weight": torch.zeros(64, 64), "bias": torch.zeros(64)})
    assert target.path(info.id).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [f"{info.id}.safetensors"]


def test_ids_cannot_name_paths(tmp_path):
    registry = MappingRegistry(tmp_path)
    for bad in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(MappingNotFound):
            registry.load(bad)


def test_explain_through_resolved_mappings_reports_id_and_r2(fitted_registry, tiny_models):
    registry, report = fitted_registry
    source, target = tiny_models["llama"], tiny_models["qwen2"]
    request = ExplainRequest(
        source=source.id, prompt="The lobster", layers=(1, 3), target=TargetSpec(model=target.id, layers=(2,))
    )
    backend = LocalBackend.of(source, TargetRuntime.build(target))
    results = explain(backend, request, registry_resolver(registry)).results
    by_id = {i.id: i.r2 for i in report.infos}
    assert [r.mapping_id for r in results] == [
        "tiny-llama.tiny-qwen2.1-2.affine",
        "tiny-llama.tiny-qwen2.3-2.affine",
    ]
    assert [r.mapping_r2 for r in results] == [by_id[r.mapping_id] for r in results]


def test_missing_mapping_names_the_fit_command(fitted_registry, tiny_models):
    registry, _ = fitted_registry
    with pytest.raises(
        MappingNotFound, match=r"patchscope fit-mapping --source tiny-llama --target tiny-qwen2 --pairs 0:3"
    ):
        resolve_mappings(registry, tiny_models["llama"], tiny_models["qwen2"], [(0, 3), (1, 1)])


def test_vocabulary_texts_add_training_pairs_and_respect_exclusions(tiny_models, tmp_path):
    from patchscope.mapping.collect import shared_words
    from patchscope.mapping.corpus import CARRIERS, vocabulary_texts

    source, target = tiny_models["llama"], tiny_models["qwen2"]
    words = shared_words(source, target, exclude=set())
    assert words and all(w.isalpha() and w.islower() and len(w) >= 4 for w in words)
    assert words[0] not in shared_words(source, target, exclude={words[0]})
    texts = vocabulary_texts(words, 10, seed=1)
    assert len(texts) == min(10, len(words))
    assert all(any(t == c.format(t.rsplit(" ", 1)[-1]) for c in CARRIERS) for t in texts)
    assert "I saw the {}" not in CARRIERS  # the identity benchmark's source prompt stays out of training
    plain = fit_mappings(
        source, target, [(1, 1)], "affine", WIKITEXT, MappingRegistry(tmp_path / "a"), max_words=800
    )
    more = fit_mappings(
        source,
        target,
        [(1, 1)],
        "affine",
        WIKITEXT,
        MappingRegistry(tmp_path / "b"),
        max_words=800,
        vocab_words=40,
    )
    assert more.pairs["train"] > plain.pairs["train"] and more.pairs["test"] == plain.pairs["test"]
    assert '"vocab_words": 40' in more.infos[0].hyperparameters
