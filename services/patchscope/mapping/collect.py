"""Paired hidden states of two models over a corpus: one pass per model and text, all layers at once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from patchscope.engine.hooks import capture
from patchscope.engine.models import LoadedModel
from patchscope.mapping.align import encode, pair_positions

MAX_TOKENS = 1024
CHUNK = 64  # texts per progress update
CHUNK = 64  # texts per progress update


@dataclass
class PairedStates:
    """`source[i]` ([N, d_s]) is paired row by row with `target[j]` ([N, d_t]) for every layer requested."""

    source: dict[int, torch.Tensor]
    target: dict[int, torch.Tensor]
    words: int

    @property
    def num_pairs(self) -> int:
        return next(iter(self.source.values())).shape[0]


def shared_words(a: LoadedModel, b: LoadedModel, exclude: set[str]) -> list[str]:
    """Lower-case alphabetic words (4+ letters) that are one token, after a space, in both tokenizers."""
    found = []
    for word in sorted({t.lstrip("Ġ▁") for t in a.tokenizer.get_vocab()}):
        if len(word) < 4 or not (word.isalpha() and word.islower()) or word in exclude:
            continue
        if all(len(m.tokenizer(" " + word, add_special_tokens=False).input_ids) == 1 for m in (a, b)):
            found.append(word)
    return found


def same_tokenizer(a: LoadedModel, b: LoadedModel) -> bool:
    return a.tokenizer_fingerprint == b.tokenizer_fingerprint


@torch.inference_mode()
def _states(
    model: LoadedModel,
    seqs: list[list[int]],
    positions: list[list[int]],
    layers: list[int],
    batch_tokens: int,
) -> list[dict[int, torch.Tensor]]:
    """States at `positions[i]` of `seqs[i]` for every layer, in batches of similar length.

    Rows are right-padded: causal attention keeps every real token blind to the padding after it, so no
    attention mask is needed and each row's states equal those of an unpadded pass.
    """
    out: list[dict[int, torch.Tensor]] = [{} for _ in seqs]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * len(seqs[order[end]]) <= batch_tokens:
            end += 1
        members = order[start:end]
        width = len(seqs[members[-1]])
        ids = torch.zeros(len(members), width, dtype=torch.long)  # [B, T]
        for row, i in enumerate(members):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
        captured = capture(model, ids.to(model.device), layers)
        for row, i in enumerate(members):
            out[i] = {layer: captured[layer][row, positions[i]].to("cpu", torch.float32) for layer in layers}
        start = end
    return out


def collect_pairs(
    source: LoadedModel,
    target: LoadedModel,
    texts: list[str],
    source_layers: list[int],
    target_layers: list[int],
    progress: Callable[[int], None] = lambda _: None,
    *,
    batch_tokens: int = 4096,
) -> PairedStates:
    """States of both models at aligned positions of every text; `progress(k)` as texts are done."""
    same = same_tokenizer(source, target)
    src_seqs, tgt_seqs, src_pos, tgt_pos = [], [], [], []
    words = 0
    for text in texts:
        src_enc, tgt_enc = encode(source.tokenizer, text), encode(target.tokenizer, text)
        pairs = pair_positions(src_enc, tgt_enc, same_tokenizer=same)
        pairs = [(i, j) for i, j in pairs if max(i, j) < MAX_TOKENS]
        if pairs:
            words += len(text.split())
            src_seqs.append(src_enc.ids[:MAX_TOKENS])
            tgt_seqs.append(tgt_enc.ids[:MAX_TOKENS])
            src_pos.append([i for i, _ in pairs])
            tgt_pos.append([j for _, j in pairs])
    if not src_seqs:
        raise ValueError("the corpus yielded no aligned positions")
    src_states: list[dict[int, torch.Tensor]] = []
    tgt_states: list[dict[int, torch.Tensor]] = []
    for start in range(0, len(src_seqs), CHUNK):  # chunks keep the progress display moving
        stop = start + CHUNK
        src_states += _states(source, src_seqs[start:stop], src_pos[start:stop], source_layers, batch_tokens)
        tgt_states += _states(target, tgt_seqs[start:stop], tgt_pos[start:stop], target_layers, batch_tokens)
        progress(min(stop, len(src_seqs)))
    return PairedStates(
        source={layer: torch.cat([s[layer] for s in src_states]) for layer in source_layers},
        target={layer: torch.cat([s[layer] for s in tgt_states]) for layer in target_layers},
        words=words,
    )
