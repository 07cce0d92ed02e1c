"""Batched patched generation with a shared prefix cache.

One call runs many rows; rows with the same template form one batch with no padding. The prompt pass
starts from the cached prefix (the tokens before the earliest patched position), applies every row's
patches, and decoding continues from the KV cache without hooks: later tokens see the patch only through
the cache, as the method prescribes.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from patchscope.engine.errors import InvalidArgument
from patchscope.engine.hooks import patching
from patchscope.engine.kv_cache import KVCache, cache_kwarg, transformers_cache
from patchscope.engine.models.lean_cache import LeanCache
from patchscope.engine.models.loading import LoadedModel
from patchscope.engine.patch import Patch
from patchscope.engine.runtime import TargetRuntime
from patchscope.engine.template import TemplateTokens, tokenize_template
from patchscope.engine.timings import Timings
from patchscope.engine.validation import (
    check_layers,
    check_positions,
    check_positive,
    check_probability,
    check_vector,
)

MAX_NEW_TOKENS = 512
MAX_STOP = 8  # stop sequences of one request: each is searched in every row's text after every token
MAX_STOP_CHARS = 64


@dataclass(frozen=True)
class RowPatch:
    """One patch of a row: `vector` ([d]) replaces block `layer`'s output at `position`.

    `position` None means the template's placeholder, the usual site.
    """

    layer: int
    vector: torch.Tensor
    position: int | None = None


@dataclass(frozen=True)
class PatchedRow:
    """A template with the placeholder `{}`, the filler that stands in it, and the patches to apply."""

    template: str
    filler: str
    patches: tuple[RowPatch, ...]


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding options; greedy unless `temperature` > 0.

    `stop`: a row also ends at the first token after which its text contains one of these strings; the
    explanation is the text before the earliest of them.
    """

    max_new_tokens: int = 10
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def validate(self, prefix: str = "") -> None:
        """`prefix` places the fields in the caller's request (the service says `target.generation.`)."""
        check_positive(f"{prefix}max_new_tokens", self.max_new_tokens, MAX_NEW_TOKENS)
        if len(self.stop) > MAX_STOP:
            raise InvalidArgument(
                f"{prefix}stop", "too many stop sequences", limit=f"<= {MAX_STOP}", value=len(self.stop)
            )
        for k, text in enumerate(self.stop):
            if not isinstance(text, str) or not text or len(text) > MAX_STOP_CHARS:
                raise InvalidArgument(
                    f"{prefix}stop[{k}]",
                    "must be a non-empty string",
                    limit=f"1..{MAX_STOP_CHARS} characters",
                    value=len(text) if isinstance(text, str) else type(text).__name__,
                )
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidArgument(
                f"{prefix}temperature", "out of range", limit="0 (greedy) .. 100", value=self.temperature
            )
        check_probability(f"{prefix}top_p", self.top_p)


@dataclass
class GeneratedRow:
    """The continuation of one row; `text` drops special tokens and strips nothing."""

    token_ids: list[int]
    text: str
    scores: torch.Tensor | None = None  # [steps, V] float32 logits, only when asked for


@dataclass(frozen=True)
class Step:
    """One decoding step of one batch: `token_ids[k]` is the next token of row `rows[k]`."""

    rows: list[int]
    token_ids: list[int]
    finished: list[bool]
    logits: torch.Tensor | None = field(default=None, repr=False)  # [B, V]
    # Rows whose text now contains a stop sequence: their token is kept and the row ends with it.
    ended: list[bool] | None = None


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` before the earliest stop sequence in it, and whether there was one."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


class StopMatcher:
    """Per row, whether its decoded text has reached a stop sequence (one decode per token and row)."""

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: dict[int, list[int]] = {}

    def add(self, row: int, token_id: int) -> bool:
        if not self.stop:
            return False
        ids = self.ids.setdefault(row, [])
        ids.append(token_id)
        return cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), self.stop)[1]


def new_cache(target: TargetRuntime) -> KVCache:
    """An empty KV cache of the kind the runtime's forward writes (the placed kind for a split model)."""
    return LeanCache() if target.lean is not None else transformers_cache(target.model.model)


def normed_states(
    target: TargetRuntime,
    ids: torch.Tensor,
    kv: KVCache,
    patches: Sequence[Patch] = (),
    *,
    identical_rows: bool = False,
    last_only: bool = True,
) -> torch.Tensor:
    """Final-normed states of the last position ([B, d]), or of every new one ([B, t, d]), after `ids`.

    The runtime's forward: the lean one where it has it (`identical_rows`: see `LeanDecoder.forward`),
    else the base model, which ends with the final norm, with `patches` (absolute positions) hooked in.
    """
    if target.lean is not None:
        return target.lean.forward(ids, kv, patches, identical_rows=identical_rows, last_only=last_only)
    base = target.model.model.base_model
    with patching(target.model.layout, patches, offset=kv.get_seq_length()):
        hidden = base(ids, use_cache=True, **{cache_kwarg(type(base)): kv}).last_hidden_state  # [B, t, d]
    return hidden[:, -1] if last_only else hidden


def _forward(
    target: TargetRuntime,
    ids: torch.Tensor,
    kv: KVCache,
    patches: Sequence[Patch] = (),
    *,
    identical_rows: bool = False,
) -> torch.Tensor:
    """Logits of the last position only ([B, V]), with `patches` applied (absolute positions).

    The head runs here, not the causal-LM wrapper: the wrapper adds measurable per-step overhead on the
    CPU, and only the last position's logits are ever needed.
    """
    normed = normed_states(target, ids, kv, patches, identical_rows=identical_rows)
    return target.model.layout.unembed_normed(normed).float()


def stop_ids(target: LoadedModel) -> set[int]:
    """The token ids that end a row: the tokenizer's EOS and any the generation config adds."""
    ids = {target.tokenizer.eos_token_id}
    eos = getattr(target.model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if i is not None}


def _next_tokens(
    logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None
) -> torch.Tensor:
    if config.temperature == 0.0:
        return logits.argmax(dim=-1)  # [B]
    probs = torch.softmax(logits / config.temperature, dim=-1)  # [B, V]
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > config.top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _resolve(target: LoadedModel, rows: Sequence[PatchedRow]) -> list[tuple[TemplateTokens, list[Patch]]]:
    """Tokenise templates and check every patch before any model runs."""
    facts = target.facts
    resolved = []
    for r, row in enumerate(rows):
        tokens = tokenize_template(target.tokenizer, row.template, row.filler)
        patches = []
        for k, rp in enumerate(row.patches):
            field_name = f"rows[{r}].patches[{k}]"
            (layer,) = check_layers(f"{field_name}.layer", [rp.layer], facts)
            position = tokens.placeholder if rp.position is None else rp.position
            (position,) = check_positions(f"{field_name}.position", [position], len(tokens.ids))
            check_vector(f"{field_name}.vector", rp.vector, facts)
            patches.append(Patch(row=r, position=position, layer=layer, vector=rp.vector))
        resolved.append((tokens, patches))
    return resolved


def _run_batch(
    target: TargetRuntime,
    tokens: TemplateTokens,
    rows: list[int],
    patches: list[Patch],
    config: GenerationConfig,
    use_prefix_cache: bool,
    keep_logits: bool,
    timings: Timings,
    dropped: Callable[[int], bool] | None = None,
) -> Iterator[Step]:
    """Generate for rows sharing one template; patches carry their row index within this batch."""
    greedy_batch = config.temperature == 0.0 and not keep_logits and dropped is None and not config.stop
    if target.static_decoder is not None and greedy_batch:
        yield from _run_static_batch(target, tokens, rows, patches, config, timings)
        return
    batch, device = len(rows), target.model.device
    ids = torch.tensor(tokens.ids, device=device)  # [T]
    # Tokens before the earliest patched position are identical in every row: share their KV cache.
    shared = min([tokens.prefix_len, *(p.position for p in patches)]) if use_prefix_cache else 0

    def compute_prefix() -> KVCache:
        kv = new_cache(target)
        _forward(target, ids[None, :shared], kv)
        return kv

    started = time.perf_counter()
    if shared > 0:
        kv = target.prefix_cache.take(tokens.ids[:shared], batch, compute_prefix)
    else:
        kv = new_cache(target)
    # Every row has the same ids and the same (prefix) cache until its patches.
    logits = _forward(target, ids[shared:].expand(batch, -1), kv, patches, identical_rows=True)  # [B, V]
    timings.prefill_s += time.perf_counter() - started

    started = time.perf_counter()
    generator = None
    if config.temperature > 0.0:
        generator = torch.Generator(device=device)
        generator.manual_seed(config.seed if config.seed is not None else torch.seed())
    stop = torch.tensor(sorted(stop_ids(target.model)), device=device)
    matcher = StopMatcher(target.model.tokenizer, config.stop)
    live = list(range(batch))  # rows still decoding, in the KV cache's batch order
    for step in range(config.max_new_tokens):
        next_ids = _next_tokens(logits, config, generator)  # [len(live)]
        next_list, done = next_ids.tolist(), torch.isin(next_ids, stop).tolist()  # one device sync per step
        ended = [not d and matcher.add(k, t) for k, t, d in zip(live, next_list, done, strict=True)]
        # Counted before each yield, so a row's finished event carries its decoding time, and the time the
        # caller spends between steps is not counted as decoding.
        timings.decode_s += time.perf_counter() - started
        yield Step(
            rows=[rows[k] for k in live],
            token_ids=next_list,
            finished=done,
            logits=logits if keep_logits else None,
            ended=ended if config.stop else None,
        )
        started = time.perf_counter()
        # Finished rows and rows whose caller went away leave the batch: later steps cost only the rest.
        keep = [
            j
            for j, k in enumerate(live)
            if not done[j] and not ended[j] and not (dropped is not None and dropped(rows[k]))
        ]
        if not keep or step == config.max_new_tokens - 1:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep, device=device)
            kv.batch_select_indices(index)
            next_ids, live = next_ids[index], [live[j] for j in keep]
        logits = _forward(target, next_ids[:, None], kv)
    timings.decode_s += time.perf_counter() - started


def _run_static_batch(
    target: TargetRuntime,
    tokens: TemplateTokens,
    rows: list[int],
    patches: list[Patch],
    config: GenerationConfig,
    timings: Timings,
) -> Iterator[Step]:
    """The same steps as `_run_batch` for greedy decoding, computed by the static decoder in one go."""
    started = time.perf_counter()
    prefilled = started

    def on_prefilled() -> None:
        nonlocal prefilled
        if target.model.device.type == "cuda":
            torch.cuda.synchronize(target.model.device)
        prefilled = time.perf_counter()

    decoder = target.static_decoder
    out = decoder.generate(tokens.ids, patches, len(rows), config.max_new_tokens, on_prefilled).tolist()
    timings.prefill_s += prefilled - started
    timings.decode_s += time.perf_counter() - prefilled
    stop = stop_ids(target.model)
    live = list(range(len(rows)))  # rows not yet finished, as the eager path reports them
    for step in range(config.max_new_tokens):
        token_ids = [out[k][step] for k in live]
        done = [t in stop for t in token_ids]
        yield Step(rows=[rows[k] for k in live], token_ids=token_ids, finished=done)
        live = [k for k, d in zip(live, done, strict=True) if not d]
        if not live:
            break


@torch.inference_mode()
def iter_patched_generate(
    target: TargetRuntime,
    rows: Sequence[PatchedRow],
    config: GenerationConfig = GenerationConfig(),
    *,
    use_prefix_cache: bool = True,
    keep_logits: bool = False,
    timings: Timings | None = None,
    dropped: Callable[[int], bool] | None = None,
) -> Iterator[Step]:
    """Stream decoding steps of all rows; rows of one template are one batch, batches run in turn.

    `dropped(row)` is asked after every step: rows for which it is true stop decoding (a caller that
    cancelled), so cancellation takes effect within one step.
    """
    config.validate()
    if not rows:
        raise InvalidArgument("rows", "must contain at least one row", limit=">= 1")
    resolved = _resolve(target.model, rows)
    groups: dict[TemplateTokens, list[int]] = defaultdict(list)
    for r, (tokens, _) in enumerate(resolved):
        groups[tokens].append(r)
    timings = timings if timings is not None else Timings()
    for tokens, members in groups.items():
        local = {r: k for k, r in enumerate(members)}
        patches = [
            Patch(row=local[r], position=p.position, layer=p.layer, vector=p.vector)
            for r in members
            for p in resolved[r][1]
        ]
        yield from _run_batch(
            target, tokens, members, patches, config, use_prefix_cache, keep_logits, timings, dropped
        )


def patched_generate(
    target: TargetRuntime,
    rows: Sequence[PatchedRow],
    config: GenerationConfig = GenerationConfig(),
    *,
    use_prefix_cache: bool = True,
    return_scores: bool = False,
    timings: Timings | None = None,
) -> list[GeneratedRow]:
    """Run every row to completion; the result list is in the order of `rows`."""
    token_ids: list[list[int]] = [[] for _ in rows]
    logits: list[list[torch.Tensor]] = [[] for _ in rows]
    for step in iter_patched_generate(
        target, rows, config, use_prefix_cache=use_prefix_cache, keep_logits=return_scores, timings=timings
    ):
        for k, (row, token, done) in enumerate(zip(step.rows, step.token_ids, step.finished, strict=True)):
            if not done:
                token_ids[row].append(token)
            if step.logits is not None:
                logits[row].append(step.logits[k].cpu())
    tokenizer = target.model.tokenizer
    return [
        GeneratedRow(
            token_ids=ids,
            text=cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), config.stop)[0],
            scores=torch.stack(logits[r]) if return_scores and logits[r] else None,
        )
        for r, ids in enumerate(token_ids)
    ]
