"""The SourceModel deployment: extracts hidden states of the source models it hosts.

States leave as float32 CPU tensors (a CUDA tensor would arrive on the caller's `cuda:0` or fail where
there is no GPU). Model work runs on one worker thread, so calls queue instead of racing on the model; a
long prompt's pass runs in chunks of `batching.prefill_chunk_tokens` positions (serve/chunked.py), so a
caller that leaves frees the thread within one chunk and other calls run between chunks.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from ray import serve
from transformers import PreTrainedTokenizerBase

from patchscope.engine.hooks import HiddenStates, iter_extract
from patchscope.engine.template import prompt_tokens
from patchscope.serve.chunked import run_chunked
from patchscope.serve.hosting import Hosted, ModelCard, rss_bytes


@serve.deployment(name="SourceModel", max_ongoing_requests=64)
class SourceModel:
    """Hosts the config's `sources:`; one replica per GPU (`num_gpus: 1`) or on the CPU."""

    def __init__(self, config: dict) -> None:
        self.hosted = Hosted.start(config, "sources")
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="source")
        self.chunk_tokens = self.hosted.config.batching.prefill_chunk_tokens

    def list_cards(self) -> list[ModelCard]:
        return list(self.hosted.cards.values())

    def stats(self) -> dict[str, object]:
        return {"rss_bytes": rss_bytes()}

    def tokenize(self, model_id: str, prompt: str) -> list[str]:
        """The prompt's tokens as `extract` sees them: the ingress plans with them before any model runs."""
        return prompt_tokens(self.hosted.model(model_id).tokenizer, prompt)

    def tokenizer(self, model_id: str) -> PreTrainedTokenizerBase:
        """The hosted model's own tokenizer, for an ingress that tokenizes prompts without a call per request.

        It crosses as Ray's own serialisation (a handle call inside the cluster), once per ingress replica.
        """
        return self.hosted.model(model_id).tokenizer

    async def extract(
        self, model_id: str, prompt: str, layers: list[int], positions: list[int] | None
    ) -> HiddenStates:
        model = self.hosted.model(model_id)
        work = iter_extract(model, prompt, layers, positions, chunk_tokens=self.chunk_tokens)
        return await run_chunked(self.executor, work)
