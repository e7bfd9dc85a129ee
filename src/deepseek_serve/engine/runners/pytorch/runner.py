"""TorchRunner: Hugging Face Llama/Qwen2 checkpoints on CPU or CUDA behind the engine's `Runner`.

One `step()`:
1. decode rows (entries feeding one token) run together as one forward over the slot range
   [0, n): row i is slot i, rows without work write to the cache's scratch column. On CUDA this
   forward is a CUDA graph captured per (rows bucket, KV-length bucket) (`cuda_graphs`), by default
   compiled whole (`compile.DecodeStep`);
2. the prefill chunks (entries of more than one token, any lengths) are packed into one row of tokens
   (`packing`) and run as one forward: on CUDA the CUDA graph of the smallest token bucket that holds
   them (`cuda_graphs.PackedGraphs`), the attention reading each chunk's slot in place through
   `chunk_attention`; more tokens than the largest bucket take several forwards;
3. logits of the rows that sample go through the on-device sampler; the chosen ids come back in
   one device-to-host copy.

When every row that samples is plain greedy, `launch()` returns before that copy has landed: the
chosen ids are also kept per slot on the device (`_next_ids`), and a decode row whose token the
engine has not taken in yet reads its input from there, so the engine can start the next step
before it processes this one's tokens (`Runner.can_launch_ahead`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from deepseek_serve.engine.runners import LaunchedStep, Runner, SampleResult, ScheduledSeq, Tokenizer
from deepseek_serve.engine.runners.common import entry_refusal, split_refused
from deepseek_serve.engine.runners.guidance import GuidanceMatcher, llguidance_available
from deepseek_serve.engine.runners.pytorch.compile import Compiler, DecodeStep
from deepseek_serve.engine.runners.pytorch.cuda_graphs import CHUNK_SIZES, DecodeGraphs, PackedGraphs, chunk_size
from deepseek_serve.engine.runners.pytorch.forward_batch import ForwardBatch, additive_mask
from deepseek_serve.engine.runners.pytorch.memory import (
    GiB,
    free_memory,
    model_bytes,
    plan_memory,
    rows_buckets,
)
from deepseek_serve.engine.runners.pytorch.modules import CausalLM, KVCache
from deepseek_serve.engine.runners.pytorch.ops import EAGER_OPS
from deepseek_serve.engine.runners.pytorch.packing import MAX_SEGMENTS, PackLayout, Segment, packed_rows, token_rows
from deepseek_serve.engine.runners.pytorch.sampler import SampleOutput, SampleRow, sample
from deepseek_serve.engine.runners.pytorch.slots import SlotTable
from deepseek_serve.engine.runners.pytorch.speculative import TorchSpeculator
from deepseek_serve.engine.types import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from deepseek_serve.config import Settings
    from deepseek_serve.engine.sequence import Sequence

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_LEN_BUCKET = 256


def resolve_device(name: str) -> torch.device:
    """auto -> CUDA when present, else CPU. Asking for cuda without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DS_DEVICE=cuda but torch sees no CUDA device (is this a CPU-only torch build?)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto -> bfloat16 on CUDA, float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def _next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


class TorchRunner(Runner):
    name = "torch"
    supports_overlap = True

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer | None,
        *,
        num_slots: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
        cuda_graphs: bool = True,
        prefix_cache: bool = True,
        chat_template: str | None = None,
        seed: int = 0,
        compile_ops: bool = True,
        compile_decode: bool = True,
        packed_prefill: bool = True,
    ) -> None:
        self.model = model
        self.args = model.args
        self.device = device
        self.dtype = dtype
        self._tokenizer = tokenizer
        self._chat_template = chat_template
        self._max_len = max_len
        self.cache = KVCache(model.args, num_slots, max_len, dtype, device)
        model.setup_rope(max_len + 1, device)
        self.slots = SlotTable(num_slots, max_len, prefix_cache)
        self._arange = torch.arange(max_len + 1, device=device)
        # the last token sampled in each slot, on the device: the input of an overlapped decode row
        self._next_ids = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self._last_sampled: frozenset[int] = frozenset()  # slots whose token the last launch left there
        self._async_copies = device.type == "cuda"
        self._use_graphs = cuda_graphs and device.type == "cuda"
        # what torch.compile makes for this runner: the fused elementwise ops of every forward (CUDA)
        # and the whole decode step (CUDA graphs only: compiling per shape pays off once captured)
        self.compiler = Compiler()
        self.ops = self.compiler.fused_ops() if compile_ops and device.type == "cuda" else EAGER_OPS
        self.decode_step: DecodeStep | None = (
            DecodeStep(model, compiler=self.compiler) if compile_ops and compile_decode and self._use_graphs else None
        )
        self.graphs = DecodeGraphs(self.decode_forward, device, max_len) if self._use_graphs else None
        # prompt chunks packed into one forward: the Triton chunk attention over the cache in place
        # (CUDA); `packed_prefill` off: one chunk per forward
        self._chunk_attention = device.type == "cuda"
        if self._chunk_attention:
            import deepseek_serve.engine.runners.pytorch.chunk_attention  # noqa: F401  (registers the op)
        self.max_segments = min(num_slots, MAX_SEGMENTS) if packed_prefill else 1
        self.chunk_graphs = (
            PackedGraphs(self.packed_forward, device, self.graphs.pool, self.max_segments)
            if self.graphs is not None
            else None
        )
        self._packed_tokens = CHUNK_SIZES[-1]  # tokens of one packed forward at most (set by warmup)
        self._generator = torch.Generator(device=device).manual_seed(seed)
        self._eos_ids = tuple(tokenizer.eos_token_ids) if tokenizer is not None else ()
        # constrained decoding (llguidance, the `grammar` extra): one matcher per slot that holds a
        # sequence with a grammar; the token trie over the vocabulary is built on first use
        self.supports_grammar = tokenizer is not None and llguidance_available()
        self._grammars: dict[int, GuidanceMatcher] = {}
        self._guidance_tokenizer: object | None = None
        self.speculator: TorchSpeculator | None = None  # prompt lookup (DS_SPECULATIVE=ngram)

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: Settings, model_path: Path) -> TorchRunner:
        """Load a Hugging Face folder with `settings.device/dtype/quantization/max_batch_size/
        max_model_len/context_length/cuda_graphs/prefix_cache`."""
        from deepseek_serve.engine.runners.pytorch.loading import load_model
        from deepseek_serve.engine.runners.pytorch.quantize import quantize_model
        from deepseek_serve.engine.runners.pytorch.tokenizer import HFTokenizer, read_chat_template

        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        free = free_memory(device)  # before the weights: the budget is a share of what is free now
        model = load_model(Path(model_path), dtype, device)
        quantize_model(model, settings.quantization, settings.int4_group_size)
        trained = model.args.max_position_embeddings
        max_len = settings.max_model_len or min(trained, settings.context_length)
        plan = plan_memory(
            model.args,
            dtype,
            device=str(device),
            free_bytes=free,
            utilization=settings.gpu_memory_utilization,
            weight_bytes=model_bytes(model),
            max_len=max_len,
            requested_slots=settings.max_batch_size,
            chunk_tokens=settings.prefill_chunk_tokens,
            kv_bucket=KV_LEN_BUCKET,
            cuda_graphs=settings.cuda_graphs and device.type == "cuda",
        )
        if plan.num_slots < settings.max_batch_size:
            logger.warning(
                "torch runner: DS_MAX_BATCH_SIZE=%d sequences of %d tokens need %.2f GiB of KV cache; "
                "the memory budget holds %d (raise DS_GPU_MEMORY_UTILIZATION, lower DS_MAX_MODEL_LEN or "
                "quantize for more)",
                settings.max_batch_size,
                max_len,
                settings.max_batch_size * plan.kv_bytes_per_slot / GiB,
                plan.num_slots,
            )
        logger.info(
            "torch runner: %s on %s (%s, quantization %s), %s",
            model.args.architecture,
            device,
            dtype,
            settings.quantization,
            plan.describe(),
        )
        runner = cls(
            model,
            HFTokenizer(model_path),
            num_slots=plan.num_slots,
            max_len=max_len,
            device=device,
            dtype=dtype,
            cuda_graphs=settings.cuda_graphs,
            prefix_cache=settings.prefix_cache,
            packed_prefill=settings.packed_prefill,
            chat_template=read_chat_template(Path(model_path)),
        )
        runner.warmup(settings.prefill_chunk_tokens)
        runner.speculator = TorchSpeculator.from_settings(runner, settings)
        return runner

    # --- Runner properties -------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise RuntimeError("this runner was built without a tokenizer")
        return self._tokenizer

    @property
    def max_num_seqs(self) -> int:
        return self.slots.num_slots

    @property
    def max_model_len(self) -> int:
        return self._max_len

    @property
    def kv_capacity_tokens(self) -> int:
        return self.slots.num_slots * self._max_len

    @property
    def kv_used_tokens(self) -> int:
        return self.slots.reserved_tokens

    @property
    def kv_cached_tokens(self) -> int:
        return self.slots.cached_tokens

    def speculative_counts(self) -> tuple[tuple[str, int, int], ...]:
        return self.speculator.counters.snapshot() if self.speculator is not None else ()

    def clear_prefix_cache(self) -> int:
        # the KV stays in the buffer: a freed slot is overwritten by its next sequence
        return self.slots.clear_idle()

    def cached_prefixes(self) -> list[tuple[int, ...] | list[int]]:
        return self.slots.cached_prefixes()

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    # --- slots -------------------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence) -> bool:
        return self.slots.can_allocate(seq.max_total_tokens)

    def allocate(self, seq: Sequence) -> int:
        matcher = self._matcher(seq.params.grammar) if seq.params.grammar is not None else None  # may refuse
        grant = self.slots.allocate(seq.prompt_token_ids, seq.max_total_tokens)
        if matcher is not None:
            self._grammars[grant.slot] = matcher
        kv = self.cache.kv  # [layers, slots, Hk, max_len + 1, 2 D]
        for c in grant.copies:
            kv[:, c.dst, :, : c.num_tokens].copy_(kv[:, c.src, :, : c.num_tokens])
        seq.slot = grant.slot
        seq.num_computed_tokens = grant.num_cached_tokens
        seq.num_cached_tokens = grant.num_cached_tokens
        return grant.num_cached_tokens

    def free(self, seq: Sequence) -> None:
        if seq.slot is None:
            return
        self._grammars.pop(seq.slot, None)
        self._last_sampled = self._last_sampled - {seq.slot}
        self.slots.release(seq.slot, seq.all_token_ids[: seq.num_computed_tokens])
        seq.slot = None

    # --- forward -----------------------------------------------------------------------------------
    def decode_forward(self, inputs: Tensor, kv_len: int) -> tuple[Tensor, Tensor]:
        """inputs [3, n] (token, position, write position) -> (logits [n, V], argmax [n]); row i is
        slot i."""
        n = inputs.shape[1]
        tok, pos, wpos = inputs[0], inputs[1], inputs[2]
        mask = additive_mask((self._arange[:kv_len][None, :] <= pos[:, None]).view(n, 1, 1, kv_len), self.dtype)
        fb = ForwardBatch(slots=None, positions=pos[:, None], write_pos=wpos[:, None], mask=mask)
        if self.decode_step is not None:
            return self.decode_step(tok[:, None], self.cache, fb)
        logits = self.model(tok[:, None], self.cache, fb, self.ops)[:, 0]
        return logits, logits.argmax(dim=-1)

    def packed_forward(self, tokens: Tensor, blocks: Tensor, last: Tensor) -> Tensor:
        """Prompt chunks of several sequences packed into one row (`packing`): tokens [T], blocks
        [NB, 5] (the chunk attention's query blocks, which also give each row's position and slot),
        last [S] (the row of each chunk's last token) -> logits [S, V]. Device tensors only, so that
        a CUDA graph captures it; the attention is `chunk_attention` (CUDA, or Triton's interpreter)."""
        rows = token_rows(blocks, tokens.shape[0], self._max_len)  # [3, T]: position, slot, cache position
        fb = ForwardBatch(
            slots=None, positions=rows[0:1], write_pos=rows[2:3], mask=None, rows=rows[1:2], blocks=blocks
        )
        return self._last_logits(tokens[None], fb, last)

    def _last_logits(self, tokens: Tensor, fb: ForwardBatch, last: Tensor) -> Tensor:
        """tokens [1, T] -> logits [S, V] of the rows `last` [S]."""
        h = self.model.hidden_states(tokens, self.cache, fb, self.ops)  # [1, T, d]
        return self.model.lm_head(h[0].index_select(0, last))

    def _decode(self, entries: list[ScheduledSeq]) -> tuple[Tensor, Tensor | None]:
        """(logits [n, V] over slots 0..n-1, their argmax [n] when a graph computed it) for entries
        that each feed exactly one token."""
        top = max(e.seq.slot for e in entries if e.seq.slot is not None) + 1
        n = min(_next_pow2(top), self.slots.num_slots) if self._use_graphs else top
        max_pos = max(e.seq.num_computed_tokens for e in entries)
        kv_len = self.kv_bucket(max_pos + 1)
        tok, pos, wpos = [0] * n, [0] * n, [self._max_len] * n  # idle rows: scratch column
        on_device = [0] * n  # 1: the row's token is the one last sampled in its slot (`_next_ids`)
        for e in entries:
            s, p = e.seq.slot, e.seq.num_computed_tokens
            assert s is not None
            if p < e.seq.num_tokens:
                tok[s] = e.seq.token_at(p)
            else:
                on_device[s] = 1
            pos[s], wpos[s] = p, p
        staged = self._to_device(torch.tensor([tok, pos, wpos, on_device], dtype=torch.int64))  # [4, n]
        g = self.graphs.get(n, kv_len) if self.graphs is not None else None
        inputs = g.inputs if g is not None else torch.empty((3, n), dtype=torch.int64, device=self.device)
        inputs.copy_(staged[:3])
        if any(on_device):
            inputs[0].copy_(torch.where(staged[3].bool(), self._next_ids[:n], staged[0]))
        if g is None:
            return self.decode_forward(inputs, kv_len)[0], None
        g.graph.replay()
        return g.logits, g.greedy

    def _to_device(self, host: Tensor) -> Tensor:
        """A host tensor on the device without waiting for the device: on CUDA through pinned memory,
        so the copy queues behind the work already launched instead of synchronizing with it."""
        if not self._async_copies:
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    def kv_bucket(self, length: int) -> int:
        """KV positions a decode step reads: a multiple of KV_LEN_BUCKET (a power of two of it with
        CUDA graphs, to bound the number of graphs), capped at max_len."""
        kv_len = -(-length // KV_LEN_BUCKET) * KV_LEN_BUCKET
        if self._use_graphs:
            kv_len = KV_LEN_BUCKET * _next_pow2(kv_len // KV_LEN_BUCKET)
        return min(kv_len, self._max_len)

    def warmup(self, prefill_tokens: int = 0) -> int:
        """Compile and capture every shape the server can meet before it serves: each decode graph
        (rows bucket x KV-length bucket), the prefill forward (one row and several rows: the dynamic
        compiles of the fused ops), the packed prefill graphs up to the token bucket that holds
        `prefill_tokens` (512 when 0; the most tokens one packed forward takes from then on) and the
        sampler's kernels. `prefill_tokens` > 0: also one prefill of that many tokens.
        Returns the number of graphs."""
        with torch.inference_mode():
            if self.graphs is not None:
                for rows in rows_buckets(self.slots.num_slots):
                    length = 1
                    while True:
                        kv_len = self.kv_bucket(length)
                        self.graphs.get(rows, kv_len)
                        if kv_len >= self._max_len:
                            break
                        length = kv_len + 1
            self._warm_prefill(prefill_tokens)
            if self.chunk_graphs is not None:
                largest = chunk_size(min(prefill_tokens or 512, self._max_len)) or CHUNK_SIZES[-1]
                self._packed_tokens = largest  # nothing is captured after warm-up
                for size in CHUNK_SIZES:
                    if size <= largest:
                        self.chunk_graphs.get(size)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.graphs is None or self.chunk_graphs is None:
            return 0
        return len(self.graphs) + len(self.chunk_graphs)

    def _warm_prefill(self, prefill_tokens: int) -> None:
        """Prefill forwards into slots 0/1 and one sampled row of every kind. Before serving only:
        idle prefix-cache entries are dropped (their KV is overwritten)."""
        if self.slots.reserved_tokens:
            raise RuntimeError("warmup() runs before any sequence is allocated")
        self.slots.clear_idle()
        # one-row prompts of 2..128 tokens: the quantized matmuls pick their tiles per rows bucket
        short = {(1, t) for t in (4, 8, 16, 32, 64, 128) if t <= self._max_len}
        # several rows (the speculator's verify forward): rows != tokens, both >= 2, so that the fused
        # ops' dynamic compile covers every (rows, tokens) of a multi-row forward (with rows == tokens
        # Dynamo would assume they are equal, and the first real one would compile again while
        # requests wait)
        many = {(b, t) for b, t in ((2, 3), (3, 5)) if b <= self.slots.num_slots and t <= self._max_len}
        shapes = {(1, 2), (1, max(2, min(prefill_tokens, self._max_len))), *short, *many}
        for b, t in sorted(shapes):
            if b == 1:  # a packed prefill of t tokens
                logits = self._prefill_eager([Segment([0] * t, 0, 0)])
                continue
            tok = torch.zeros((b, t), dtype=torch.int64, device=self.device)
            pos = torch.arange(t, device=self.device)[None, :].expand(b, t)
            slots = torch.arange(b, dtype=torch.int64, device=self.device)
            fb = self.masked_batch(slots, pos, t)
            logits = self.model.lm_head(self.model.hidden_states(tok, self.cache, fb, self.ops)[:, -1])
        rich = SamplingParams(
            temperature=0.7,
            top_p=0.9,
            top_k=40,
            min_p=0.05,
            repetition_penalty=1.1,
            logprobs=True,
            top_logprobs=2,
            seed=1,
        )
        specs = [SampleRow(rich, [1, 2, 3], 3, (0,)), SampleRow(SamplingParams(temperature=0.0), [], 3)]
        self._results(sample(torch.cat([logits[:1], logits[:1]]), specs, self._generator), specs)

    def _prefill(self, entries: list[ScheduledSeq]) -> Tensor:
        """Feed the prompt chunks of `entries` (any lengths, each more than one token), packed into
        as few forwards as hold them; logits [len(entries), V] of each chunk's last token."""
        segments = []
        for e in entries:
            p0, slot = e.seq.num_computed_tokens, e.seq.slot
            assert slot is not None
            segments.append(Segment(e.seq.all_token_ids[p0 : p0 + e.num_new_tokens], slot, p0))
        parts = [self._prefill_packed(group) for group in self._pack(segments)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _pack(self, segments: list[Segment]) -> list[list[Segment]]:
        """Consecutive segments grouped into forwards of at most `max_segments` segments and
        `_packed_tokens` token rows (`packed_rows`: a segment takes SEGMENT_TOKENS rows at least; a
        longer segment alone)."""
        groups: list[list[Segment]] = []
        tokens = 0
        for seg in segments:
            n = len(seg.ids)
            k = len(groups[-1]) + 1 if groups else 0
            if groups and packed_rows(tokens + n, k) <= self._packed_tokens and k <= self.max_segments:
                groups[-1].append(seg)
                tokens += n
            else:
                groups.append([seg])
                tokens = n
        return groups

    def _prefill_packed(self, segments: list[Segment]) -> Tensor:
        """One forward over the packed segments: logits [len(segments), V]. The graph of their token
        bucket when there is one, else eager (the chunk attention on CUDA, SDPA with a mask on CPU)."""
        n = packed_rows(sum(len(seg.ids) for seg in segments), len(segments))
        if self.chunk_graphs is not None and n <= self._packed_tokens and chunk_size(n) is not None:
            return self.chunk_graphs.replay(segments)
        return self._prefill_eager(segments)

    def _prefill_eager(self, segments: list[Segment]) -> Tensor:
        """`_prefill_packed` without a graph."""
        n = sum(len(seg.ids) for seg in segments)
        if self._chunk_attention:
            layout = PackLayout(n, len(segments))
            return self.packed_forward(*layout.views(self._to_device(layout.pack(segments))))
        return self._prefill_masked(segments)

    def _prefill_masked(self, segments: list[Segment]) -> Tensor:
        """`packed_forward` through SDPA (no chunk attention: CPU): one segment attends with the
        bottom-right causal mask over its slot's positions; several over their slots' first `kv_len`
        positions concatenated, each token masked to its own slot's positions up to its own."""
        lengths = torch.tensor([len(seg.ids) for seg in segments])
        tok = self._to_device(torch.tensor([[t for seg in segments for t in seg.ids]], dtype=torch.int64))  # [1, T]
        pos = self._to_device(
            torch.tensor([[p for seg in segments for p in range(seg.start, seg.start + len(seg.ids))]])
        )  # [1, T]
        slots = self._to_device(torch.tensor([seg.slot for seg in segments], dtype=torch.int64))  # [S]
        last = self._to_device(lengths.cumsum(0) - 1)  # [S]
        kv_len = max(seg.start + len(seg.ids) for seg in segments)
        if len(segments) == 1:
            return self._last_logits(tok, self.masked_batch(slots, pos, kv_len), last)
        seg_of = torch.repeat_interleave(torch.arange(len(segments)), lengths).to(self.device)  # [T]
        key = torch.arange(len(segments) * kv_len, device=self.device)  # j kv_len + p: position p of slot j
        allowed = (key[None, :] // kv_len == seg_of[:, None]) & (key[None, :] % kv_len <= pos[0][:, None])
        fb = ForwardBatch(
            slots=slots,
            positions=pos,
            write_pos=pos,
            mask=additive_mask(allowed[None, None], self.dtype),  # [1, 1, T, S kv_len]
            rows=slots[seg_of][None, :],
            kv_concat=True,
        )
        return self._last_logits(tok, fb, last)

    def masked_batch(self, slots: Tensor, pos: Tensor, kv_len: int) -> ForwardBatch:
        """Rows of tokens fed at positions `pos` [B, T] of their `slots` [B], each attending to its
        slot's positions up to its own (a causal mask over the first `kv_len` positions)."""
        mask = additive_mask((self._arange[:kv_len][None, None, :] <= pos[:, :, None]).unsqueeze(1), self.dtype)
        return ForwardBatch(slots=slots, positions=pos, write_pos=pos, mask=mask, causal_tail=slots.shape[0] == 1)

    def _refusal(self, e: ScheduledSeq) -> str | None:
        """Why this entry cannot go to the model (None when it can)."""
        seq = e.seq
        if seq.slot is None:
            return "the sequence holds no slot"
        if e.num_new_tokens == 1 and seq.num_computed_tokens == seq.num_tokens:  # its token is on the device
            if seq.slot not in self._last_sampled:
                return "the sequence's next token is not known"
            if seq.num_tokens + 1 > min(seq.max_total_tokens, self._max_len):
                return f"1 new token at position {seq.num_tokens} does not fit the sequence's reservation"
            return None
        return entry_refusal(e, self._max_len, self.model.args.vocab_size)

    def can_launch_ahead(self, batch: list[ScheduledSeq]) -> bool:
        # plain greedy rows only: penalties, grammars, seeds and min_tokens read the tokens so far;
        # speculation verifies guesses made from the tokens so far, so it runs one step at a time
        if self.speculator is not None:
            return False
        return all(not e.sample or self._plain_greedy(e.seq) for e in batch)

    def step(self, batch: list[ScheduledSeq]) -> list[SampleResult | None]:
        return self.launch(batch).results()

    def launch(self, batch: list[ScheduledSeq]) -> LaunchedStep:
        results, good = split_refused(batch, self._refusal)
        entries = [batch[i] for i in good]
        if entries and self.can_launch_ahead(entries):
            collect = self._launch_greedy(entries)

            def merged() -> list[SampleResult | None]:
                for i, result in zip(good, collect(), strict=True):
                    results[i] = result
                return results

            return LaunchedStep(batch, merged)
        self._last_sampled = frozenset()
        if entries and self.speculator is not None:  # rows with guesses verified apart, the rest via _step
            self.speculator.step(batch, good, results)
        elif entries:
            for i, result in zip(good, self._step(entries), strict=True):
                results[i] = result
        return LaunchedStep.finished(batch, results)

    def _launch_greedy(self, batch: list[ScheduledSeq]) -> Callable[[], list[SampleResult | None]]:
        """Run a step whose sampling rows are all plain greedy without waiting for it: each sampled id
        goes to its slot in `_next_ids`, and one asynchronous copy of that brings them to the host.
        Returns the function that waits for the copy and gives the results."""
        slots = [e.seq.slot for e in batch]
        with torch.inference_mode():
            decode = [e for e in batch if e.num_new_tokens == 1]
            if decode:
                logits, greedy = self._decode(decode)
                if greedy is None:
                    greedy = logits.argmax(dim=-1)
                self._next_ids[: greedy.shape[0]].copy_(greedy)  # row i is slot i
            prefill = [e for e in batch if e.num_new_tokens > 1]
            if prefill:
                logits = self._prefill(prefill)
                picked = [j for j, e in enumerate(prefill) if e.sample]
                if picked:
                    if len(picked) < len(prefill):
                        logits = logits[self._to_device(torch.tensor(picked, dtype=torch.int64))]
                    where = self._to_device(torch.tensor([prefill[j].seq.slot for j in picked], dtype=torch.int64))
                    self._next_ids.index_copy_(0, where, logits.float().argmax(dim=-1))
            for e in batch:
                e.seq.num_computed_tokens += e.num_new_tokens
            host = torch.empty(self._next_ids.shape, dtype=torch.int64, pin_memory=self._async_copies)
            host.copy_(self._next_ids, non_blocking=self._async_copies)
            event = None
            if self._async_copies:
                event = torch.cuda.Event()
                event.record()
        self._last_sampled = frozenset(s for e, s in zip(batch, slots, strict=True) if e.sample and s is not None)

        def collect() -> list[SampleResult | None]:
            if event is not None:
                event.synchronize()  # releases the GIL while the device works
            ids = host.tolist()
            pairs = zip(batch, slots, strict=True)
            return [SampleResult(ids[s]) if e.sample and s is not None else None for e, s in pairs]

        return collect

    def _step(self, batch: list[ScheduledSeq]) -> list[SampleResult | None]:
        if all(self._plain_greedy(e.seq) for e in batch if e.sample):
            return self._launch_greedy(batch)()  # no sampler: the argmax ids in one device -> host copy
        order: list[int] = []  # batch index of each sampled logits row
        parts: list[Tensor] = []
        results: list[SampleResult | None] = [None] * len(batch)
        with torch.inference_mode():
            decode = [i for i, e in enumerate(batch) if e.num_new_tokens == 1]
            if decode:
                logits, _ = self._decode([batch[i] for i in decode])
                picked = [i for i in decode if batch[i].sample]
                if picked:
                    idx = torch.tensor([batch[i].seq.slot for i in picked], dtype=torch.int64).to(self.device)
                    parts.append(logits[idx])
                    order.extend(picked)
            prefill = [i for i, e in enumerate(batch) if e.num_new_tokens > 1]
            if prefill:
                logits = self._prefill([batch[i] for i in prefill])
                picked = [j for j, i in enumerate(prefill) if batch[i].sample]
                if picked:
                    parts.append(logits[picked] if len(picked) < len(prefill) else logits)
                    order.extend(prefill[j] for j in picked)
            for e in batch:
                e.seq.num_computed_tokens += e.num_new_tokens
            if order:
                specs = [self._sample_row(batch[i].seq) for i in order]
                for i, res in zip(order, self._sample_rows(torch.cat(parts), specs), strict=True):
                    results[i] = self._follow_grammar(batch[i].seq, res)
        return results

    def _follow_grammar(self, seq: Sequence, result: SampleResult) -> SampleResult:
        """Feed a constrained sequence's new token to its matcher."""
        matcher = self._grammars.get(seq.slot) if seq.slot is not None else None
        if matcher is None or result.error is not None:
            return result
        try:
            matcher.accept(result.token_id)
        except RuntimeError as exc:
            return SampleResult.failed(str(exc))
        return result

    def _sample_rows(self, logits: Tensor, specs: list[SampleRow]) -> list[SampleResult]:
        """Sample every row at once; when that raises, row by row, so only the rows that fail fail."""
        try:
            return self._results(sample(logits, specs, self._generator), specs)
        except Exception:
            if len(specs) == 1:
                logger.exception("sampling failed")
                return [SampleResult.failed("sampling failed")]
        results: list[SampleResult] = []
        for j, spec in enumerate(specs):
            try:
                results.extend(self._results(sample(logits[j : j + 1], [spec], self._generator), [spec]))
            except Exception as exc:
                logger.exception("sampling failed for one row")
                results.append(SampleResult.failed(f"sampling failed: {exc}"))
        return results

    def _plain_greedy(self, seq: Sequence) -> bool:
        p = seq.params
        return (
            p.is_greedy
            and not p.logprobs
            and not p.has_penalties
            and not p.logit_bias
            and p.grammar is None
            and seq.num_output_tokens >= p.min_tokens
        )

    def _matcher(self, grammar: str) -> GuidanceMatcher:
        """A new matcher for `grammar` (ValueError when it cannot be parsed or llguidance is missing)."""
        if not self.supports_grammar or self._tokenizer is None:
            raise ValueError("constrained decoding on the torch runner needs llguidance: pip install llguidance")
        if self._guidance_tokenizer is None:
            from llguidance.hf import from_tokenizer

            hf = getattr(self._tokenizer, "hf", None)
            if hf is None:
                raise ValueError("constrained decoding needs a Hugging Face tokenizer")
            self._guidance_tokenizer = from_tokenizer(hf, n_vocab=self.args.vocab_size, eos_token=list(self._eos_ids))
        return GuidanceMatcher(self._guidance_tokenizer, grammar, self.args.vocab_size, self._eos_ids)

    # --- sampling ----------------------------------------------------------------------------------
    def _sample_row(self, seq: Sequence) -> SampleRow:
        p = seq.params
        history: list[int] = []
        if p.has_penalties and p.penalty_last_n != 0:
            toks = seq.all_token_ids
            history = toks if p.penalty_last_n < 0 else toks[-p.penalty_last_n :]
        banned: tuple[int, ...] = ()
        if seq.num_output_tokens < p.min_tokens:
            banned = tuple(dict.fromkeys(self._eos_ids + tuple(p.stop_token_ids)))
        allowed = None
        matcher = self._grammars.get(seq.slot) if seq.slot is not None else None
        if matcher is not None:
            allowed = torch.from_numpy(matcher.allowed()).to(self.device, non_blocking=True)
        return SampleRow(p, history, seq.num_tokens, banned, allowed)

    def _results(self, out: SampleOutput, specs: list[SampleRow]) -> list[SampleResult]:
        tokens = out.tokens.tolist()  # the one device -> host sync of the step
        if out.logprobs is None:
            return [SampleResult(t) for t in tokens]
        chosen = out.logprobs.tolist()
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lp = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        results = []
        for j, (tok, spec) in enumerate(zip(tokens, specs, strict=True)):
            if not spec.params.logprobs:
                results.append(SampleResult(tok))
                continue
            top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()
            if top_ids is not None and top_lp is not None and spec.params.top_logprobs:
                k = spec.params.top_logprobs
                top = tuple(self._top_entry(t, lp) for t, lp in zip(top_ids[j][:k], top_lp[j][:k], strict=True))
            text, raw = self._piece(tok)
            results.append(SampleResult(tok, TokenLogprob(tok, text, chosen[j], raw, top)))
        return results

    def _top_entry(self, token_id: int, logprob: float) -> tuple[str, float, tuple[int, ...]]:
        text, raw = self._piece(token_id)
        return text, logprob, raw

    def _piece(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        raw = self._tokenizer.token_bytes(token_id) if self._tokenizer is not None else b""
        return raw.decode("utf-8", errors="replace"), tuple(raw)

    def close(self) -> None:
        if self.graphs is not None:
            self.graphs.clear()
        if self.chunk_graphs is not None:
            self.chunk_graphs.clear()
