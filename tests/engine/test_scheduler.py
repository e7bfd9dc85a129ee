"""The scheduler and the engine loop on a scripted runner, no model: admission (FCFS, slots, KV
capacity), batching up to the maximum batch, chunked prefill, the queue bound, aborts and deadlines,
finishing on stop conditions and the token budget, failures of one request or one step, and the
prefix reuse the runner reports."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from deepseek_serve.engine.errors import ContextLengthError, InvalidRequestError, QueueFullError
from deepseek_serve.engine.llm_engine import EngineConfig, LLMEngine
from deepseek_serve.engine.runners import Runner, SampleResult, ScheduledSeq, Tokenizer
from deepseek_serve.engine.scheduler import prompt_chunk_cap
from deepseek_serve.engine.sequence import Sequence, SequenceStatus
from deepseek_serve.engine.types import GenerationRequest, SamplingParams, StreamDelta

EOS = 0
SPACE = 27


class LetterTokenizer(Tokenizer):
    """Token 0 is EOS, 1..26 are the letters a..z, 27 is a space."""

    @property
    def vocab_size(self) -> int:
        return 28

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (EOS,)

    @property
    def bos_token(self) -> str | None:
        return None

    @property
    def eos_token(self) -> str | None:
        return "</s>"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [SPACE if c == " " else ord(c) - ord("a") + 1 for c in text]

    def token_bytes(self, token_id: int) -> bytes:
        if token_id == EOS:
            return b""
        return b" " if token_id == SPACE else bytes([ord("a") + token_id - 1])


def letters(text: str) -> list[int]:
    return LetterTokenizer().encode(text)


@dataclass
class Step:
    """What the runner was asked to do in one step: (request id, tokens fed, sample) per entry."""

    entries: list[tuple[str, int, bool]]

    @property
    def request_ids(self) -> list[str]:
        return [rid for rid, _, _ in self.entries]


@dataclass
class ScriptedRunner(Runner):
    """Slots and a KV budget like a real runner; the tokens it "samples" come from `script`
    (request id -> tokens, in order), else the letter x. A freed sequence's tokens stay as a prefix
    cache entry that the next allocation reuses (all but the last prompt token at most)."""

    slots: int = 4
    capacity: int = 1024
    context: int = 256
    script: dict[str, list[int]] = field(default_factory=dict)
    fail_allocate: set[str] = field(default_factory=set)
    fail_sample: set[str] = field(default_factory=set)
    fail_step: bool = False
    steps: list[Step] = field(default_factory=list)
    freed: list[str] = field(default_factory=list)
    cached: list[list[int]] = field(default_factory=list)
    cache_clears: int = 0
    _held: dict[str, int] = field(default_factory=dict)

    name = "scripted"

    @property
    def tokenizer(self) -> Tokenizer:
        return LetterTokenizer()

    @property
    def max_num_seqs(self) -> int:
        return self.slots

    @property
    def max_model_len(self) -> int:
        return self.context

    @property
    def kv_capacity_tokens(self) -> int:
        return self.capacity

    @property
    def kv_used_tokens(self) -> int:
        return sum(self._held.values())

    @property
    def chat_template(self) -> str | None:
        return None

    def can_allocate(self, seq: Sequence) -> bool:
        return len(self._held) < self.slots and self.kv_used_tokens + seq.max_total_tokens <= self.capacity

    def allocate(self, seq: Sequence) -> int:
        if seq.request_id in self.fail_allocate:
            raise RuntimeError("no sampler for this request")
        reused = 0
        for tokens in self.cached:
            n = 0
            while n < min(len(tokens), seq.num_prompt_tokens - 1) and tokens[n] == seq.prompt_token_ids[n]:
                n += 1
            reused = max(reused, n)
        self._held[seq.request_id] = seq.max_total_tokens
        seq.slot = len(self._held) - 1
        seq.num_computed_tokens = seq.num_cached_tokens = reused
        return reused

    def step(self, batch: list[ScheduledSeq]) -> list[SampleResult | None]:
        self.steps.append(Step([(item.seq.request_id, item.num_new_tokens, item.sample) for item in batch]))
        if self.fail_step:
            raise RuntimeError("device lost")
        results: list[SampleResult | None] = []
        for item in batch:
            seq = item.seq
            assert seq.request_id in self._held, "a sequence without a slot was scheduled"
            if seq.request_id in self.fail_sample:
                results.append(SampleResult.failed("sampler raised"))
                continue
            seq.num_computed_tokens += item.num_new_tokens
            if not item.sample:
                results.append(None)
                continue
            script = self.script.get(seq.request_id)
            results.append(SampleResult(script.pop(0) if script else letters("x")[0]))
        return results

    def free(self, seq: Sequence) -> None:
        del self._held[seq.request_id]
        self.freed.append(seq.request_id)
        self.cached.append(seq.all_token_ids[: seq.num_computed_tokens])

    def clear_prefix_cache(self) -> int:
        self.cache_clears += 1
        dropped = sum(len(t) for t in self.cached)
        self.cached.clear()
        return dropped


def make_engine(runner: ScriptedRunner | None = None, **config: float) -> tuple[LLMEngine, ScriptedRunner]:
    runner = runner or ScriptedRunner()
    return LLMEngine(runner, EngineConfig(**config)), runner  # type: ignore[arg-type]


def submit(engine: LLMEngine, request_id: str, prompt: str = "hello", **params: object) -> Sequence:
    deadline_s = params.pop("deadline_s", None)
    request = GenerationRequest(
        request_id,
        prompt=prompt,
        params=SamplingParams(temperature=0.0, **params),  # type: ignore[arg-type]
        deadline_s=deadline_s,  # type: ignore[arg-type]
    )
    seq = engine.make_sequence(request)
    engine.add_sequence(seq)
    return seq


@dataclass
class Run:
    """Every output of the steps taken, by request id."""

    deltas: dict[str, list[StreamDelta]] = field(default_factory=dict)
    scheduled: list[str] = field(default_factory=list)

    def text(self, request_id: str) -> str:
        return "".join(d.text for d in self.deltas[request_id])

    def last(self, request_id: str) -> StreamDelta:
        delta = self.deltas[request_id][-1]
        assert delta.finished
        return delta


def run(engine: LLMEngine, until: Callable[[], bool] | None = None, max_steps: int = 1000) -> Run:
    """Steps the engine until it has no work (or `until()` holds)."""
    out = Run()
    for _ in range(max_steps):
        if not engine.has_work() or (until is not None and until()):
            return out
        for request_id, delta, scheduled in engine.step():
            if scheduled:
                out.scheduled.append(request_id)
            if delta is not None:
                out.deltas.setdefault(request_id, []).append(delta)
    raise AssertionError(f"the engine still has work after {max_steps} steps")


# --- finishing ---------------------------------------------------------------------------------------------
def test_a_request_runs_to_its_token_budget() -> None:
    engine, runner = make_engine()
    submit(engine, "r", "hello", max_tokens=5)
    out = run(engine)
    assert out.scheduled == ["r"]
    assert out.text("r") == "xxxxx"
    last = out.last("r")
    assert last.finish_reason == "length" and last.error is None
    assert last.usage is not None and (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, 5)
    # the whole prompt in one step (it fits the chunk), then one token per step
    assert [s.entries for s in runner.steps] == [[("r", 5, True)]] + [[("r", 1, True)]] * 4
    assert runner.freed == ["r"] and runner.kv_used_tokens == 0
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.steps_total) == (0, 0, 5)
    assert (stats.prompt_tokens_total, stats.generation_tokens_total) == (5, 5)


def test_without_max_tokens_the_budget_is_the_default_capped_by_the_context() -> None:
    engine, _ = make_engine(ScriptedRunner(context=12), default_max_tokens=100)
    submit(engine, "r", "hello")
    out = run(engine)
    assert out.last("r").finish_reason == "length"
    assert out.last("r").usage.completion_tokens == 12 - 5  # type: ignore[union-attr]


def test_eos_stops_without_being_counted_or_shown() -> None:
    engine, runner = make_engine()
    runner.script["r"] = [*letters("ab"), EOS, *letters("cd")]
    submit(engine, "r", max_tokens=10)
    out = run(engine)
    last = out.last("r")
    assert out.text("r") == "ab" and last.finish_reason == "stop"
    assert last.usage is not None and last.usage.completion_tokens == 2


def test_ignore_eos_and_min_tokens_keep_generating_past_eos() -> None:
    engine, runner = make_engine()
    runner.script["ignore"] = [EOS, EOS, *letters("a")]
    runner.script["min"] = [EOS, *letters("b"), EOS, *letters("c")]
    submit(engine, "ignore", max_tokens=3, ignore_eos=True)
    submit(engine, "min", max_tokens=10, min_tokens=1)
    out = run(engine)
    assert out.last("ignore").finish_reason == "length"
    assert out.last("ignore").usage.completion_tokens == 3  # type: ignore[union-attr]
    # the first EOS comes before min_tokens: kept (as text it is empty); the second one stops
    assert out.text("min") == "b" and out.last("min").finish_reason == "stop"
    assert out.last("min").usage.completion_tokens == 2  # type: ignore[union-attr]


def test_stop_token_ids_and_stop_strings() -> None:
    engine, runner = make_engine()
    runner.script["ids"] = letters("abz") + letters("q")
    runner.script["text"] = letters("one two three")
    submit(engine, "ids", max_tokens=10, stop_token_ids=(letters("z")[0],))
    submit(engine, "text", max_tokens=20, stop=(" tw",))
    out = run(engine)
    assert out.text("ids") == "ab" and out.last("ids").finish_reason == "stop"
    assert out.text("text") == "one" and out.last("text").finish_reason == "stop"


# --- admission and batching --------------------------------------------------------------------------------
def test_batch_grows_to_the_maximum_and_admits_in_arrival_order() -> None:
    engine, runner = make_engine(max_batch_size=2)
    for i in range(5):
        submit(engine, f"r{i}", max_tokens=2 + i)
    assert engine.stats().num_waiting == 5
    out = run(engine)
    assert out.scheduled == [f"r{i}" for i in range(5)]
    assert max(len(s.entries) for s in runner.steps) == 2
    assert len(runner.steps[0].entries) == 2  # both slots taken at once
    assert all(out.last(f"r{i}").usage.completion_tokens == 2 + i for i in range(5))  # type: ignore[union-attr]
    # a slot freed by a finished sequence is taken in the next step
    first_step = {rid: next(n for n, s in enumerate(runner.steps) if rid in s.request_ids) for rid in out.scheduled}
    assert first_step["r2"] == 2  # r0 (2 tokens) finished in step 1


def test_the_batch_is_bounded_by_the_runners_slots() -> None:
    engine, runner = make_engine(ScriptedRunner(slots=3), max_batch_size=8)
    assert engine.scheduler.max_batch_size == 3
    for i in range(6):
        submit(engine, f"r{i}", max_tokens=4)
    run(engine)
    assert max(len(s.entries) for s in runner.steps) == 3


def test_kv_capacity_holds_back_admission_without_overtaking() -> None:
    # "big" (prompt 5 + 41) cannot fit next to "first" (5 + 10); "small" behind it would, but waits
    engine, runner = make_engine(ScriptedRunner(capacity=60))
    submit(engine, "first", max_tokens=10)
    submit(engine, "big", max_tokens=41)
    submit(engine, "small", max_tokens=1)
    engine.step()
    assert [s.request_id for s in engine.scheduler.running] == ["first"]
    assert [s.request_id for s in engine.scheduler.waiting] == ["big", "small"]
    out = run(engine)
    assert out.scheduled == ["big", "small"]
    assert not any({"first", "small"} <= set(s.request_ids) for s in runner.steps)


def test_chunked_prefill_shares_each_step_with_decoding_sequences() -> None:
    engine, runner = make_engine(prefill_chunk_tokens=4)
    submit(engine, "short", "ab", max_tokens=8)
    engine.step()  # "short": its 2-token prompt, then it decodes
    submit(engine, "long", "abcdefghij", max_tokens=2)
    for _ in range(4):
        engine.step()
    # each step: the decoding sequence's one token first, then 3 of the budget of 4 for the prompt
    assert [s.entries for s in runner.steps[1:4]] == [
        [("short", 1, True), ("long", 3, False)],
        [("short", 1, True), ("long", 3, False)],
        [("short", 1, True), ("long", 3, False)],
    ]
    assert runner.steps[4].entries == [("short", 1, True), ("long", 1, True)]  # the last chunk samples
    run(engine)


def test_beside_decoding_streams_a_long_prompts_chunk_is_capped_and_short_prompts_are_not() -> None:
    engine, runner = make_engine(prefill_chunk_tokens=8, long_prefill_tokens=4)
    submit(engine, "first", "abcdefghijkl", max_tokens=4)
    engine.step()
    assert runner.steps[0].entries == [("first", 8, False)]  # nothing decodes: the whole chunk
    engine.step()
    assert runner.steps[1].entries == [("first", 4, True)]
    submit(engine, "long", "abcdefghij", max_tokens=1)
    submit(engine, "short", "abc", max_tokens=1)
    engine.step()
    # "first" decodes: one prompt's chunk and the decode row stay within 4 tokens; the next prompt
    # takes what the cap leaves it of the step's 8
    assert runner.steps[2].entries == [("first", 1, True), ("long", 3, False), ("short", 3, True)]
    engine.step()
    assert runner.steps[3].entries == [("first", 1, True), ("long", 3, False)]  # "short" had its one token
    run(engine)


def test_prompt_chunk_cap_bounds() -> None:
    assert prompt_chunk_cap(0, 512, 256) == 512
    assert prompt_chunk_cap(63, 512, 256) == 193
    assert prompt_chunk_cap(250, 512, 256) == 64  # a full batch of decoding streams: a quarter still goes
    assert prompt_chunk_cap(3, 128, 256) == 125  # at most the step's chunk
    assert prompt_chunk_cap(5, 16, 16) == 11
    assert prompt_chunk_cap(40, 3, 3) == 1


# --- the queue bound ---------------------------------------------------------------------------------------
def test_queue_full_is_refused_with_a_retry_hint() -> None:
    engine, _ = make_engine(max_batch_size=1, max_queue_size=2)
    for i in range(3):
        submit(engine, f"r{i}", max_tokens=2)
    with pytest.raises(QueueFullError) as refused:
        submit(engine, "r3", max_tokens=2)
    assert refused.value.retry_after_s >= 1.0
    engine.step()  # r0 runs: it still counts, so the system is still full
    with pytest.raises(QueueFullError):
        submit(engine, "r3", max_tokens=2)
    run(engine)
    submit(engine, "r4", max_tokens=2)  # room again
    assert run(engine).last("r4").finish_reason == "length"


# --- aborts, deadlines, failures ---------------------------------------------------------------------------
def test_abort_of_a_waiting_and_of_a_running_request() -> None:
    engine, runner = make_engine(max_batch_size=1)
    submit(engine, "running", max_tokens=50)
    submit(engine, "waiting", max_tokens=50)
    engine.step()
    engine.abort("waiting")
    out = run(engine, until=lambda: "waiting" in runner.freed or not engine.scheduler.waiting)
    assert out.last("waiting").finish_reason == "abort"
    assert all("waiting" not in s.request_ids for s in runner.steps)  # never scheduled, no slot taken
    engine.abort("running")
    out = run(engine)
    last = out.last("running")
    assert last.finish_reason == "abort" and last.error is None
    assert runner.freed == ["running"] and runner.kv_used_tokens == 0
    assert not engine.has_work()


def test_a_request_past_its_deadline_times_out() -> None:
    engine, runner = make_engine()
    submit(engine, "late", max_tokens=50, deadline_s=0.3)
    submit(engine, "fine", max_tokens=3)
    engine.step()
    time.sleep(0.35)
    out = run(engine)
    last = out.last("late")
    assert last.finish_reason == "timeout" and last.error == "request timed out"
    assert out.last("fine").finish_reason == "length"
    assert "late" in runner.freed


def test_a_failed_allocation_ends_that_request_alone() -> None:
    engine, runner = make_engine()
    runner.fail_allocate.add("bad")
    submit(engine, "bad", max_tokens=3)
    submit(engine, "good", max_tokens=3)
    out = run(engine)
    assert out.last("bad").finish_reason == "error"
    assert "allocation failed: no sampler" in (out.last("bad").error or "")
    assert out.last("good").finish_reason == "length"
    assert engine.scheduler.num_running == 0


def test_a_failed_entry_ends_that_request_alone() -> None:
    engine, runner = make_engine()
    runner.fail_sample.add("bad")
    submit(engine, "bad", max_tokens=3)
    submit(engine, "good", max_tokens=3)
    out = run(engine)
    assert out.last("bad").finish_reason == "error" and out.last("bad").error == "sampler raised"
    assert out.text("good") == "xxx"


def test_a_failed_step_ends_its_batch_and_the_engine_goes_on() -> None:
    engine, runner = make_engine()
    runner.fail_step = True
    submit(engine, "a", max_tokens=3)
    submit(engine, "b", max_tokens=3)
    out = run(engine)
    assert {rid: out.last(rid).error for rid in "ab"} == {rid: "forward step failed: device lost" for rid in "ab"}
    runner.fail_step = False
    submit(engine, "c", max_tokens=3)
    assert run(engine).text("c") == "xxx"


def test_fail_all_ends_running_and_waiting_requests() -> None:
    engine, runner = make_engine(max_batch_size=1)
    submit(engine, "running", max_tokens=50)
    submit(engine, "waiting", max_tokens=50)
    engine.step()
    ended = {rid: delta for rid, delta, _ in engine.fail_all("engine loop crashed") if delta is not None}
    assert {rid: d.finish_reason for rid, d in ended.items()} == {"running": "error", "waiting": "error"}
    assert not engine.has_work() and runner.kv_used_tokens == 0


# --- validation before any work -------------------------------------------------------------------------
def test_requests_that_cannot_fit_or_are_invalid_are_refused_at_submission() -> None:
    engine, _ = make_engine(ScriptedRunner(context=16))
    with pytest.raises(ContextLengthError):
        submit(engine, "long", "a" * 16)
    with pytest.raises(ContextLengthError):
        submit(engine, "budget", "abc", max_tokens=14)
    with pytest.raises(InvalidRequestError, match="empty"):
        submit(engine, "empty", "")
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.make_sequence(GenerationRequest("ids", prompt_token_ids=(1, 99)))
    with pytest.raises(InvalidRequestError) as grammar:
        submit(engine, "grammar", grammar='root ::= "a"')
    assert grammar.value.param == "response_format"
    assert not engine.has_work()


# --- prefix reuse ------------------------------------------------------------------------------------------
def test_a_reused_prefix_is_not_computed_again_and_is_counted() -> None:
    engine, runner = make_engine()
    submit(engine, "first", "the cat sat", max_tokens=2)
    run(engine)
    submit(engine, "second", "the cat ran", max_tokens=2)
    out = run(engine)
    # "the cat " (8 tokens) comes from the cache: the first step feeds the other 3 prompt tokens
    assert runner.steps[-2].entries == [("second", 3, True)]
    assert out.last("second").usage.cached_tokens == 8  # type: ignore[union-attr]
    stats = engine.stats()
    assert (stats.prefix_cache_queries_tokens_total, stats.prefix_cache_hits_tokens_total) == (22, 8)


def test_a_prefix_cache_clear_runs_on_the_engine_thread_and_signals_done() -> None:
    engine, runner = make_engine()
    submit(engine, "r", "the cat", max_tokens=1)
    run(engine)
    done = engine.request_prefix_cache_clear()
    assert engine.has_work() and not done.is_set()
    engine.step()
    assert done.is_set() and runner.cache_clears == 1 and runner.cached == []


def test_sequences_move_between_waiting_running_and_finished() -> None:
    engine, _ = make_engine()
    seq = submit(engine, "r", max_tokens=2)
    assert seq.status is SequenceStatus.WAITING
    engine.step()
    assert seq.status is SequenceStatus.RUNNING and seq.first_scheduled_time is not None
    run(engine)
    assert seq.is_finished and seq.finish_reason == "length" and seq.first_token_time is not None
