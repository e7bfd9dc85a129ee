"""LLMEngine: the synchronous core. `step()` = take aborts and deadlines, admit, schedule, run, postprocess.

With a runner that supports it (`Runner.supports_overlap`, `EngineConfig.overlap`), postprocessing lags
one step behind: `step()` launches step N+1 and then takes in step N's tokens (detokenize, stop checks,
deltas) while the device computes N+1. A sequence that ends at step N still has a row in N+1, whose
result is dropped; a batch that cannot be launched ahead (sampling that reads the tokens so far) first
waits for step N.

Thread contract: `make_sequence`, `add_sequence` and `abort` may be called from any thread;
everything else runs on the engine's single worker thread (see AsyncEngine).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from deepseek_serve.engine.detokenizer import IncrementalDetokenizer
from deepseek_serve.engine.errors import ContextLengthError, InvalidRequestError
from deepseek_serve.engine.runners import LaunchedStep, Runner, SampleResult, ScheduledSeq, Tokenizer
from deepseek_serve.engine.scheduler import Scheduler
from deepseek_serve.engine.sequence import Sequence
from deepseek_serve.engine.types import (
    EngineStats,
    FinishReason,
    GenerationRequest,
    RequestTimings,
    SamplingParams,
    StreamDelta,
    TokenLogprob,
    Usage,
)

logger = logging.getLogger(__name__)

# (request_id, delta or None, just scheduled)
Output = tuple[str, StreamDelta | None, bool]


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 8
    max_queue_size: int = 64
    prefill_chunk_tokens: int = 512
    long_prefill_tokens: int | None = None  # None: prefill_chunk_tokens (see scheduler.prompt_chunk_cap)
    default_max_tokens: int = 1024
    request_timeout_s: float = 600.0
    burst_wait_s: float = 0.0  # idle engine: wait while requests keep arriving (see AsyncEngine._run)
    overlap: bool = True  # launch step N+1 before taking in step N's tokens, where the runner can


@dataclass
class _Counters:
    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    last_step: float = 0.0


@dataclass(eq=False)
class _SeqState:
    """Per-sequence bookkeeping that only the engine thread touches."""

    seq: Sequence
    detok: IncrementalDetokenizer
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)


def check_token_ids(ids: Iterable[int], vocab_size: int, param: str = "prompt") -> None:
    """Raise InvalidRequestError unless every id is a token of the vocabulary."""
    bad = next((t for t in ids if not (isinstance(t, int) and 0 <= t < vocab_size)), None)
    if bad is not None:
        raise InvalidRequestError(
            f"Invalid value for '{param}': token id {bad} is outside the vocabulary [0, {vocab_size})", param=param
        )


def check_request(
    params: SamplingParams,
    ids: list[int],
    *,
    vocab_size: int,
    max_model_len: int,
    default_max_tokens: int,
    context: bool = True,
) -> int:
    """Everything that only the model knows (vocabulary, context); returns the completion budget.
    Raises InvalidRequestError / ContextLengthError naming the field. `context=False` leaves out
    prompt + max_tokens against the context (the budget is then not meaningful). Any thread."""
    params.validate()
    if params.top_k > vocab_size:
        raise InvalidRequestError(
            f"Invalid value for 'top_k': {params.top_k} is greater than the vocabulary size ({vocab_size})",
            param="top_k",
        )
    check_token_ids((t for t, _ in params.logit_bias), vocab_size, "logit_bias")
    check_token_ids(params.stop_token_ids, vocab_size, "stop_token_ids")
    if not ids:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    max_len = max_model_len
    if not context:
        check_token_ids(ids, vocab_size)
        return params.max_tokens or 1
    if len(ids) >= max_len:  # before the per-id check below, which would walk all of a huge list
        raise ContextLengthError(len(ids), params.max_tokens or 1, max_len)
    check_token_ids(ids, vocab_size)
    if params.max_tokens is not None:
        max_tokens = params.max_tokens
        if len(ids) + max_tokens > max_len:
            error = ContextLengthError(len(ids), max_tokens, max_len)
            if max_tokens >= max_len:  # no prompt could fit: the completion budget is what is wrong
                error.param = "max_tokens"
            raise error
    else:
        max_tokens = min(default_max_tokens, max_len - len(ids))
    return max_tokens


@dataclass(frozen=True)
class RequestChecker:
    """The request checks of one loaded model: what `make_sequence` and `check_request` need to know
    (tokenizer, vocabulary, context, default budget and timeout, whether the runner can constrain
    decoding). `LLMEngine` uses it, and so does the API side of an engine in another process
    (engine/process.py), which receives it pickled and validates without a round trip. Any thread."""

    tokenizer: Tokenizer
    vocab_size: int
    max_model_len: int
    default_max_tokens: int
    request_timeout_s: float
    runner_name: str
    supports_grammar: bool

    @classmethod
    def for_runner(cls, runner: Runner, config: EngineConfig) -> RequestChecker:
        return cls(
            tokenizer=runner.tokenizer,
            vocab_size=runner.tokenizer.vocab_size,
            max_model_len=runner.max_model_len,
            default_max_tokens=config.default_max_tokens,
            request_timeout_s=config.request_timeout_s,
            runner_name=runner.name,
            supports_grammar=runner.supports_grammar,
        )

    def make_sequence(self, request: GenerationRequest) -> Sequence:
        """Tokenize and validate; raises InvalidRequestError / ContextLengthError before any work."""
        params = request.params
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
        elif request.prompt is not None:
            ids = self.tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
        else:
            raise InvalidRequestError("either prompt or prompt_token_ids is required", param="prompt")
        max_tokens = self.check_request(params, ids)
        timeout = request.deadline_s if request.deadline_s is not None else self.request_timeout_s
        return Sequence(
            request_id=request.request_id,
            prompt_token_ids=ids,
            params=params,
            max_tokens=max_tokens,
            deadline=time.monotonic() + timeout,
        )

    def check_token_ids(self, ids: Iterable[int], param: str = "prompt") -> None:
        """Raise InvalidRequestError unless every id is a token of the vocabulary."""
        check_token_ids(ids, self.vocab_size, param)

    def check_request(self, params: SamplingParams, ids: list[int], context: bool = True) -> int:
        """`check_request` (above) with this model's vocabulary, context and default budget, and
        whether its runner can constrain decoding."""
        if params.grammar is not None and not self.supports_grammar:
            raise InvalidRequestError(
                f"The {self.runner_name} runner cannot constrain decoding on this server "
                "(response_format json_object/json_schema, forced tool calls): it needs the llguidance "
                "package (pip install llguidance).",
                param="response_format",
            )
        return check_request(
            params,
            ids,
            vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
            default_max_tokens=self.default_max_tokens,
            context=context,
        )


class LLMEngine:
    def __init__(self, runner: Runner, config: EngineConfig) -> None:
        self.runner = runner
        self.config = config
        self.tokenizer: Tokenizer = runner.tokenizer
        self.checker = RequestChecker.for_runner(runner, config)
        self.scheduler = Scheduler(
            runner,
            config.max_batch_size,
            config.max_queue_size,
            config.prefill_chunk_tokens,
            config.long_prefill_tokens,
        )
        self._states: dict[str, _SeqState] = {}
        self._abort_lock = threading.Lock()
        self._aborted: set[str] = set()
        self._cache_clears: list[threading.Event] = []
        self._eos = frozenset(self.tokenizer.eos_token_ids)
        self._counters = _Counters()
        self._overlap = config.overlap and runner.supports_overlap
        self._in_flight: LaunchedStep | None = None  # launched, its tokens not yet taken in

    # --- submission (any thread) -------------------------------------------------------------------------
    def make_sequence(self, request: GenerationRequest) -> Sequence:
        """Tokenize and validate (`RequestChecker.make_sequence`)."""
        return self.checker.make_sequence(request)

    def check_token_ids(self, ids: Iterable[int], param: str = "prompt") -> None:
        """Raise InvalidRequestError unless every id is a token of the vocabulary."""
        self.checker.check_token_ids(ids, param)

    def check_request(self, params: SamplingParams, ids: list[int], context: bool = True) -> int:
        """`RequestChecker.check_request` for this engine's runner."""
        return self.checker.check_request(params, ids, context)

    def add_sequence(self, seq: Sequence) -> None:
        """Enqueue; raises QueueFullError."""
        state = _SeqState(seq, IncrementalDetokenizer(self.tokenizer, seq.params.stop))
        self._states[seq.request_id] = state
        try:
            self.scheduler.add(seq)
        except BaseException:
            self._states.pop(seq.request_id, None)
            raise

    def abort(self, request_id: str) -> None:
        with self._abort_lock:
            self._aborted.add(request_id)

    def request_prefix_cache_clear(self) -> threading.Event:
        """Ask the engine thread to drop idle prefix-cache entries; the event is set once done."""
        done = threading.Event()
        with self._abort_lock:
            self._cache_clears.append(done)
        return done

    def has_work(self) -> bool:
        return (
            self.scheduler.has_work() or self._in_flight is not None or bool(self._aborted) or bool(self._cache_clears)
        )

    # --- the loop (engine thread) ------------------------------------------------------------------------
    def step(self) -> list[Output]:
        outputs: list[Output] = []
        self._reap(outputs)
        self._admit(outputs)
        batch = self.scheduler.schedule()
        previous, self._in_flight = self._in_flight, None
        if previous is not None and not (batch and self.runner.can_launch_ahead(batch)):
            self._take(previous, outputs)  # the next batch depends on these tokens: schedule it after them
            previous = None
            self._admit(outputs)
            batch = self.scheduler.schedule()
        launched = self._launch(batch, outputs) if batch else None
        if previous is not None:
            self._take(previous, outputs)
        if launched is not None:
            if self._overlap and not launched.done:
                self._in_flight = launched
            else:
                self._take(launched, outputs)
        return outputs

    def _admit(self, outputs: list[Output]) -> None:
        for seq in self.scheduler.admit():
            if seq.error is not None:
                self._finish(seq, "error", outputs, error=seq.error)
                continue
            self._counters.prompt_tokens += seq.num_prompt_tokens
            self._counters.prefix_queries += seq.num_prompt_tokens
            self._counters.prefix_hits += seq.num_cached_tokens
            outputs.append((seq.request_id, None, True))

    def _launch(self, batch: list[ScheduledSeq], outputs: list[Output]) -> LaunchedStep | None:
        try:
            return self.runner.launch(batch)
        except Exception as exc:  # isolate: fail this batch, keep the engine alive
            self._fail_step(batch, exc, outputs)
            return None

    def _fail_step(self, batch: list[ScheduledSeq], exc: Exception, outputs: list[Output]) -> None:
        logger.exception("forward step failed for %d sequences", len(batch))
        for item in batch:
            if not item.seq.is_finished:
                self._finish(item.seq, "error", outputs, error=f"forward step failed: {exc}")

    def _take(self, launched: LaunchedStep, outputs: list[Output]) -> None:
        """Take in a launched step's tokens. Entries whose sequence has ended since the launch (at the
        step before, or aborted) are dropped."""
        try:
            results = launched.results()
        except Exception as exc:
            self._fail_step(launched.batch, exc, outputs)
            return
        now = time.monotonic()
        self._counters.steps += 1
        self._counters.last_step = now
        for item, result in zip(launched.batch, results, strict=True):
            if result is None or item.seq.is_finished:
                continue
            if result.error is not None:  # this sequence alone failed inside the runner
                logger.error("request %s failed in the runner: %s", item.seq.request_id, result.error)
                self._finish(item.seq, "error", outputs, error=result.error)
            else:
                self._on_token(item.seq, result, now, outputs)

    def _reap(self, outputs: list[Output]) -> None:
        """Apply aborts and deadlines to waiting and running sequences."""
        with self._abort_lock:
            aborted, self._aborted = self._aborted, set()
            clears, self._cache_clears = self._cache_clears, []
        if clears:
            dropped = self.runner.clear_prefix_cache()
            logger.info("prefix cache cleared: %d cached tokens dropped", dropped)
            for done in clears:
                done.set()
        now = time.monotonic()

        def expired(s: Sequence) -> bool:
            return s.request_id in aborted or now > s.deadline

        for seq in self.scheduler.remove_waiting(expired):
            self._end_unscheduled(seq, aborted, outputs)
        for seq in [s for s in self.scheduler.running if expired(s)]:
            self._end_unscheduled(seq, aborted, outputs)

    def _end_unscheduled(self, seq: Sequence, aborted: set[str], outputs: list[Output]) -> None:
        if seq.request_id in aborted:
            self._finish(seq, "abort", outputs)
        else:
            self._finish(seq, "timeout", outputs, error="request timed out", flush=True)

    def _on_token(self, seq: Sequence, result: SampleResult, now: float, outputs: list[Output]) -> None:
        """Take in a step's tokens (one, or several under speculative decoding) in order; the sequence
        may end at any of them (stop token, stop string, max_tokens, context), and the rest are dropped."""
        state = self._states[seq.request_id]
        if seq.first_token_time is None:
            seq.first_token_time = now
        if result.drafted:
            seq.num_drafted_tokens += result.drafted
            seq.num_accepted_tokens += len(result.more)
        params = seq.params
        text = ""
        for token, logprob in result.tokens():
            is_eos = token in self._eos and not params.ignore_eos and seq.num_output_tokens >= params.min_tokens
            if is_eos or token in params.stop_token_ids:
                # the end token is not part of the completion text nor its token count.
                self._finish(seq, "stop", outputs, text=text, flush=True)
                return
            seq.output_token_ids.append(token)
            self._counters.generation_tokens += 1
            state.pending_ids.append(token)
            if logprob is not None:
                seq.output_logprobs.append(logprob)
                state.pending_logprobs.append(logprob)
            piece, hit_stop = state.detok.push(token)
            text += piece
            if hit_stop:
                self._finish(seq, "stop", outputs, text=text)
                return
            if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.runner.max_model_len:
                self._finish(seq, "length", outputs, text=text + state.detok.flush())
                return
        if text or state.pending_logprobs:
            outputs.append((seq.request_id, self._delta(state, text), False))
            state.pending_ids, state.pending_logprobs = [], []

    def _delta(self, state: _SeqState, text: str) -> StreamDelta:
        return StreamDelta(
            text=text,
            token_ids=tuple(state.pending_ids),
            logprobs=tuple(state.pending_logprobs) if state.seq.params.logprobs else None,
        )

    def _finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        outputs: list[Output],
        text: str = "",
        error: str | None = None,
        flush: bool = False,
    ) -> None:
        state = self._states.pop(seq.request_id, None)
        self.scheduler.finish(seq)
        seq.finish_reason = reason
        seq.error = error
        if flush and state is not None:
            text += state.detok.flush()
        now = time.monotonic()
        timings = RequestTimings(
            queue_s=(seq.first_scheduled_time or now) - seq.arrival_time,
            first_token_s=None if seq.first_token_time is None else seq.first_token_time - seq.arrival_time,
            total_s=now - seq.arrival_time,
        )
        delta = StreamDelta(
            text=text,
            token_ids=tuple(state.pending_ids) if state else (),
            logprobs=tuple(state.pending_logprobs) if state and seq.params.logprobs else None,
            finished=True,
            finish_reason=reason,
            usage=Usage(
                seq.num_prompt_tokens,
                seq.num_output_tokens,
                seq.num_cached_tokens,
                seq.num_drafted_tokens,
                seq.num_accepted_tokens,
            ),
            timings=timings,
            error=error,
        )
        outputs.append((seq.request_id, delta, False))

    def fail_all(self, message: str) -> list[Output]:
        """Last resort after an unexpected error in the loop itself: end every request with an error."""
        outputs: list[Output] = []
        self._in_flight = None
        for seq in list(self.scheduler.running) + self.scheduler.remove_waiting(lambda s: True):
            try:
                self._finish(seq, "error", outputs, error=message)
            except Exception:
                logger.exception("could not finish %s", seq.request_id)
        return outputs

    # --- introspection -----------------------------------------------------------------------------------
    def stats(self, is_running: bool = True) -> EngineStats:
        c = self._counters
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            max_batch_size=self.scheduler.max_batch_size,
            max_queue_size=self.scheduler.max_queue_size,
            kv_capacity_tokens=self.runner.kv_capacity_tokens,
            kv_used_tokens=self.runner.kv_used_tokens,
            last_step_monotonic=c.last_step,
            steps_total=c.steps,
            prompt_tokens_total=c.prompt_tokens,
            generation_tokens_total=c.generation_tokens,
            prefix_cache_queries_tokens_total=c.prefix_queries,
            prefix_cache_hits_tokens_total=c.prefix_hits,
            is_running=is_running,
            kv_cached_tokens=self.runner.kv_cached_tokens,
            speculative=self.runner.speculative_counts(),
        )

    def close(self) -> None:
        self.runner.close()
