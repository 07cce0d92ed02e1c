"""Listings: hosted models and registered mappings as `ListModels` and `ListMappings` describe them."""

from __future__ import annotations

from typing import Protocol

from patchscope.mapping.artefact import MappingInfo
from patchscope.wire.proto import pb


class Card(Protocol):
    """A hosted model as `ListModels` describes it (serve/hosting.py's `ModelCard`)."""

    id: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_parameters: int
    fingerprint: str
    tokenizer_fingerprint: str
    dtype: str


def model_info_to_proto(card: Card, source: bool, target: bool) -> pb.ModelInfo:
    return pb.ModelInfo(
        id=card.id,
        source=source,
        target=target,
        architecture=card.architecture,
        num_layers=card.num_layers,
        hidden_size=card.hidden_size,
        vocab_size=card.vocab_size,
        num_parameters=card.num_parameters,
        fingerprint=card.fingerprint,
        tokenizer_fingerprint=card.tokenizer_fingerprint,
        dtype=card.dtype,
        ready=True,
    )


def mapping_info_to_proto(info: MappingInfo) -> pb.MappingInfo:
    return pb.MappingInfo(
        id=info.id,
        source=info.source_model,
        target=info.target_model,
        source_layer=info.source_layer,
        target_layer=info.target_layer,
        method=info.method,
        r2=info.r2,
        r2_mean_dim=info.r2_mean_dim,
        cosine=info.cosine,
        mse=info.mse,
        num_pairs=info.pairs_train,
        source_fingerprint=info.source_fingerprint,
        target_fingerprint=info.target_fingerprint,
        corpus_fingerprint=info.corpus_fingerprint,
    )
