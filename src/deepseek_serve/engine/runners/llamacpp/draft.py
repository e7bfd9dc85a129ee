"""The draft model of speculative decoding: a second, smaller llama.cpp model of the same tokenizer,
with its own context beside the target's, that guesses the next tokens of several sequences at once.

The draft context uses the target's sequence ids and keeps, per id, the tokens whose KV it holds. A
guess first catches the draft up with the sequence (only what differs from what it holds: the prompt
once, then the tokens accepted since the last guess), then decodes greedily, one batched step per
guessed position for all sequences together. Greedy guesses are a deterministic function of the
text, so the target keeps a guess exactly when it would have drawn that token itself (see
engine/speculative.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import llama_cpp as lc
import numpy as np

from deepseek_serve.engine.runners.common import common_prefix_len
from deepseek_serve.engine.runners.llamacpp.backend import create_context, load_model
from deepseek_serve.engine.runners.llamacpp.batch import TokenBatch
from deepseek_serve.engine.runners.llamacpp.tokenizer import LlamaCppTokenizer
from deepseek_serve.engine.speculative import StepCost


class TokenizerMismatchError(ValueError):
    """The draft model does not share the target model's tokenizer."""


def check_same_tokenizer(target: LlamaCppTokenizer, draft: LlamaCppTokenizer, draft_path: Path) -> None:
    """Raise TokenizerMismatchError unless both vocabularies have the same size and the same text for a
    spread sample of ids (every ~500th, the last 64, where special tokens live, and the end tokens)."""
    n = target.vocab_size
    if draft.vocab_size != n:
        raise TokenizerMismatchError(
            f"the draft model {draft_path} has a vocabulary of {draft.vocab_size} tokens and the served "
            f"model {n}: speculative decoding needs a draft model with the same tokenizer "
            "(e.g. a smaller model of the same family)"
        )
    sample = sorted(set(range(0, n, max(1, n // 300))) | set(range(max(0, n - 64), n)) | set(target.eos_token_ids))
    for token in sample:
        mine, theirs = target.token_text(token), draft.token_text(token)
        if mine != theirs:
            raise TokenizerMismatchError(
                f"the draft model {draft_path} and the served model disagree on token {token} "
                f"({theirs!r} vs {mine!r}): speculative decoding needs a draft model with the same tokenizer"
            )
    if set(draft.eos_token_ids) != set(target.eos_token_ids):
        raise TokenizerMismatchError(f"the draft model {draft_path} has other end-of-generation tokens")


class DraftModel:
    """A draft model and its context: `propose` guesses for several sequences in batched steps."""

    def __init__(
        self,
        model_path: Path,
        target: LlamaCppTokenizer,
        *,
        n_ctx: int,
        n_slots: int,
        chunk_tokens: int,
        max_batch: int,
        n_threads: int,
        flash_attn: bool,
        repack: bool,
        allow_amx: bool,
    ) -> None:
        self._model = load_model(model_path, repack, allow_amx)
        try:
            check_same_tokenizer(target, LlamaCppTokenizer(self._model), model_path)
            self._chunk = chunk_tokens
            n_batch = chunk_tokens + max_batch
            self.ctx = create_context(
                self._model,
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_seq_max=n_slots,
                n_threads=n_threads,
                flash_attn=flash_attn,
            )
        except BaseException:
            lc.llama_model_free(self._model)
            raise
        self._mem = lc.llama_get_memory(self.ctx)
        self.batch = TokenBatch(n_batch, 1)
        self._n_vocab = target.vocab_size
        self._held: list[list[int]] = [[] for _ in range(n_slots)]  # per sequence id: tokens whose KV is here
        self.model_path = model_path
        self.size_bytes = model_path.stat().st_size
        self.tokens_computed = 0
        self.step_cost = StepCost()  # the wall time of its steps, by token count
        self._open = True

    def propose(self, requests: list[tuple[int, list[int], int]]) -> list[list[int]]:
        """Greedy guesses for each (sequence id, all its tokens, k): up to k tokens each.

        A sequence whose catch-up does not fit this step's chunk budget gets no guess (its catch-up
        goes on at its next step)."""
        budget = self._chunk
        runs: list[tuple[list[int], int, int]] = []
        ready: list[int] = []  # requests fully caught up: their run's last row gives the first guess
        for r, (slot, tokens, _) in enumerate(requests):
            held = self._held[slot]
            keep = min(common_prefix_len(held, tokens), len(tokens) - 1)  # the last token is always fed
            if keep < len(held):
                lc.llama_memory_seq_rm(self._mem, slot, keep, -1)
                del held[keep:]
            feed = tokens[keep:]
            take = min(len(feed), max(budget, 1))
            budget -= take
            runs.append((feed[:take], keep, slot))
            held.extend(feed[:take])
            if take == len(feed):
                ready.append(r)
        rows = self._decode(runs)
        guesses: list[list[int]] = [[] for _ in requests]
        live = []  # requests still guessing: (request index, row of its last logits)
        for r, row in zip(range(len(requests)), rows, strict=True):
            if r in ready:
                live.append((r, row))
        while live:
            steps: list[tuple[list[int], int, int]] = []
            going = []
            for r, row in live:
                slot, tokens, k = requests[r]
                token = self._argmax(row)
                guesses[r].append(token)
                if len(guesses[r]) < k:
                    steps.append(([token], len(self._held[slot]), slot))
                    self._held[slot].append(token)
                    going.append(r)
            if not steps:
                break
            live = list(zip(going, self._decode(steps), strict=True))
        return guesses

    def _decode(self, runs: list[tuple[list[int], int, int]]) -> list[int]:
        rows = self.batch.write(runs)
        t0 = time.perf_counter()
        rc = lc.llama_decode(self.ctx, self.batch.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode of the draft model failed with code {rc}")
        lc.llama_synchronize(self.ctx)
        self.step_cost.observe(self.batch.num_tokens, time.perf_counter() - t0)
        self.tokens_computed += self.batch.num_tokens
        return rows

    def _argmax(self, row: int) -> int:
        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, row), shape=(self._n_vocab,))
        return int(logits.argmax())

    def forget(self, slot: int) -> None:
        """Drop what the draft holds for a sequence id (its sequence ended)."""
        if self._held[slot]:
            lc.llama_memory_seq_rm(self._mem, slot, -1, -1)
            self._held[slot] = []

    def close(self) -> None:
        if self._open:
            self._open = False
            self.batch.free()
            lc.llama_free(self.ctx)
            lc.llama_model_free(self._model)
