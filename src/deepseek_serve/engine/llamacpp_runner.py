"""GGUF models on CPU through llama.cpp's low-level API (llama-cpp-python's ctypes bindings).

KV layout: one llama.cpp context with a unified KV cache of `context_length` cells shared by all
sequences, and `n_slots` sequence ids. A running request holds one slot. A finished request's
slot keeps its KV as a prefix-cache entry until the slot or its cells are needed (LRU). A new
request reuses the idle slot with the longest common token prefix (`seq_rm` of the tail), or
shares a running sequence's prefix (`seq_cp`, which only tags the same cells with a second id).

Idle entries are not free: llama.cpp attends over the whole occupied span of the unified cache
(`n_kv`, up to the highest used cell) and skips foreign cells only one by one, and for spans of
512+ cells it splits that span across threads, so cells of idle entries slow every decode step
(measured with this package's default model: 15 idle entries of 160 tokens cost a lone stream 10%).
So an entry whose tokens are a prefix of a newer idle entry (the previous turn of the same
conversation) is dropped at once, and idle entries keep at most `prefix_cache_tokens` cells (LRU).

Sampling runs in llama.cpp's native sampler chains (one chain per sequence, own seed), except plain
temperature sampling over the whole vocabulary, which `TemperatureSampler` does in numpy; so the
per-token Python work is filling the batch and one call per sequence.

Constrained decoding (`SamplingParams.grammar`, GBNF) uses llama.cpp's grammar sampler outside the
chain: the chain picks a token from the unconstrained candidates, the grammar checks that one token,
and only when it rejects it are all candidates masked by the grammar and the chain run again.
Masking the whole vocabulary costs milliseconds per token; checking one token costs microseconds,
and the model usually proposes a valid token (the same scheme as llama.cpp's common sampler).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as lc
import numpy as np

from deepseek_serve.engine.runner import Runner, SampleResult, ScheduledSeq, Tokenizer
from deepseek_serve.engine.sequence import Sequence
from deepseek_serve.engine.types import SamplingParams, TokenLogprob

logger = logging.getLogger(__name__)


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # NOTE: llama.cpp logs every load detail to stderr; keep errors (level 2 = GGML_LOG_LEVEL_ERROR... 4).
    if level in (2, 4) and text:
        logger.debug("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        lc.llama_log_set(_quiet_log, ctypes.c_void_p(0))
        lc.llama_backend_init()
        _backend_ready = True


def physical_cores() -> int:
    """Physical cores available to this process (llama.cpp is slower on hyper-threads)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    try:
        cpu = pkg = core = ""
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key, val = key.strip(), val.strip()
            if key == "processor":
                cpu = val
            elif key == "physical id":
                pkg = val
            elif key == "core id":
                core = val
                if cpu.isdigit() and int(cpu) in cpus:
                    cores.add((pkg, core))
    except OSError:
        pass
    return max(1, min(len(cores) or len(cpus), len(cpus)))


class LlamaCppTokenizer(Tokenizer):
    def __init__(self, model: lc.llama_model_p) -> None:
        self.vocab = lc.llama_model_get_vocab(model)
        self._vocab = self.vocab
        self._n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        self._bytes: list[bytes | None] = [None] * self._n_vocab
        self._add_bos = bool(lc.llama_vocab_get_add_bos(self._vocab))
        eog = [t for t in range(self._n_vocab) if lc.llama_vocab_is_eog(self._vocab, t)]
        self._eos_ids = tuple(eog)
        self._bos_id = lc.llama_vocab_bos(self._vocab)
        self._eos_id = lc.llama_vocab_eos(self._vocab)
        self._buf = ctypes.create_string_buffer(256)

    @property
    def vocab_size(self) -> int:
        return self._n_vocab

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    @property
    def bos_token(self) -> str | None:
        return self._special_text(self._bos_id)

    @property
    def eos_token(self) -> str | None:
        return self._special_text(self._eos_id)

    def _special_text(self, token: int) -> str | None:
        if not 0 <= token < self._n_vocab:
            return None
        return self._piece(token, special=True).decode("utf-8", "replace")

    def _piece(self, token: int, special: bool) -> bytes:
        n = lc.llama_token_to_piece(self._vocab, token, self._buf, len(self._buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
            return buf.raw[:n]
        return self._buf.raw[:n]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        out = (lc.llama_token * n_max)()
        n = lc.llama_tokenize(self._vocab, data, len(data), out, n_max, add_special_tokens, True)
        if n < 0:
            out = (lc.llama_token * -n)()
            n = lc.llama_tokenize(self._vocab, data, len(data), out, -n, add_special_tokens, True)
        return list(out[:n])

    def _check(self, token_id: int) -> None:
        # NOTE: llama.cpp throws std::out_of_range for an id outside the vocabulary, which aborts the process.
        if not 0 <= token_id < self._n_vocab:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self._n_vocab})")

    def token_bytes(self, token_id: int) -> bytes:
        self._check(token_id)
        b = self._bytes[token_id]
        if b is None:
            b = self._piece(token_id, special=False)
            self._bytes[token_id] = b
        return b

    def token_text(self, token_id: int) -> str:
        self._check(token_id)
        return self._piece(token_id, special=True).decode("utf-8", "replace")


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
class _Slot:
    index: int
    tokens: list[int]  # tokens whose KV the slot holds (for idle slots; running: see seq)
    seq: Sequence | None = None
    sampler: lc.llama_sampler_p | None = None
    grammar: lc.llama_sampler_p | None = None
    fast_sampler: TemperatureSampler | None = None
    last_used: float = 0.0

    @property
    def is_idle(self) -> bool:
        return self.seq is None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


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
    ) -> None:
        _init_backend()
        mparams = lc.llama_model_default_params()  # memory-mapped weights (load mode "auto")
        # NOTE: llama.cpp's repacked CPU layout (use_extra_bufts): faster decoding, slower prompt processing
        # of Q4_K weights on this project's AVX-512 test machine (docs/performance.md).
        mparams.use_extra_bufts = repack
        self._model = lc.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load the model file {model_path}")
        self._tokenizer = LlamaCppTokenizer(self._model)
        self._n_vocab = self._tokenizer.vocab_size
        self.n_ctx_train = lc.llama_model_n_ctx_train(self._model)
        self._prefix_cache = prefix_cache
        self._prefix_cache_tokens = prefix_cache_tokens
        self._max_batch = max_batch_size
        # NOTE: extra sequence ids beyond the batch keep finished sequences' KV for prefix reuse.
        n_slots = min(max_batch_size * 2 if prefix_cache else max_batch_size, 255)
        self._n_batch = prefill_chunk_tokens + max_batch_size
        threads = n_threads or physical_cores()
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = context_length
        cparams.n_batch = self._n_batch
        cparams.n_ubatch = self._n_batch  # one ubatch per step
        cparams.n_seq_max = n_slots
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = True
        cparams.no_perf = True
        cparams.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._ctx = lc.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            lc.llama_model_free(self._model)
            raise RuntimeError("llama.cpp could not create a context (out of memory for the KV cache?)")
        self.n_threads = threads
        self._mem = lc.llama_get_memory(self._ctx)
        self._n_ctx = lc.llama_n_ctx(self._ctx)
        limit = max_model_len or self.n_ctx_train or self._n_ctx
        self._max_model_len = min(limit, self._n_ctx)
        self._slots = [_Slot(i, []) for i in range(n_slots)]
        self._batch = lc.llama_batch_init(self._n_batch, 0, n_slots)
        self._b_token = np.ctypeslib.as_array(self._batch.token, shape=(self._n_batch,))
        self._b_pos = np.ctypeslib.as_array(self._batch.pos, shape=(self._n_batch,))
        self._b_nseq = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(self._n_batch,))
        self._b_logits = np.ctypeslib.as_array(self._batch.logits, shape=(self._n_batch,))
        self._b_seq = [self._batch.seq_id[i] for i in range(self._n_batch)]
        self._reserved = 0  # KV tokens reserved by running sequences
        # candidates for constrained sampling: one llama_token_data per vocabulary entry, plus one
        self._cand = (lc.llama_token_data * self._n_vocab)()
        self._cand_np = np.frombuffer(memoryview(self._cand), dtype=_TOKEN_DATA)
        self._cand_ids = np.arange(self._n_vocab, dtype=np.int32)
        self._one = (lc.llama_token_data * 1)()
        self.tokens_computed = 0  # tokens fed to llama_decode so far (shared prompt tokens count once)
        template = lc.llama_model_chat_template(self._model, None)
        self._chat_template = template.decode("utf-8") if template else None
        self.model_path = model_path

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
        return self._reserved

    @property
    def kv_cached_tokens(self) -> int:
        return self._cached_tokens()

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def metadata(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = lc.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    # --- admission ----------------------------------------------------------------------------------
    def _cached_tokens(self) -> int:
        return sum(len(s.tokens) for s in self._slots if s.is_idle)

    def can_allocate(self, seq: Sequence) -> bool:
        has_slot = any(s.is_idle for s in self._slots)
        return has_slot and self._reserved + seq.max_total_tokens <= self._n_ctx

    def allocate(self, seq: Sequence) -> int:
        p = seq.params
        fast = TemperatureSampler(p.temperature, p.seed, self._n_vocab) if uses_temperature_sampler(p) else None
        sampler = None if fast else make_sampler_chain(p, self._n_vocab)  # first: it may refuse the params
        grammar = None
        if p.grammar is not None:
            try:
                grammar = make_grammar_sampler(self._tokenizer.vocab, p.grammar)
            except ValueError:
                if sampler is not None:
                    lc.llama_sampler_free(sampler)
                raise
        prompt = seq.prompt_token_ids
        slot, reuse, source = self._pick_slot(prompt)
        # make room: idle entries are evicted (least recently used first) until the reservation fits
        need = self._reserved + seq.max_total_tokens
        for victim in sorted(
            (s for s in self._slots if s.is_idle and s is not slot and s.tokens), key=lambda s: s.last_used
        ):
            if need + self._cached_tokens() - len(slot.tokens) <= self._n_ctx:
                break
            self._clear(victim)
        if source is not None:
            self._clear(slot)
            lc.llama_memory_seq_cp(self._mem, source.index, slot.index, 0, reuse)
        elif reuse < len(slot.tokens):
            lc.llama_memory_seq_rm(self._mem, slot.index, reuse, -1)
        cached = min(reuse, len(prompt) - 1)
        if cached < reuse:
            lc.llama_memory_seq_rm(self._mem, slot.index, cached, -1)
        slot.tokens = []
        slot.seq = seq
        slot.sampler = sampler
        slot.grammar = grammar
        slot.fast_sampler = fast
        seq.slot = slot.index
        seq.num_computed_tokens = cached
        seq.num_cached_tokens = cached
        self._reserved += seq.max_total_tokens
        return cached

    def _pick_slot(self, prompt: list[int]) -> tuple[_Slot, int, _Slot | None]:
        """(slot to use, prefix tokens reusable, running slot to copy the prefix from or None)."""
        idle = [s for s in self._slots if s.is_idle]
        if self._prefix_cache:
            best_idle = max(idle, key=lambda s: (_common_prefix(s.tokens, prompt), -len(s.tokens)))
            idle_lcp = _common_prefix(best_idle.tokens, prompt)
            best_run, run_lcp = None, 0
            for s in self._slots:
                if s.seq is not None:
                    lcp = _common_prefix(s.seq.all_token_ids[: s.seq.num_computed_tokens], prompt)
                    if lcp > run_lcp:
                        best_run, run_lcp = s, lcp
            if idle_lcp >= run_lcp and idle_lcp > 0:
                return best_idle, idle_lcp, None
            if best_run is not None and run_lcp > 0:
                target = min(idle, key=lambda s: (len(s.tokens) > 0, s.last_used))
                return target, run_lcp, best_run
        target = min(idle, key=lambda s: (len(s.tokens) > 0, s.last_used))
        self._clear(target)
        return target, 0, None

    def _clear(self, slot: _Slot) -> None:
        if slot.tokens or slot.seq is not None:
            lc.llama_memory_seq_rm(self._mem, slot.index, -1, -1)
        slot.tokens = []

    # --- forward ------------------------------------------------------------------------------------
    def _refuse(self, item: ScheduledSeq, n: int) -> str | None:
        """Why this entry cannot go to llama_decode (None when it can). Bad token ids or positions would
        make llama.cpp throw or assert, which aborts the whole process."""
        seq, start, k = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
        if k < 1 or start + k > min(seq.num_tokens, seq.max_total_tokens, self._n_ctx):
            return f"{k} new tokens at position {start} do not fit the sequence's reservation"
        if n + k > self._n_batch:
            return f"{k} new tokens do not fit the batch of {self._n_batch}"
        if k == 1:
            token = seq.token_at(start)
            ok = 0 <= token < self._n_vocab
        else:
            chunk = np.asarray(seq.all_token_ids[start : start + k])
            ok = bool(chunk.min() >= 0 and chunk.max() < self._n_vocab)
        return None if ok else f"a token id outside the vocabulary [0, {self._n_vocab})"

    def step(self, batch: list[ScheduledSeq]) -> list[SampleResult | None]:
        results: list[SampleResult | None] = [None] * len(batch)
        accepted: list[int] = []  # batch indices that go to llama_decode
        planned = 0  # tokens before sharing: an upper bound of what _fill_batch writes
        for i, item in enumerate(batch):
            refused = self._refuse(item, planned)
            if refused is not None:
                results[i] = SampleResult.failed(refused)
                continue
            planned += item.num_new_tokens
            accepted.append(i)
        if not accepted:
            return results
        n, out_index = self._fill_batch([batch[i] for i in accepted])
        assert n <= self._n_batch, f"batch of {n} tokens exceeds n_batch {self._n_batch}"
        self._batch.n_tokens = n
        rc = lc.llama_decode(self._ctx, self._batch)
        if rc == 1:
            # no contiguous KV room: drop the prefix cache and retry once
            for s in self._slots:
                if s.is_idle:
                    self._clear(s)
            rc = lc.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")
        self.tokens_computed += n
        for i, idx in zip(accepted, out_index, strict=True):
            item = batch[i]
            item.seq.num_computed_tokens += item.num_new_tokens
            if not item.sample:
                continue
            try:
                results[i] = self._sample(item.seq, idx)
            except Exception as exc:  # this sequence alone: its sampler or logprobs failed
                logger.exception("sampling failed for %s", item.seq.request_id)
                results[i] = SampleResult.failed(f"sampling failed: {exc}")
        return results

    def _sample(self, seq: Sequence, idx: int) -> SampleResult:
        assert seq.slot is not None
        params = seq.params
        slot = self._slots[seq.slot]
        if slot.grammar is not None:
            token = self._sample_constrained(slot, idx)
        elif params.is_greedy and not params.has_penalties and not params.logit_bias:
            # NOTE: argmax straight over the logits row: ~8 us instead of ~90 us for the native greedy
            # sampler, which first copies the whole vocabulary into a candidates array (same first-max pick).
            token = int(self._logits_row(idx).argmax())
        elif slot.fast_sampler is not None:
            token = slot.fast_sampler.sample(self._logits_row(idx))
        else:
            sampler = slot.sampler
            if sampler is None:
                raise RuntimeError("the sequence has no sampler")
            token = lc.llama_sampler_sample(sampler, self._ctx, idx)
        if not 0 <= token < self._n_vocab:
            raise RuntimeError(f"the sampler returned token id {token}")
        logprob = self._logprob(idx, token, params.top_logprobs) if params.logprobs else None
        return SampleResult(token, logprob)

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

    def _sample_constrained(self, slot: _Slot, idx: int) -> int:
        """A token the grammar allows: the chain's unconstrained pick when the grammar accepts it,
        else the chain's pick among the grammar-masked candidates. Both samplers then accept it (a
        token the grammar rejects must never reach `accept`: llama.cpp throws, which aborts)."""
        chain, grammar = slot.sampler, slot.grammar
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

    def _fill_batch(self, batch: list[ScheduledSeq]) -> tuple[int, list[int]]:
        """Write the step's tokens into the llama_batch; returns (tokens written, logits row of each item).

        Prompt chunks that start at the same position after identical earlier tokens and begin with the
        same tokens are written once for all of them: each shared token carries every such sequence's
        id, so llama.cpp computes it once and stores one KV cell tagged with all of them (as `seq_cp`
        tags copied cells). Requests that arrive together with one system prompt prefill it once.
        """
        n = 0
        out_index = [0] * len(batch)
        groups: dict[tuple[int, ...], list[tuple[int, int, list[int]]]] = {}
        for i, item in enumerate(batch):
            seq = item.seq
            assert seq.slot is not None, "step() on an unallocated sequence"
            start = seq.num_computed_tokens
            k = item.num_new_tokens
            if k == 1 and start >= seq.num_prompt_tokens:  # decode: the last output token
                n = self._put(n, (seq.output_token_ids[start - seq.num_prompt_tokens],), start, (seq.slot,))
                out_index[i] = n - 1
            elif start + k <= seq.num_prompt_tokens:
                prompt = seq.prompt_token_ids
                key = (start, *prompt[: start + 1])
                groups.setdefault(key, []).append((i, seq.slot, prompt[start : start + k]))
            else:
                n = self._put(n, seq.all_token_ids[start : start + k], start, (seq.slot,))
                out_index[i] = n - 1
        for key, members in groups.items():
            n = self._put_shared(n, members, key[0], out_index)
        for i, item in enumerate(batch):
            if item.sample:
                self._b_logits[out_index[i]] = 1
        return n, out_index

    def _put(self, n: int, tokens: list[int] | tuple[int, ...], pos: int, slots: list[int] | tuple[int, ...]) -> int:
        """Write `tokens` at positions pos.. for the sequence ids `slots` from batch row n; returns the next row."""
        k = len(tokens)
        assert n + k <= self._n_batch, f"batch of {n + k} tokens exceeds n_batch {self._n_batch}"
        self._b_token[n : n + k] = tokens
        self._b_pos[n : n + k] = np.arange(pos, pos + k)
        self._b_logits[n : n + k] = 0
        self._b_nseq[n : n + k] = len(slots)
        for row in range(n, n + k):
            ids = self._b_seq[row]
            for j, slot in enumerate(slots):
                ids[j] = slot
        return n + k

    def _put_shared(self, n: int, members: list[tuple[int, int, list[int]]], start: int, out_index: list[int]) -> int:
        """Write prompt chunks (batch item, slot, tokens) that start at `start` after identical histories,
        each run of tokens common to several of them once."""
        stack = [(members, 0)]  # members whose chunks agree on [0, depth), which is written already
        while stack:
            group, depth = stack.pop()
            first = group[0][2]
            run = len(first) - depth
            for _, _, chunk in group[1:]:
                run = min(run, _common_prefix(first[depth : depth + run], chunk[depth : depth + run]))
            if run:
                n = self._put(n, first[depth : depth + run], start + depth, [slot for _, slot, _ in group])
                depth += run
            rest: dict[int, list[tuple[int, int, list[int]]]] = {}
            for member in group:
                if len(member[2]) == depth:
                    out_index[member[0]] = n - 1
                else:
                    rest.setdefault(member[2][depth], []).append(member)
            stack.extend((g, depth) for g in rest.values())
        return n

    def _logits_row(self, idx: int) -> np.ndarray:
        return np.ctypeslib.as_array(lc.llama_get_logits_ith(self._ctx, idx), shape=(self._n_vocab,))

    def _logprob(self, idx: int, token: int, top_n: int) -> TokenLogprob:
        ptr = lc.llama_get_logits_ith(self._ctx, idx)
        logits = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).astype(np.float64)
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

    def free(self, seq: Sequence) -> None:
        if seq.slot is None:
            return
        slot = self._slots[seq.slot]
        if slot.sampler is not None:
            lc.llama_sampler_free(slot.sampler)
            slot.sampler = None
        if slot.grammar is not None:
            lc.llama_sampler_free(slot.grammar)
            slot.grammar = None
        slot.fast_sampler = None
        self._reserved -= seq.max_total_tokens
        slot.seq = None
        slot.last_used = time.monotonic()
        seq.slot = None
        if self._prefix_cache:
            slot.tokens = seq.all_token_ids[: seq.num_computed_tokens]
            self._trim_prefix_cache(slot)
        else:
            slot.tokens = [0]  # force a clear
            self._clear(slot)

    def _trim_prefix_cache(self, newest: _Slot) -> None:
        """Drop idle entries that `newest` makes redundant, then the least recently used beyond the budget."""
        n = len(newest.tokens)
        for s in self._slots:
            if (
                s is not newest
                and s.is_idle
                and s.tokens
                and len(s.tokens) <= n
                and newest.tokens[: len(s.tokens)] == s.tokens
            ):
                self._clear(s)
        idle = sorted((s for s in self._slots if s.is_idle and s.tokens), key=lambda s: s.last_used)
        cached = sum(len(s.tokens) for s in idle)
        for s in idle:
            if cached <= self._prefix_cache_tokens:
                break
            cached -= len(s.tokens)
            self._clear(s)

    def clear_prefix_cache(self) -> int:
        dropped = 0
        for s in self._slots:
            if s.is_idle and s.tokens:
                dropped += len(s.tokens)
                self._clear(s)
        return dropped

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            lc.llama_batch_free(self._batch)
            lc.llama_free(self._ctx)
            lc.llama_model_free(self._model)
            self._ctx = None
