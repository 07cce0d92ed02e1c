"""One small affine map on the real default pair, fitted on real text, used for a real explanation."""

import pytest
from tests.conftest import data_dir

from patchscope.engine import ExplainRequest, explain
from patchscope.mapping.pipeline import fit_mappings
from patchscope.mapping.registry import MappingRegistry
from patchscope.mapping.resolve import resolve_mappings

pytestmark = pytest.mark.realmodel


def test_small_affine_map_on_the_default_pair_explains_obama(smollm2, gemma3, tmp_path):
    registry = MappingRegistry(tmp_path)
    corpus = data_dir() / "wikitext-2" / "valid.txt"
    report = fit_mappings(smollm2, gemma3, [(2, 1)], "affine", corpus, registry, max_words=3000)
    (info,) = report.infos
    assert info.pairs_train > 1000 and info.r2 > 0.5, info
    mapping = resolve_mappings(registry, smollm2, gemma3, [(2, 1)])
    (result,) = explain(
        smollm2, gemma3, ExplainRequest(prompt="Barack Obama", layers=[2], target_layers=[1]), mapping
    ).results
    assert result.answer.lower() == "obama", result.explanation
    assert result.mapping_id == "smollm2-135m.gemma3-270m.2-1.affine" and result.mapping_r2 == info.r2
