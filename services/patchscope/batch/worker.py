"""One part of a batch job, start to end: read its files, plan each, explain their rows in shared batches.

The worker holds the models (loaded once) and runs every row through the one Explain pipeline
(`patchscope.explain`): rows of all the part's files that share a source layer become one
`ActivationsRequest`, so the target verbalises them as one batch. Each file is planned alone first, with
the pipeline's own planning, so a file the pipeline would refuse is refused by name and never takes its
neighbours down with it. The in-process run and each Ray Data actor call the same `run_part`.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

import patchscope
from patchscope.batch.inputs import FileRows, Refusal, Refused, read_file
from patchscope.batch.options import BatchOptions
from patchscope.batch.schema import row_record, table
from patchscope.batch.vllm import vllm_reader
from patchscope.engine.errors import PatchscopeError
from patchscope.engine.generation import GenerationConfig
from patchscope.engine.models import LoadedModel, ModelRegistry, load_model
from patchscope.engine.runtime import TargetRuntime
from patchscope.explain import ActivationsRequest, LocalBackend, TargetSpec, explain, plan_activations
from patchscope.explain.local import LOCAL_LIMITS
from patchscope.explain.plan import MappingResolver, ModelInfo


def model_registry(*names: str) -> ModelRegistry:
    """The default registry plus any name that is a local model directory or GGUF file."""
    registry = ModelRegistry()
    for name in names:
        if name not in registry.ids() and Path(name).exists():
            registry.register(name, name)
    return registry


def cached(resolve: MappingResolver) -> MappingResolver:
    """The resolver, loading each set of layer pairs once per job (every file is planned with it)."""

    @functools.lru_cache(maxsize=256)
    def by_key(key: tuple) -> object:
        source, target, pairs, choice = key
        return resolve(source, target, list(pairs), choice)

    def resolve_once(source: ModelInfo, target: ModelInfo, pairs, choice: str):
        return by_key((source, target, tuple(sorted(set(pairs))), choice))

    return resolve_once


@dataclass(frozen=True)
class _Row:
    file: int  # index into the part's accepted files
    row: int


class Worker:
    """The models of one job, loaded once, and the code that turns a part's files into table rows."""

    def __init__(
        self,
        options: BatchOptions,
        source: LoadedModel,
        target: TargetRuntime,
        resolve: MappingResolver,
    ) -> None:
        self.options = options
        self.source = source
        self.target = target
        self.backend = LocalBackend([source], [target])
        self.resolve = cached(resolve)
        self.source_info = self.backend.infos[source.id]  # read once, by the backend's warm-up
        self.target_info = self.backend.infos[target.model.id]
        # Rows of one file and of one batch are requests of the pipeline: its site limit must admit them.
        sites = max(LOCAL_LIMITS.max_sites, options.max_rows_per_file, options.batch_rows)
        self.limits = LOCAL_LIMITS.model_copy(update={"max_sites": sites})
        self.vllm = None
        if options.vllm_layers:
            tokenizer = source.tokenizer
            self.vllm = vllm_reader(
                options.vllm_layers,
                source.facts.num_layers,
                "all" if options.positions is None else options.positions,
                lambda token_id: tokenizer.decode([token_id]),
                source.facts.vocab_size,
            )

    @classmethod
    def load(cls, options: BatchOptions) -> Worker:
        """Load the source and target named by `options` (one model when they are the same)."""
        from patchscope.mapping.registry import MappingRegistry
        from patchscope.mapping.resolve import registry_resolver

        torch.manual_seed(0)
        registry = model_registry(options.source, options.target)
        load_by_id = functools.partial(
            load_model, registry=registry, dtype=options.dtype, device=options.device
        )
        source = load_by_id(options.source)
        target = source if options.target == options.source else load_by_id(options.target)
        resolve = registry_resolver(MappingRegistry(options.registry))
        return cls(options, source, TargetRuntime.build(target), resolve)

    def _spec(self, source_layer: int) -> TargetSpec:
        target_layer = self.options.target_layer(source_layer)
        return TargetSpec(
            model=self.target_info.id,
            preset=self.options.preset,
            template=self.options.template,
            layers=() if target_layer is None else (target_layer,),
            mapping=self.options.mapping,
            generation=GenerationConfig(max_new_tokens=self.options.max_new_tokens),
            top_k=self.options.top_k,
        )

    def _request(self, states: torch.Tensor, layer: int, positions, tokens) -> ActivationsRequest:
        """Rows of one source layer as one request of the pipeline ([n, d] states, one entry per row)."""
        return ActivationsRequest(
            source=self.source_info.id,
            states=states,
            target=self._spec(layer),
            layers=(layer,),
            positions=tuple(-1 if p is None else p for p in positions),
            tokens=tuple(tokens),
            fingerprint=self.source_info.fingerprint,
        )

    def check(self, rows: FileRows) -> None:
        """Plan every row of the file as the pipeline would (pure, no model runs); Refused if it fails."""
        if rows.fingerprint and rows.fingerprint != self.source_info.fingerprint:
            if not self.options.allow_other_weights:
                raise Refused(
                    f"fingerprint {rows.fingerprint[:12]}… is not {self.source_info.id}'s "
                    f"({self.source_info.fingerprint[:12]}…): states of other weights "
                    "(--allow-other-weights explains them, flagged)"
                )
        by_layer: dict[int, list[int]] = defaultdict(list)
        for i, layer in enumerate(rows.layers):
            by_layer[layer].append(i)
        try:
            for layer, index in by_layer.items():
                num_layers = self.source_info.facts.num_layers
                if not 0 <= layer < num_layers:
                    raise Refused(
                        f"layer {layer} out of range for {self.source_info.id} (0..{num_layers - 1})"
                    )
                request = self._request(
                    rows.states[index],
                    layer,
                    [rows.positions[i] for i in index],
                    [rows.tokens[i] for i in index],
                )
                plan_activations(request, self.source_info, self.target_info, self.limits, self.resolve)
        except PatchscopeError as error:
            raise Refused(str(error)) from None

    def read(self, files: Sequence[str]) -> tuple[list[FileRows], list[Refusal]]:
        accepted, refused = [], []
        for path in files:
            try:
                rows = read_file(
                    path,
                    self.options.format,
                    self.options.limits,
                    vllm=self.vllm,
                    hidden_size=self.source_info.facts.hidden_size,
                )
                self.check(rows)
            except Refused as error:
                refused.append(Refusal(path, str(error)))
                continue
            accepted.append(rows)
        return accepted, refused

    def run_part(self, files: Sequence[str]) -> tuple[pa.Table, list[Refusal]]:
        """The table rows of `files` (file order, then row order) and the files refused."""
        accepted, refused = self.read(files)
        groups: dict[int, list[_Row]] = defaultdict(list)
        for f, rows in enumerate(accepted):
            for i, layer in enumerate(rows.layers):
                groups[layer].append(_Row(f, i))
        records: dict[_Row, dict] = {}
        step = self.options.batch_rows
        for layer in sorted(groups):
            members = groups[layer]
            for begin in range(0, len(members), step):
                batch = members[begin : begin + step]
                self._explain(accepted, layer, batch, records)
        ordered = [records[_Row(f, i)] for f, rows in enumerate(accepted) for i in range(len(rows))]
        return table(ordered), refused

    def _explain(self, accepted: list[FileRows], layer: int, batch: list[_Row], out: dict) -> None:
        request = self._request(
            torch.stack([accepted[r.file].states[r.row] for r in batch]),  # [n, d]
            layer,
            [accepted[r.file].positions[r.row] for r in batch],
            [accepted[r.file].tokens[r.row] for r in batch],
        )
        result = explain(self.backend, request, self.resolve, self.limits)
        for r, site in zip(batch, result.results, strict=True):
            rows = accepted[r.file]
            out[r] = row_record(
                site,
                file=rows.file,
                sha256=rows.sha256,
                request_id=rows.request_id,
                row=r.row,
                position=rows.positions[r.row],
                token=rows.tokens[r.row],
                provenance_mismatch=bool(rows.fingerprint)
                and rows.fingerprint != self.source_info.fingerprint,
                reproduction=self._reproduction(rows, r.row, site.site.target_layer, site.mapping_id),
            )

    def _reproduction(self, rows: FileRows, row: int, target_layer: int, mapping_id: str | None) -> dict:
        o = self.options
        return {
            "patchscope": patchscope.__version__,
            "input": {"file": rows.file, "sha256": rows.sha256, "format": rows.format, "row": row},
            "source": {"id": self.source_info.id, "fingerprint": self.source_info.fingerprint},
            "target": {"id": self.target_info.id, "fingerprint": self.target_info.fingerprint},
            "preset": o.preset,
            "template": o.template,
            "target_layer": target_layer,
            "mapping": mapping_id or o.mapping,
            "generation": {"max_new_tokens": o.max_new_tokens, "greedy": True},
            "top_k": o.top_k,
            "dtype": o.dtype,
        }
