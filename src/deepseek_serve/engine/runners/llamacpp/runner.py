"""LlamaCppRunner: GGUF models on CPU through llama.cpp behind the engine's `Runner`.

One context with a unified KV cache shared by all sequences, one sequence id per slot (`slots`);
each step's tokens go into one llama_batch (`batch`), prompt prefixes shared between sequences
written once; sampling is native or numpy (`sampling`). With speculative decoding on (`speculative`,
`draft`), decoding sequences may carry guessed tokens in the same batch.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import llama_cpp as lc

from deepseek_serve.engine.runners import Runner, SampleResult, ScheduledSeq
from deepseek_serve.engine.runners.common import entry_refusal, split_refused
from deepseek_serve.engine.runners.llamacpp.backend import (
    create_context,
    load_model,
    model_chat_template,
    model_metadata,
    physical_cores,
)
from deepseek_serve.engine.runners.llamacpp.batch import TokenBatch
from deepseek_serve.engine.runners.llamacpp.draft import DraftModel
from deepseek_serve.engine.runners.llamacpp.sampling import GrammarFactory, LogitsSampler, SequenceSamplers
from deepseek_serve.engine.runners.llamacpp.slots import SlotPool
from deepseek_serve.engine.runners.llamacpp.speculative import Speculator
from deepseek_serve.engine.runners.llamacpp.tokenizer import LlamaCppTokenizer
from deepseek_serve.engine.sequence import Sequence
from deepseek_serve.engine.speculative import SpeculativeConfig

if TYPE_CHECKING:
    from deepseek_serve.config import Settings

logger = logging.getLogger(__name__)


def resolve_draft_model(settings: Settings) -> Path:
    """`settings.draft_model` resolved like `settings.model` (pack name, GGUF file, hub id); a GGUF file."""
    from deepseek_serve.models.resolve import resolve_model

    if not settings.draft_model:
        raise ValueError("DS_SPECULATIVE=draft needs DS_DRAFT_MODEL (a GGUF file or a model-pack name)")
    model = resolve_model(
        settings.draft_model,
        cache_dir=settings.models_dir,
        source=settings.model_source,
        index_url=settings.pack_index_url,
    )
    if model.format != "gguf":
        raise ValueError(f"DS_DRAFT_MODEL must be a GGUF model for the llama.cpp runner, not {model.path}")
    return model.path


class LlamaCppRunner(Runner):
    name = "llamacpp"
    supports_grammar = True

    def __init__(
        self,
        model_path: Path,
        *,
        context_length: int = 8192,
        max_batch_size: int = 8,
        max_model_len: int = 0,
        n_threads: int = 0,
        prefill_chunk_tokens: int = 512,
        prefix_cache: bool = True,
        prefix_cache_tokens: int = 4096,
        flash_attn: bool = True,
        repack: bool = True,
        allow_amx: bool = False,
        grammar_engine: str = "llguidance",
        speculative: SpeculativeConfig | None = None,
        draft_model_path: Path | None = None,
    ) -> None:
        spec = speculative if speculative is not None and speculative.enabled else None
        if spec is not None and spec.mode == "draft" and draft_model_path is None:
            raise ValueError("DS_SPECULATIVE=draft needs a draft model (DS_DRAFT_MODEL)")
        self._model = load_model(model_path, repack, allow_amx)
        self._tokenizer = LlamaCppTokenizer(self._model)
        self._n_vocab = self._tokenizer.vocab_size
        self.n_ctx_train = lc.llama_model_n_ctx_train(self._model)
        self._max_batch = max_batch_size
        # sequence ids beyond the batch keep finished sequences' KV for prefix reuse
        n_slots = min(max_batch_size * 2 if prefix_cache else max_batch_size, 255)
        n_batch = prefill_chunk_tokens + max_batch_size
        if spec is not None:  # room for every speculating sequence's guesses
            n_batch += min(max_batch_size, spec.max_batch) * spec.max_draft_tokens
        threads = n_threads or physical_cores()
        self._ctx = create_context(
            self._model,
            n_ctx=context_length,
            n_batch=n_batch,
            n_seq_max=n_slots,
            n_threads=threads,
            flash_attn=flash_attn,
        )
        self.n_threads = threads
        self._n_ctx = lc.llama_n_ctx(self._ctx)
        limit = max_model_len or self.n_ctx_train or self._n_ctx
        self._max_model_len = min(limit, self._n_ctx)
        self._batch = TokenBatch(n_batch, n_slots)
        self._sampler = LogitsSampler(self._ctx, self._tokenizer)
        self._grammars = GrammarFactory(self._tokenizer, grammar_engine)
        self._speculator: Speculator | None = None
        draft = None
        if spec is not None:
            if spec.mode == "draft":
                assert draft_model_path is not None
                try:
                    draft = DraftModel(
                        draft_model_path,
                        self._tokenizer,
                        # its idle entries follow the target's; each id may hold k-1 guesses beyond
                        n_ctx=self._n_ctx + n_slots * spec.max_draft_tokens,
                        n_slots=n_slots,
                        chunk_tokens=prefill_chunk_tokens,
                        max_batch=max_batch_size,
                        n_threads=threads,
                        flash_attn=flash_attn,
                        repack=repack,
                        allow_amx=allow_amx,
                    )
                except BaseException:  # e.g. another tokenizer: free what is loaded, then refuse to start
                    self._batch.free()
                    lc.llama_free(self._ctx)
                    lc.llama_model_free(self._model)
                    raise
            logger.info(
                "speculative decoding: %s (k <= %d, up to %d decoding sequences)%s",
                spec.mode,
                spec.max_draft_tokens,
                spec.max_batch,
                f", draft model {draft_model_path}" if draft is not None else "",
            )
            self._speculator = Speculator(
                spec,
                lc.llama_get_memory(self._ctx),
                self._sampler,
                self._max_model_len,
                draft,
            )
            if spec.adaptive:
                self._speculator.calibrate(self._ctx, self._batch, self._n_vocab // 2)
                logger.info("step cost, batch tokens: ms: %s", self._speculator.step_cost.describe())
        on_clear = draft.forget if draft is not None else None
        self._slots = SlotPool(
            lc.llama_get_memory(self._ctx), n_slots, self._n_ctx, prefix_cache, prefix_cache_tokens, on_clear
        )
        self.tokens_computed = 0  # tokens fed to llama_decode so far (shared prompt tokens count once)
        self._chat_template = model_chat_template(self._model)
        self.model_path = model_path
        self._open = True  # until close() frees the native objects

    @classmethod
    def from_settings(cls, settings: Settings, model_path: Path) -> LlamaCppRunner:
        """Load a GGUF file with `settings.context_length/max_batch_size/max_model_len/n_threads/
        prefill_chunk_tokens/prefix_cache/prefix_cache_tokens/llama_repack/llama_amx/grammar_engine` and the
        speculative settings (`speculative*`, `draft_model`, resolved like `model`)."""
        draft_path = None
        if settings.speculative == "draft":
            draft_path = resolve_draft_model(settings)
        return cls(
            model_path,
            context_length=settings.context_length,
            max_batch_size=settings.max_batch_size,
            max_model_len=settings.max_model_len,
            n_threads=settings.n_threads,
            prefill_chunk_tokens=settings.prefill_chunk_tokens,
            prefix_cache=settings.prefix_cache,
            prefix_cache_tokens=settings.prefix_cache_tokens,
            repack=settings.llama_repack,
            allow_amx=settings.llama_amx,
            grammar_engine=settings.grammar_engine,
            speculative=SpeculativeConfig.from_settings(settings),
            draft_model_path=draft_path,
        )

    # --- Runner properties -------------------------------------------------------------------------
    @property
    def tokenizer(self) -> LlamaCppTokenizer:
        return self._tokenizer

    @property
    def max_num_seqs(self) -> int:
        return self._max_batch

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def kv_capacity_tokens(self) -> int:
        return self._n_ctx

    @property
    def kv_used_tokens(self) -> int:
        return self._slots.reserved

    @property
    def kv_cached_tokens(self) -> int:
        return self._slots.cached_tokens

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def metadata(self, key: str) -> str | None:
        return model_metadata(self._model, key)

    # --- admission ----------------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence) -> bool:
        return self._slots.can_allocate(seq)

    def allocate(self, seq: Sequence) -> int:
        # first: it may refuse the params
        samplers = SequenceSamplers.for_params(seq.params, self._tokenizer, self._grammars)
        cached = self._slots.allocate(seq, samplers)
        if self._speculator is not None:
            self._speculator.start(seq)
        return cached

    def free(self, seq: Sequence) -> None:
        if self._speculator is not None and seq.slot is not None:
            self._speculator.stop(seq.slot)
        self._slots.free(seq)

    def speculative_counts(self) -> tuple[tuple[str, int, int], ...]:
        return self._speculator.counters.snapshot() if self._speculator is not None else ()

    def clear_prefix_cache(self) -> int:
        return self._slots.clear_idle()

    def cached_prefixes(self) -> list[tuple[int, ...] | list[int]]:
        return self._slots.cached_prefixes()

    # --- forward ------------------------------------------------------------------------------------
    def step(self, batch: list[ScheduledSeq]) -> list[SampleResult | None]:
        planned = 0  # tokens before sharing: an upper bound of what the batch gets written

        def refusal(item: ScheduledSeq) -> str | None:
            nonlocal planned
            k = item.num_new_tokens
            reason = entry_refusal(item, self._n_ctx, self._n_vocab)
            if reason is None and planned + k > self._batch.capacity:
                reason = f"{k} new tokens do not fit the batch of {self._batch.capacity}"
            if reason is None:
                planned += k
            return reason

        results, accepted = split_refused(batch, refusal)
        if not accepted:
            return results
        guesses: dict[int, list[int]] = {}
        if self._speculator is not None:
            guesses = self._speculator.guesses(batch, accepted, planned, self._batch.capacity - planned)
        out_index = self._batch.fill(
            [batch[i] for i in accepted], {j: guesses[i] for j, i in enumerate(accepted) if i in guesses}
        )
        t0 = time.perf_counter()
        rc = lc.llama_decode(self._ctx, self._batch.batch)
        if rc == 1:
            # no contiguous KV room: drop the prefix cache and retry once
            self._slots.clear_idle()
            rc = lc.llama_decode(self._ctx, self._batch.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")
        if self._speculator is not None:  # the price of a step by its token count
            lc.llama_synchronize(self._ctx)
            self._speculator.observe_step(self._batch.num_tokens, time.perf_counter() - t0)
        self.tokens_computed += self._batch.num_tokens
        for i, idx in zip(accepted, out_index, strict=True):
            item = batch[i]
            start = item.seq.num_computed_tokens
            item.seq.num_computed_tokens += item.num_new_tokens
            if not item.sample:
                continue
            try:
                if i in guesses:
                    assert self._speculator is not None
                    results[i] = self._speculator.verify(item.seq, self._samplers(item.seq), idx, guesses[i], start)
                else:
                    results[i] = self._sample(item.seq, idx)
            except Exception as exc:  # this sequence alone: its sampler or logprobs failed
                logger.exception("sampling failed for %s", item.seq.request_id)
                results[i] = SampleResult.failed(f"sampling failed: {exc}")
        return results

    def _samplers(self, seq: Sequence) -> SequenceSamplers:
        assert seq.slot is not None
        samplers = self._slots.slots[seq.slot].samplers
        if samplers is None:
            raise RuntimeError("the sequence has no sampler")
        return samplers

    def _sample(self, seq: Sequence, idx: int) -> SampleResult:
        return self._sampler.sample(self._samplers(seq), seq.params, idx, seq.output_token_ids)

    def close(self) -> None:
        if getattr(self, "_open", False):
            self._open = False
            if self._speculator is not None:
                self._speculator.close()
            self._batch.free()
            lc.llama_free(self._ctx)
            lc.llama_model_free(self._model)
