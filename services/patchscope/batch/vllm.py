"""vLLM's hidden-state dumps, and how its layer ids map onto this project's layer numbering.

vLLM (0.18+) writes hidden states with the `extract_hidden_states` speculative method and its
`ExampleHiddenStatesConnector`: one `{request id}.safetensors` per request holding `token_ids` [T] and
`hidden_states` [T, layers, hidden] (in the model's dtype) for the ids configured as
`eagle_aux_hidden_state_layer_ids`. The file carries no metadata, so the job is told those ids.

Which state an id means: vLLM's decoder loop records id 0 before the first block (the embeddings) and id
k after block k−1, as `hidden_states + residual`, i.e. the un-normed residual stream leaving block k−1;
id L (the last block's output) is taken before the final norm. This project's layer ℓ is the raw output
of block ℓ, so vLLM id k is layer k − 1, and id 0 has no counterpart (no block output). A unit test pins
this on a tiny model: a dump built from the residual stream entering each block (and the final norm)
equals `extract` at the mapped layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from patchscope.batch.inputs import InputLimits, Reader, Refused
from patchscope.engine.errors import InvalidArgument


def layer_of_vllm_id(layer_id: int, num_layers: int) -> int:
    """Our layer for vLLM aux id `layer_id` of a model with `num_layers` blocks."""
    if not 1 <= layer_id <= num_layers:
        raise InvalidArgument(
            "--vllm-layers",
            "vLLM layer id out of range (id 0 is the embeddings, no block's output; id k is block k-1's)",
            limit=f"1..{num_layers}",
            value=layer_id,
        )
    return layer_id - 1


def resolve_positions(spec: Sequence[int] | str, length: int) -> list[int]:
    """Absolute positions of a `length`-token prompt: `all`, or indices (negative from the end)."""
    if spec == "all":
        return list(range(length))
    resolved = []
    for p in spec:
        if not -length <= p < length:
            raise Refused(f"position {p} out of range for a prompt of {length} tokens")
        resolved.append(p % length)
    return resolved


def vllm_reader(
    layer_ids: Sequence[int],
    num_layers: int,
    positions: Sequence[int] | str,
    decode: Callable[[int], str],
    vocab_size: int,
) -> Reader:
    """A reader of vLLM dumps whose layer axis holds `layer_ids` (vLLM's ids, in the configured order).

    Rows are layer-major (every chosen position of the first layer, then the next), as `extract` orders
    them; tokens are decoded with the source's tokenizer, so a dump from another vocabulary shows.
    """
    layers = [layer_of_vllm_id(i, num_layers) for i in layer_ids]

    def read(path: str, handle, limits: InputLimits) -> dict:
        hidden = handle.get_tensor("hidden_states")
        token_ids = handle.get_tensor("token_ids")
        if hidden.ndim != 3:
            raise Refused(f"hidden_states must be [tokens, layers, hidden], got shape {list(hidden.shape)}")
        if not hidden.is_floating_point():
            raise Refused(f"hidden_states must hold floats, got {hidden.dtype}")
        if token_ids.ndim != 1 or token_ids.is_floating_point():
            raise Refused(
                f"token_ids must be a 1-D integer tensor, got {token_ids.dtype} {list(token_ids.shape)}"
            )
        t, n_layers, _ = hidden.shape
        if token_ids.shape[0] != t:
            raise Refused(f"{token_ids.shape[0]} token_ids for {t} hidden-state rows")
        if t == 0:
            raise Refused("holds no tokens")
        if n_layers != len(layers):
            raise Refused(
                f"layer axis has {n_layers} entries, but --vllm-layers names {len(layers)} "
                f"({', '.join(map(str, layer_ids))})"
            )
        if int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab_size:
            raise Refused(f"token ids outside the source's vocabulary of {vocab_size}")
        chosen = resolve_positions(positions, t)
        rows = len(chosen) * len(layers)
        if rows > limits.max_rows:
            raise Refused(f"{rows} rows, over the limit of {limits.max_rows} per file (--max-rows-per-file)")
        index = torch.tensor(chosen)
        states = hidden[index].transpose(0, 1).reshape(rows, hidden.shape[2])  # [l*p, d], layer-major
        tokens = [decode(int(token_ids[p])) for p in chosen]
        return dict(
            states=states,
            layers=tuple(layer for layer in layers for _ in chosen),
            positions=tuple(p for _ in layers for p in chosen),
            tokens=tuple(t for _ in layers for t in tokens),
            request_id=path.rsplit("/", 1)[-1].removesuffix(".safetensors"),
        )

    return read
