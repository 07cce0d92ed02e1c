"""Rebuild bench/data/heldout_nouns.txt from bench/data/noun_candidates.txt.

Keeps the candidates that are one token (with a leading space) in both default tokenizers and never occur
as a word in the fit corpus, so the cross-model identity test asks about words no mapping has seen.
"""

from __future__ import annotations

import re
from pathlib import Path

from patchscope.data import data_root
from patchscope.engine.models import ModelRegistry

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from transformers import AutoTokenizer

    data = data_root()
    corpus_words = set(re.findall(r"[a-z]+", (data / "wikitext-2" / "valid.txt").read_text().lower()))
    registry = ModelRegistry()
    tokenizers = [AutoTokenizer.from_pretrained(registry.prepare(m)) for m in ("smollm2-135m", "gemma3-270m")]
    candidates = (ROOT / "bench" / "data" / "noun_candidates.txt").read_text().split()
    kept = [
        w
        for w in candidates
        if w not in corpus_words
        and all(len(t(" " + w, add_special_tokens=False).input_ids) == 1 for t in tokenizers)
    ]
    (ROOT / "bench" / "data" / "heldout_nouns.txt").write_text("\n".join(kept) + "\n")
    print(f"{len(kept)} of {len(candidates)} candidates kept")


if __name__ == "__main__":
    main()
