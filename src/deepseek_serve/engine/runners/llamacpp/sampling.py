"""Sampling over llama.cpp's logits.

Sampling runs in llama.cpp's native sampler chains (one chain per sequence, own seed), except plain
temperature sampling over the whole vocabulary, which `TemperatureSampler` does in numpy, and plain
greedy picks, an argmax straight over the logits row; so the per-token Python work is filling the
batch and one call per sequence.

Constrained decoding (`SamplingParams.grammar`, GBNF) uses llama.cpp's grammar sampler outside the
chain: the chain picks a token from the unconstrained candidates, the grammar checks that one token,
and only when it rejects it are all candidates masked by the grammar and the chain run again.
Masking the whole vocabulary costs milliseconds per token; checking one token costs microseconds,
and the model usually proposes a valid token (the same scheme as llama.cpp's common sampler).
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import llama_cpp as lc
import numpy as np

from deepseek_serve.engine.runners import SampleResult
from deepseek_serve.engine.runners.llamacpp.tokenizer import LlamaCppTokenizer
from deepseek_serve.engine.types import SamplingParams, TokenLogprob


def make_sampler_chain(p: SamplingParams, n_vocab: int) -> lc.llama_sampler_p:
    """A native sampler chain with its own random stream (seeded when `p.seed` is set)."""
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    if p.logit_bias:
        biases = (lc.llama_logit_bias * len(p.logit_bias))()
        for i, (token, bias) in enumerate(p.logit_bias):
            if not 0 <= token < n_vocab:
                lc.llama_sampler_free(chain)
                raise ValueError(f"logit_bias token id {token} is outside the vocabulary [0, {n_vocab})")
            biases[i].token = token  # type: ignore[assignment]  # ctypes converts the int
            biases[i].bias = bias
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_logit_bias(n_vocab, len(p.logit_bias), biases))
    if p.has_penalties:
        lc.llama_sampler_chain_add(
            chain,
            lc.llama_sampler_init_penalties(
                n_vocab, p.penalty_last_n, p.repetition_penalty, p.frequency_penalty, p.presence_penalty
            ),
        )
    if p.is_greedy:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        return chain
    if p.top_k > 0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(min(p.top_k, n_vocab)))
    if p.top_p < 1.0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(p.top_p, 1))
    if p.min_p > 0.0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(p.min_p, 1))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(p.temperature))
    seed = lc.LLAMA_DEFAULT_SEED if p.seed is None else p.seed % 0xFFFFFFFF
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
    return chain


def make_grammar_sampler(vocab: lc.llama_vocab_p, grammar: str) -> lc.llama_sampler_p:
    """llama.cpp's grammar sampler for a GBNF text whose start rule is `root`."""
    sampler = lc.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise ValueError("the grammar could not be parsed")
    return sampler


_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


def uses_temperature_sampler(p: SamplingParams) -> bool:
    """Plain temperature sampling (no top-k/top-p/min-p cut, penalties, logit bias or grammar):
    `TemperatureSampler`."""
    return (
        not p.is_greedy
        and not p.has_penalties
        and not p.logit_bias
        and p.grammar is None
        and p.top_k == 0
        and p.top_p >= 1.0
        and p.min_p == 0.0
    )


class TemperatureSampler:
    """An exact draw from softmax(logits / temperature) over the whole vocabulary, with its own random
    stream (seeded when `seed` is given).

    llama.cpp's chain (temperature -> dist) copies the vocabulary into a candidates array and
    exponentiates it one entry at a time: ~1.2 ms per token for a 151,936-entry vocabulary, on the
    engine thread while the compute threads wait. Here the exponentials are vectorized and the
    inverse-CDF search runs over block sums, then inside one block (~0.15 ms).
    """

    BLOCK = 1024

    def __init__(self, temperature: float, seed: int | None, n_vocab: int) -> None:
        self._scale = np.float32(1.0 / temperature)
        self._rng = np.random.default_rng(None if seed is None else seed % (1 << 64))
        self._n = n_vocab
        self._buf = np.zeros(-(-n_vocab // self.BLOCK) * self.BLOCK, dtype=np.float32)  # tail stays 0

    def sample(self, logits: np.ndarray) -> int:
        z = self._buf[: self._n]
        np.multiply(logits, self._scale, out=z)
        z -= z.max()
        np.exp(z, out=z)
        blocks = self._buf.reshape(-1, self.BLOCK).sum(axis=1, dtype=np.float64)
        cumulative = np.cumsum(blocks)
        u = self._rng.random() * cumulative[-1]
        b = min(int(np.searchsorted(cumulative, u, side="right")), len(blocks) - 1)
        if b:
            u -= cumulative[b - 1]
        block = self._buf[b * self.BLOCK : (b + 1) * self.BLOCK]
        i = int(np.searchsorted(np.cumsum(block, dtype=np.float64), u, side="right"))
        last = int(np.flatnonzero(block)[-1])  # rounding may run past the block's last non-zero weight
        return b * self.BLOCK + min(i, last)


@dataclass(eq=False)
class SequenceSamplers:
    """One sequence's samplers: `fast` (plain temperature) or the native `chain`, and the `grammar`
    sampler of constrained decoding."""

    chain: lc.llama_sampler_p | None = None
    grammar: lc.llama_sampler_p | None = None
    fast: TemperatureSampler | None = None

    @classmethod
    def for_params(cls, p: SamplingParams, tokenizer: LlamaCppTokenizer) -> SequenceSamplers:
        """Raises ValueError for parameters the native samplers refuse (nothing is left allocated)."""
        n_vocab = tokenizer.vocab_size
        fast = TemperatureSampler(p.temperature, p.seed, n_vocab) if uses_temperature_sampler(p) else None
        chain = None if fast else make_sampler_chain(p, n_vocab)  # first: it may refuse the params
        grammar = None
        if p.grammar is not None:
            try:
                grammar = make_grammar_sampler(tokenizer.vocab, p.grammar)
            except ValueError:
                if chain is not None:
                    lc.llama_sampler_free(chain)
                raise
        return cls(chain, grammar, fast)

    def free(self) -> None:
        if self.chain is not None:
            lc.llama_sampler_free(self.chain)
            self.chain = None
        if self.grammar is not None:
            lc.llama_sampler_free(self.grammar)
            self.grammar = None
        self.fast = None


class LogitsSampler:
    """Picks tokens from the logits rows of a context's last decode, and computes their logprobs."""

    def __init__(self, ctx: lc.llama_context_p, tokenizer: LlamaCppTokenizer) -> None:
        self._ctx = ctx
        self._tokenizer = tokenizer
        self._n_vocab = tokenizer.vocab_size
        # candidates for constrained sampling: one llama_token_data per vocabulary entry, plus one
        self._cand = (lc.llama_token_data * self._n_vocab)()
        self._cand_np = np.frombuffer(memoryview(self._cand), dtype=_TOKEN_DATA)
        self._cand_ids = np.arange(self._n_vocab, dtype=np.int32)
        self._one = (lc.llama_token_data * 1)()

    def sample(self, samplers: SequenceSamplers, params: SamplingParams, idx: int) -> SampleResult:
        """The token for logits row `idx` (with its logprob when `params.logprobs`)."""
        if samplers.grammar is not None:
            token = self._sample_constrained(samplers, idx)
        elif params.is_greedy and not params.has_penalties and not params.logit_bias:
            # argmax straight over the logits row: ~8 us instead of ~90 us for the native greedy
            # sampler, which first copies the whole vocabulary into a candidates array (same first-max pick)
            token = int(self._logits_row(idx).argmax())
        elif samplers.fast is not None:
            token = samplers.fast.sample(self._logits_row(idx))
        else:
            if samplers.chain is None:
                raise RuntimeError("the sequence has no sampler")
            token = lc.llama_sampler_sample(samplers.chain, self._ctx, idx)
        if not 0 <= token < self._n_vocab:
            raise RuntimeError(f"the sampler returned token id {token}")
        logprob = self.logprob(idx, token, params.top_logprobs) if params.logprobs else None
        return SampleResult(token, logprob)

    def sample_run(
        self, samplers: SequenceSamplers, params: SamplingParams, first_row: int, guesses: list[int]
    ) -> list[SampleResult]:
        """Speculative verification: sample row `first_row`, and while the token drawn equals the guess
        fed at that row's next position, the row after it. Returns the tokens drawn: the accepted
        guesses, then the first token that differs from its guess (or follows the last guess). Each
        draw is the one plain decoding makes at that position (same sampler state and random stream)."""
        drawn: list[SampleResult] = []
        for j in range(len(guesses) + 1):
            result = self.sample(samplers, params, first_row + j)
            drawn.append(result)
            if j == len(guesses) or result.token_id != guesses[j]:
                break
        return drawn

    def _fill_candidates(self, idx: int) -> lc.llama_token_data_array:
        row = lc.llama_get_logits_ith(self._ctx, idx)
        self._cand_np["id"] = self._cand_ids
        self._cand_np["logit"] = np.ctypeslib.as_array(row, shape=(self._n_vocab,))
        self._cand_np["p"] = 0.0
        return lc.llama_token_data_array(self._cand, self._n_vocab, -1, False)

    def _grammar_allows(self, grammar: lc.llama_sampler_p, token: int) -> bool:
        one = self._one
        one[0].id = token  # type: ignore[assignment]  # ctypes converts the int
        one[0].logit = 0.0
        one[0].p = 0.0
        arr = lc.llama_token_data_array(one, 1, -1, False)
        lc.llama_sampler_apply(grammar, ctypes.byref(arr))
        return math.isfinite(one[0].logit)

    def _sample_constrained(self, samplers: SequenceSamplers, idx: int) -> int:
        """A token the grammar allows: the chain's unconstrained pick when the grammar accepts it,
        else the chain's pick among the grammar-masked candidates. Both samplers then accept it (a
        token the grammar rejects must never reach `accept`: llama.cpp throws, which aborts)."""
        chain, grammar = samplers.chain, samplers.grammar
        assert chain is not None and grammar is not None
        arr = self._fill_candidates(idx)
        lc.llama_sampler_apply(chain, ctypes.byref(arr))
        token = int(arr.data[arr.selected].id) if 0 <= arr.selected < arr.size else -1
        if token < 0 or not self._grammar_allows(grammar, token):
            arr = self._fill_candidates(idx)
            lc.llama_sampler_apply(grammar, ctypes.byref(arr))
            lc.llama_sampler_apply(chain, ctypes.byref(arr))
            if not 0 <= arr.selected < arr.size:
                raise RuntimeError("the grammar allows no token")
            token = int(arr.data[arr.selected].id)  # samplers may sort the array (or point it elsewhere)
            if not self._grammar_allows(grammar, token):
                raise RuntimeError("the grammar allows no token")
        lc.llama_sampler_accept(grammar, token)
        lc.llama_sampler_accept(chain, token)
        return token

    def _logits_row(self, idx: int) -> np.ndarray:
        return np.ctypeslib.as_array(lc.llama_get_logits_ith(self._ctx, idx), shape=(self._n_vocab,))

    def logprob(self, idx: int, token: int, top_n: int) -> TokenLogprob:
        logits = self._logits_row(idx).astype(np.float64)
        m = logits.max()
        lse = m + math.log(np.exp(logits - m).sum())
        tok = self._tokenizer
        top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()
        top_n = min(top_n, self._n_vocab - 1)
        if top_n > 0:
            ids = np.argpartition(-logits, top_n)[:top_n]
            ids = ids[np.argsort(-logits[ids])]
            top = tuple((tok.token_text(int(t)), float(logits[t] - lse), tuple(tok.token_bytes(int(t)))) for t in ids)
        return TokenLogprob(
            token_id=token,
            token=tok.token_text(token),
            logprob=float(logits[token] - lse),
            bytes=tuple(tok.token_bytes(token)),
            top=top,
        )
