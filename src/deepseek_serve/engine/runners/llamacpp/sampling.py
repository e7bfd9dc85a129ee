"""Sampling over llama.cpp's logits.

Unconstrained sampling runs in numpy, one sampler per sequence with its own random stream:
`TemperatureSampler` for plain temperature sampling over the whole vocabulary, `TruncatedSampler`
for everything else (logit bias, penalties, top-k, top-p, min-p, temperature, in the order of the
native chain that `make_sampler_chain` builds), and plain greedy picks are an argmax straight over
the logits row. llama.cpp's native chain copies the 151,936-entry vocabulary into a candidates array
and sorts it for top-p: ~1.5 ms per token on the engine thread while the compute threads wait,
against ~0.2 ms here. The native chain remains for constrained decoding.

Constrained decoding (`SamplingParams.grammar`, GBNF) uses llama.cpp's grammar sampler outside the
chain: the chain picks a token from the unconstrained candidates, the grammar checks that one token,
and only when it rejects it are all candidates masked by the grammar and the chain run again.
Masking the whole vocabulary costs milliseconds per token; checking one token costs microseconds,
and the model usually proposes a valid token (the same scheme as llama.cpp's common sampler).
With `DS_GRAMMAR_ENGINE=llguidance` (the default) the same scheme runs on llguidance:
the GBNF text goes through llguidance's GBNF-to-Lark converter, a check is `validate_tokens`, and a
full mask is its token bitmask applied to the candidates' logits, ~500x cheaper than llama.cpp's
(docs/performance.md, "Grammar engines").
"""

from __future__ import annotations

import ctypes
import math
import threading
from dataclasses import dataclass
from typing import Any

import llama_cpp as lc
import numpy as np

from deepseek_serve.engine.runners import SampleResult
from deepseek_serve.engine.runners.guidance import GuidanceMatcher, require_llguidance
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


class LlamaGrammar:
    """llama.cpp's grammar sampler behind the interface `_sample_constrained` uses."""

    def __init__(self, vocab: lc.llama_vocab_p, grammar: str) -> None:
        self._sampler: lc.llama_sampler_p | None = make_grammar_sampler(vocab, grammar)
        self._one = (lc.llama_token_data * 1)()

    def allows(self, token: int) -> bool:
        one = self._one
        one[0].id = token  # type: ignore[assignment]  # ctypes converts the int
        one[0].logit = 0.0
        one[0].p = 0.0
        arr = lc.llama_token_data_array(one, 1, -1, False)
        lc.llama_sampler_apply(self._sampler, ctypes.byref(arr))
        return math.isfinite(one[0].logit)

    def mask(self, arr: lc.llama_token_data_array, logits: np.ndarray) -> None:
        """Set the logit of every candidate the grammar rejects to -inf."""
        lc.llama_sampler_apply(self._sampler, ctypes.byref(arr))

    def accept(self, token: int) -> None:
        lc.llama_sampler_accept(self._sampler, token)

    def free(self) -> None:
        if self._sampler is not None:
            lc.llama_sampler_free(self._sampler)
            self._sampler = None


class LlguidanceGrammar(GuidanceMatcher):
    """An llguidance matcher (engine/runners/guidance.py) behind the interface `_sample_constrained` uses."""

    def mask(self, arr: lc.llama_token_data_array, logits: np.ndarray) -> None:
        """Set the logit of every token the grammar rejects to -inf (`logits` is the candidates' logit
        column, in token order)."""
        np.copyto(logits, np.float32(-np.inf), where=~self.allowed())


Grammar = LlamaGrammar | LlguidanceGrammar


def _llguidance_tokenizer(tokenizer: LlamaCppTokenizer) -> Any:
    """llguidance's tokenizer over the llama.cpp vocabulary: each token's bytes, control tokens (and
    user-defined ones that look like them, `<...>`) marked as specials with a 0xFF prefix, every
    end-of-generation token as an end token, llama.cpp's own tokenize function for forced text."""
    from llguidance import LLTokenizer

    vocab = tokenizer.vocab
    buf = ctypes.create_string_buffer(4096)
    tokens: list[bytes] = []
    for token in range(tokenizer.vocab_size):
        n = lc.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
        piece = buf.raw[: max(n, 0)]
        attr = lc.llama_vocab_get_attr(vocab, token)
        special = attr & lc.LLAMA_TOKEN_ATTR_CONTROL or (
            attr & lc.LLAMA_TOKEN_ATTR_USER_DEFINED and piece.startswith(b"<") and piece.endswith(b">")
        )
        tokens.append(b"\xff" + piece if special else piece)
    tokenize = ctypes.cast(lc.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
    return LLTokenizer.from_llamacpp(  # type: ignore[attr-defined]  # missing from the stubs of 1.9
        tokens=tokens, vocab_ptr=vocab, tokenize_fptr=tokenize, eos_token=list(tokenizer.eos_token_ids)
    )


class GrammarFactory:
    """Builds a sequence's grammar with the configured engine; llguidance's tokenizer (its token trie,
    ~1 s for a 151,936-entry vocabulary) is built once, on the first constrained request."""

    def __init__(self, tokenizer: LlamaCppTokenizer, engine: str = "llama") -> None:
        if engine not in ("llama", "llguidance"):
            raise ValueError(f"unknown grammar engine {engine!r}")
        if engine == "llguidance":
            require_llguidance("DS_GRAMMAR_ENGINE=llguidance")
        self.engine = engine
        self._tokenizer = tokenizer
        self._llg_tokenizer: Any = None
        self._lock = threading.Lock()

    def build(self, grammar: str) -> Grammar:
        if self.engine == "llama":
            return LlamaGrammar(self._tokenizer.vocab, grammar)
        with self._lock:
            if self._llg_tokenizer is None:
                self._llg_tokenizer = _llguidance_tokenizer(self._tokenizer)
        return LlguidanceGrammar(
            self._llg_tokenizer, grammar, self._tokenizer.vocab_size, self._tokenizer.eos_token_ids
        )


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


class TruncatedSampler:
    """A draw from llama.cpp's chain logit bias -> penalties -> top-k -> top-p -> min-p -> temperature
    -> dist, computed on the few tokens that can survive the cuts.

    Penalties apply to the last `penalty_last_n` generated tokens (the tokens the native chain's
    penalty sampler is fed). The cuts work on candidates above a threshold under the best logit,
    widened until the candidates provably contain everything each cut keeps: top-k needs k of them
    (every other token is below all of them, penalties only lower logits), top-p needs their share
    of the whole vocabulary's softmax to reach p. The result is the chain's, not an approximation;
    sums are in float64 (llama.cpp sums the softmax in float32, which for p close to 1 loses enough of
    the tail to cut a few thousand tokens sooner).
    """

    def __init__(self, p: SamplingParams, n_vocab: int) -> None:
        self._p = p
        self._n = n_vocab
        self._rng = np.random.default_rng(None if p.seed is None else p.seed % (1 << 64))
        self._buf = np.empty(n_vocab, dtype=np.float32)
        bias = [(t, b) for t, b in p.logit_bias]
        for token, _ in bias:
            if not 0 <= token < n_vocab:
                raise ValueError(f"logit_bias token id {token} is outside the vocabulary [0, {n_vocab})")
        self._bias_ids = np.array([t for t, _ in bias], dtype=np.int64)
        self._bias = np.array([b for _, b in bias], dtype=np.float32)
        self._cuts = p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0
        # no cut: a draw over the whole (biased, penalized) vocabulary, as TemperatureSampler draws
        self._whole = None if self._cuts or p.is_greedy else TemperatureSampler(p.temperature, p.seed, n_vocab)

    def _logits(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        p = self._p
        if not len(self._bias_ids) and not p.has_penalties:
            return logits  # read-only use from here on: no copy
        x = self._buf
        np.copyto(x, logits)
        if len(self._bias_ids):
            np.add.at(x, self._bias_ids, self._bias)
        if p.has_penalties and p.penalty_last_n != 0 and history:
            window = history if p.penalty_last_n < 0 else history[-p.penalty_last_n :]
            ids, counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)
            ids_ok = (ids >= 0) & (ids < self._n)
            ids, counts = ids[ids_ok], counts[ids_ok].astype(np.float32)
            v = x[ids]
            rep = np.float32(p.repetition_penalty)
            v = np.where(v > 0, v / rep, v * rep)
            v -= counts * np.float32(p.frequency_penalty) + np.float32(p.presence_penalty)
            x[ids] = v
        return x

    def candidates(self, logits: np.ndarray, history: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The tokens that survive the cuts (best first) and their probabilities after temperature
        (greedy: the one best token)."""
        p = self._p
        x = self._logits(logits, history)
        if p.is_greedy:
            return np.array([int(x.argmax())]), np.ones(1)
        top = float(x.max())
        k = min(p.top_k, self._n) if p.top_k > 0 else 0
        if not self._cuts:
            ids = np.arange(self._n)
            w = np.exp((x.astype(np.float64) - top) / p.temperature)
            return ids, w / w.sum()
        z_all = 0.0
        if p.top_p < 1.0 and not k:
            z_all = float(np.exp(x - np.float32(top), dtype=np.float32).sum(dtype=np.float64))
        delta = 2.0  # nats under the best logit; a model's head is usually a few tokens within it
        if p.min_p > 0.0:  # alone, min-p keeps exactly the tokens within -log(min_p) of the best
            delta = max(delta, -math.log(p.min_p) + 1e-3)
        while True:
            ids = np.flatnonzero(x >= top - delta)
            vals = x[ids].astype(np.float64)
            enough = len(ids) >= k if k else True
            if enough and p.top_p < 1.0 and not k:
                enough = float(np.exp(vals - top).sum()) >= p.top_p * z_all
            if enough or len(ids) == self._n:
                break
            delta *= 1.5
        if k and len(ids) > 4 * k:
            part = np.argpartition(-vals, k - 1)[:k]
            ids, vals = ids[part], vals[part]
        order = np.argsort(-vals, kind="stable")
        ids, vals = ids[order], vals[order]
        if k:
            ids, vals = ids[:k], vals[:k]
        if p.top_p < 1.0:
            probs = np.exp(vals - top)
            probs /= probs.sum() if k else z_all
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1  # smallest prefix reaching p
            ids, vals = ids[:keep], vals[:keep]
        if p.min_p > 0.0:
            keep = max(1, int(np.count_nonzero(vals >= vals[0] + math.log(p.min_p))))
            ids, vals = ids[:keep], vals[:keep]
        w = np.exp((vals - vals[0]) / p.temperature)
        return ids, w / w.sum()

    def sample(self, logits: np.ndarray, history: list[int]) -> int:
        if not self._cuts and not self._p.is_greedy:
            assert self._whole is not None
            return self._whole.sample(self._logits(logits, history))
        ids, probs = self.candidates(logits, history)
        i = int(np.searchsorted(np.cumsum(probs), self._rng.random() * probs.sum(), side="right"))
        return int(ids[min(i, len(ids) - 1)])


@dataclass(eq=False)
class SequenceSamplers:
    """One sequence's samplers: `fast` (plain temperature) or `truncated` (any other unconstrained
    sampling), or for constrained decoding the native `chain` and the `grammar` sampler."""

    chain: lc.llama_sampler_p | None = None
    grammar: Grammar | None = None
    fast: TemperatureSampler | None = None
    truncated: TruncatedSampler | None = None

    @classmethod
    def for_params(
        cls, p: SamplingParams, tokenizer: LlamaCppTokenizer, grammars: GrammarFactory | None = None
    ) -> SequenceSamplers:
        """Raises ValueError for parameters the native samplers refuse (nothing is left allocated)."""
        n_vocab = tokenizer.vocab_size
        if p.grammar is None:
            if uses_temperature_sampler(p):
                return cls(fast=TemperatureSampler(p.temperature, p.seed, n_vocab))
            return cls(truncated=TruncatedSampler(p, n_vocab))
        chain = make_sampler_chain(p, n_vocab)  # first: it may refuse the params
        try:
            grammar = (grammars or GrammarFactory(tokenizer)).build(p.grammar)
        except ValueError:
            lc.llama_sampler_free(chain)
            raise
        return cls(chain, grammar)

    def free(self) -> None:
        if self.chain is not None:
            lc.llama_sampler_free(self.chain)
            self.chain = None
        if self.grammar is not None:
            self.grammar.free()
            self.grammar = None
        self.fast = None
        self.truncated = None


class LogitsSampler:
    """Picks tokens from the logits rows of a context's last decode, and computes their logprobs."""

    def __init__(self, ctx: lc.llama_context_p, tokenizer: LlamaCppTokenizer) -> None:
        self._ctx = ctx
        self._tokenizer = tokenizer
        self._n_vocab = tokenizer.vocab_size
        # candidates for constrained sampling: one llama_token_data per vocabulary entry
        self._cand = (lc.llama_token_data * self._n_vocab)()
        self._cand_np = np.frombuffer(memoryview(self._cand), dtype=_TOKEN_DATA)
        self._cand_ids = np.arange(self._n_vocab, dtype=np.int32)

    def sample(self, samplers: SequenceSamplers, params: SamplingParams, idx: int, history: list[int]) -> SampleResult:
        """The token for logits row `idx` (with its logprob when `params.logprobs`); `history`: the
        sequence's generated tokens so far (for penalties)."""
        if samplers.grammar is not None:
            token = self._sample_constrained(samplers, idx)
        elif params.is_greedy and not params.has_penalties and not params.logit_bias:
            # argmax straight over the logits row: ~8 us instead of ~90 us for the native greedy
            # sampler, which first copies the whole vocabulary into a candidates array (same first-max pick)
            token = int(self._logits_row(idx).argmax())
        elif samplers.fast is not None:
            token = samplers.fast.sample(self._logits_row(idx))
        elif samplers.truncated is not None:
            token = samplers.truncated.sample(self._logits_row(idx), history)
        else:
            if samplers.chain is None:
                raise RuntimeError("the sequence has no sampler")
            token = lc.llama_sampler_sample(samplers.chain, self._ctx, idx)
        if not 0 <= token < self._n_vocab:
            raise RuntimeError(f"the sampler returned token id {token}")
        logprob = self.logprob(idx, token, params.top_logprobs) if params.logprobs else None
        return SampleResult(token, logprob)

    def sample_run(
        self,
        samplers: SequenceSamplers,
        params: SamplingParams,
        first_row: int,
        guesses: list[int],
        history: list[int],
    ) -> list[SampleResult]:
        """Speculative verification: sample row `first_row`, and while the token drawn equals the guess
        fed at that row's next position, the row after it. Returns the tokens drawn: the accepted
        guesses, then the first token that differs from its guess (or follows the last guess). Each
        draw is the one plain decoding makes at that position (same sampler state and random stream;
        `history`, the generated tokens before `first_row`, grows by the accepted guesses)."""
        drawn: list[SampleResult] = []
        for j in range(len(guesses) + 1):
            result = self.sample(samplers, params, first_row + j, history + guesses[:j] if j else history)
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

    def _sample_constrained(self, samplers: SequenceSamplers, idx: int) -> int:
        """A token the grammar allows: the chain's unconstrained pick when the grammar accepts it,
        else the chain's pick among the grammar-masked candidates. Both samplers then accept it (a
        token the grammar rejects must never reach `accept`: llama.cpp throws, which aborts)."""
        chain, grammar = samplers.chain, samplers.grammar
        assert chain is not None and grammar is not None
        arr = self._fill_candidates(idx)
        lc.llama_sampler_apply(chain, ctypes.byref(arr))
        token = int(arr.data[arr.selected].id) if 0 <= arr.selected < arr.size else -1
        if token < 0 or not grammar.allows(token):
            arr = self._fill_candidates(idx)
            grammar.mask(arr, self._cand_np["logit"])
            lc.llama_sampler_apply(chain, ctypes.byref(arr))
            if not 0 <= arr.selected < arr.size:
                raise RuntimeError("the grammar allows no token")
            token = int(arr.data[arr.selected].id)  # samplers may sort the array (or point it elsewhere)
            if not grammar.allows(token):
                raise RuntimeError("the grammar allows no token")
        grammar.accept(token)
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
