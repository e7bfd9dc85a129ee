"""Overlapped steps (the engine launches step N+1 before taking in step N's tokens) against the same
engine stepping one at a time: the real `LLMEngine` and scheduler over `TorchRunner` on a tiny random
model with the real DeepSeek coder tokenizer (fp32 CPU, where the overlapped path runs the same code
without the device running ahead)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from deepseek_serve.engine.llm_engine import EngineConfig, LLMEngine
from deepseek_serve.engine.runners import ScheduledSeq
from deepseek_serve.engine.runners.pytorch.loading import load_model
from deepseek_serve.engine.runners.pytorch.runner import TorchRunner
from deepseek_serve.engine.runners.pytorch.tokenizer import HFTokenizer
from deepseek_serve.engine.sequence import Sequence
from deepseek_serve.engine.types import GenerationRequest, SamplingParams, StreamDelta
from tests.support.torch_models import CODER, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _ = tiny_checkpoint(tmp_path_factory.mktemp("coder"), CODER, with_tokenizer=True)
    return path


def make_engine(folder: Path, overlap: bool, slots: int = 6, chunk: int = 64) -> LLMEngine:
    model = load_model(folder, torch.float32, torch.device("cpu"))
    runner = TorchRunner(
        model, HFTokenizer(folder), num_slots=slots, max_len=256, device=torch.device("cpu"), dtype=torch.float32
    )
    return LLMEngine(runner, EngineConfig(max_batch_size=slots, prefill_chunk_tokens=chunk, overlap=overlap))


@dataclass
class Outcome:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    last: StreamDelta | None = None


def drive(engine: LLMEngine, arrivals: dict[int, list[GenerationRequest]], abort: dict[int, str]) -> dict[str, Outcome]:
    """Step the engine; at step i submit arrivals[i] and abort abort[i]; run until nothing is left."""
    outcomes: dict[str, Outcome] = {}
    step = 0
    while step <= max([*arrivals, *abort]) or engine.has_work():
        for request in arrivals.get(step, []):
            outcomes[request.request_id] = Outcome()
            engine.add_sequence(engine.make_sequence(request))
        if step in abort:
            engine.abort(abort[step])
        for request_id, delta, _ in engine.step():
            if delta is None:
                continue
            out = outcomes[request_id]
            assert out.last is None, f"{request_id} got a delta after its last one"
            out.text += delta.text
            out.token_ids += delta.token_ids
            if delta.finished:
                out.last = delta
        step += 1
        assert step < 2000
    return outcomes


def request(rid: str, prompt: list[int], **params: Any) -> GenerationRequest:
    params = SamplingParams(**{"temperature": 0.0, **params})
    return GenerationRequest(rid, prompt_token_ids=tuple(prompt), params=params)


def prompts(lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 30000, (n,), generator=g).tolist() for n in lengths]


def test_overlapped_steps_give_the_same_tokens_as_one_step_at_a_time(folder: Path) -> None:
    """Greedy streams of different lengths arriving over time, ending by length, a stop string and a
    stop token at different steps, one aborted, alongside requests that cannot be launched ahead
    (penalties, logprobs, seeded sampling, min_tokens): every stream's text, tokens, finish reason and
    usage are those of the non-overlapped engine."""
    p = prompts((9, 30, 17, 5, 70, 12, 40, 3), seed=3)
    probe = drive(make_engine(folder, overlap=False), {0: [request("probe", p[0], max_tokens=24)]}, {})["probe"]
    stop_token = probe.token_ids[6]
    stop_text = probe.text[len(probe.text) // 2 :][:3]
    arrivals = {
        0: [
            request("a", p[0], max_tokens=24),
            request("b", p[1], max_tokens=7),
            request("stop-id", p[0], max_tokens=30, stop_token_ids=[stop_token]),
        ],
        2: [request("c", p[2], max_tokens=15), request("stop-text", p[0], max_tokens=30, stop=[stop_text])],
        3: [request("pen", p[3], max_tokens=12, repetition_penalty=1.3)],
        5: [request("d", p[4], max_tokens=20), request("lp", p[5], max_tokens=6, logprobs=True, top_logprobs=2)],
        9: [request("aborted", p[6], max_tokens=40), request("seeded", p[7], max_tokens=9, temperature=0.8, seed=5)],
        11: [request("min", p[1], max_tokens=10, min_tokens=4), request("one", p[2], max_tokens=1)],
    }
    sync = drive(make_engine(folder, overlap=False), arrivals, {13: "aborted"})
    ahead_engine = make_engine(folder, overlap=True)
    ahead = drive(ahead_engine, arrivals, {13: "aborted"})
    assert sync.keys() == ahead.keys()
    assert sync["stop-id"].last is not None and sync["stop-id"].last.finish_reason == "stop"
    assert 0 < len(sync["stop-id"].token_ids) < 30
    assert sync["stop-text"].last is not None and sync["stop-text"].last.finish_reason == "stop"
    for rid, want in sync.items():
        got = ahead[rid]
        assert got.last is not None and want.last is not None, rid
        if rid == "aborted":  # where the abort lands depends on the step timing
            assert got.last.finish_reason == "abort"
            assert got.token_ids == want.token_ids[: len(got.token_ids)]
            continue
        assert (got.text, got.token_ids) == (want.text, want.token_ids), rid
        assert got.last.finish_reason == want.last.finish_reason, rid
        assert got.last.usage == want.last.usage, rid
    # every slot given back, nothing left in flight
    assert not ahead_engine.has_work() and ahead_engine.runner.kv_used_tokens == 0


def test_kv_written_by_a_discarded_row_serves_the_prefix_cache(folder: Path) -> None:
    """A sequence that ends at step N has one more row in step N+1, which writes the KV of its last
    token: that KV, kept as a prefix-cache entry, continues the conversation exactly as KV computed
    from scratch does."""
    p = prompts((20,), seed=8)[0]
    engine = make_engine(folder, overlap=True)
    first = drive(engine, {0: [request("t1", p, max_tokens=10)]}, {})["t1"]
    follow = [*p, *first.token_ids, 777]
    again = drive(engine, {0: [request("t2", follow, max_tokens=8)]}, {})["t2"]
    assert again.last is not None and again.last.usage is not None
    assert again.last.usage.cached_tokens == len(p) + len(first.token_ids)
    fresh = drive(make_engine(folder, overlap=False), {0: [request("t3", follow, max_tokens=8)]}, {})["t3"]
    assert again.token_ids == fresh.token_ids and len(fresh.token_ids) == 8


def test_runner_launches_ahead_only_plain_greedy_rows_with_a_token_on_the_device(folder: Path) -> None:
    model = load_model(folder, torch.float32, torch.device("cpu"))
    runner = TorchRunner(model, None, num_slots=3, max_len=64, device=torch.device("cpu"), dtype=torch.float32)
    greedy = Sequence("g", prompts((6,), seed=1)[0], SamplingParams(temperature=0.0), 4, float("inf"))
    penal = Sequence("p", prompts((6,), seed=2)[0], SamplingParams(repetition_penalty=1.2), 4, float("inf"))
    runner.allocate(greedy)
    runner.allocate(penal)
    assert runner.can_launch_ahead([ScheduledSeq(greedy, 6, True)])
    assert not runner.can_launch_ahead([ScheduledSeq(greedy, 6, True), ScheduledSeq(penal, 6, True)])
    assert runner.can_launch_ahead([ScheduledSeq(greedy, 6, True), ScheduledSeq(penal, 3, False)])
    # a greedy row with a logit bias goes through the sampler, which applies it
    biased = Sequence("b", prompts((5,), seed=3)[0], SamplingParams(temperature=0.0, logit_bias=((7, 100.0),)), 3, 1e9)
    assert not runner.can_launch_ahead([ScheduledSeq(biased, 5, True)])
    launched = runner.launch([ScheduledSeq(greedy, 6, True)])
    assert not launched.done
    # the next step before the token is taken in: fed from the device
    second = runner.launch([ScheduledSeq(greedy, 1, True)])
    (first_result,) = launched.results()
    (second_result,) = second.results()
    assert first_result is not None and second_result is not None
    # a row whose token was never sampled is refused, not fed a stale id
    penal.num_computed_tokens = penal.num_tokens
    (refused,) = runner.launch([ScheduledSeq(penal, 1, True)]).results()
    assert refused is not None and refused.error is not None
    runner.allocate(biased)
    (forced,) = runner.step([ScheduledSeq(biased, 5, True)])
    assert forced is not None and forced.token_id == 7
    # the same two tokens one step at a time
    model2 = load_model(folder, torch.float32, torch.device("cpu"))
    ref = TorchRunner(model2, None, num_slots=2, max_len=64, device=torch.device("cpu"), dtype=torch.float32)
    again = Sequence("g2", list(greedy.prompt_token_ids), SamplingParams(temperature=0.0), 4, float("inf"))
    ref.allocate(again)
    (r1,) = ref.step([ScheduledSeq(again, 6, True)])
    assert r1 is not None
    again.output_token_ids.append(r1.token_id)
    (r2,) = ref.step([ScheduledSeq(again, 1, True)])
    assert r2 is not None
    assert (first_result.token_id, second_result.token_id) == (r1.token_id, r2.token_id)
