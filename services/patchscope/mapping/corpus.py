"""Reading a text corpus into documents and splitting it by document, never by token.

WikiText-2 is stored tokenised (spaces around punctuation, `@-@`, `<unk>`); it is detokenised here and the
sentences with `<unk>` are dropped (dropping whole lines would leave almost nothing).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

_HEADING = re.compile(r"^ = [^=].* = $")
_SUBHEADING = re.compile(r"^ (= )+.*( =)+ $")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_DETOK = [
    (" @-@ ", "-"),
    (" @,@ ", ","),
    (" @.@ ", "."),
    (" , ", ", "),
    (" . ", ". "),
    (" ; ", "; "),
    (" : ", ": "),
    (" 's ", "'s "),
    (" n't", "n't"),
    ("( ", "("),
    (" )", ")"),
]


@dataclass(frozen=True)
class Document:
    """One article: its title and its paragraphs (already clean text)."""

    title: str
    paragraphs: tuple[str, ...]

    @property
    def words(self) -> int:
        return sum(len(p.split()) for p in self.paragraphs)


@dataclass(frozen=True)
class Split:
    """Documents for fitting, choosing hyperparameters and reporting metrics."""

    train: tuple[Document, ...]
    validation: tuple[Document, ...]
    test: tuple[Document, ...]


def detokenise(line: str) -> str:
    text = f" {line.strip()} "
    for old, new in _DETOK:
        text = text.replace(old, new)
    text = re.sub(r'" ([^"]*?) "', r'"\1"', text)
    text = re.sub(r" ([.,;:!?])$", r"\1", text.strip())
    return text.strip()


def clean_paragraph(line: str) -> str:
    """Detokenised text of one line without the sentences that contain `<unk>`."""
    sentences = _SENTENCE_END.split(detokenise(line))
    return " ".join(s for s in sentences if s and "<unk>" not in s)


def read_documents(path: Path) -> list[Document]:
    """Documents of a text file.

    In a WikiText-style file ` = Title = ` starts a document; any other file is one document per
    blank-line-separated block.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    if not any(_HEADING.match(line) for line in lines):
        blocks = re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))
        return [Document(f"block {i}", (b.strip(),)) for i, b in enumerate(blocks) if b.strip()]
    documents: list[Document] = []
    title, paragraphs = None, []
    for line in lines:
        if _HEADING.match(line):
            if title is not None and paragraphs:
                documents.append(Document(title, tuple(paragraphs)))
            title, paragraphs = line.strip(" ="), []
        elif line.strip() and not _SUBHEADING.match(line):
            paragraph = clean_paragraph(line)
            if len(paragraph.split()) >= 4:
                paragraphs.append(paragraph)
    if title is not None and paragraphs:
        documents.append(Document(title, tuple(paragraphs)))
    return documents


def split_documents(
    documents: list[Document], *, validation: float = 0.08, test: float = 0.17, seed: int = 0
) -> Split:
    """A seeded shuffle of whole documents into train / validation / test."""
    order = list(documents)
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * validation))
    n_test = max(1, round(len(order) * test))
    return Split(
        train=tuple(order[n_val + n_test :]),
        validation=tuple(order[:n_val]),
        test=tuple(order[n_val : n_val + n_test]),
    )


def take_words(documents: tuple[Document, ...], max_words: int | None) -> list[str]:
    """Paragraphs in order until `max_words` words are taken (None: all)."""
    out: list[str] = []
    total = 0
    for document in documents:
        for paragraph in document.paragraphs:
            if max_words is not None and total >= max_words:
                return out
            out.append(paragraph)
            total += len(paragraph.split())
    return out


# Short neutral contexts for vocabulary texts. The evaluation's source prompt ("I saw the {}",
# bench/bench_mapping.py) is deliberately not among them.
CARRIERS = (
    "The {}",
    "She looked at the {}",
    "There was a {}",
    "We talked about the {}",
    "His {}",
    "A {}",
    "My favourite is the {}",
    "They found the {}",
)


def vocabulary_texts(words: list[str], count: int, *, seed: int = 0) -> list[str]:
    """Short texts that end in a vocabulary word: a carrier phrase (`CARRIERS`), then the word.

    Corpus text repeats its common words; these give the map one example each of `count` more words, at
    the end of a short phrase, which is where an identity patchscope reads a word. Short carriers beat
    corpus sentence prefixes (README: 91.6% vs 83.1% cross-model identity at 2→1 with all shared words).
    """
    rng = random.Random(seed)
    chosen = rng.sample(words, min(count, len(words)))
    return [rng.choice(CARRIERS).format(w) for w in chosen]


def file_fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
