"""The llama.cpp engine's fast paths on the real default model: shared prompt prefill, the numpy
temperature sampler, and admitting a burst of requests together."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import numpy as np
import pytest

from deepseek_serve.engine.async_engine import AsyncEngine
from deepseek_serve.engine.llamacpp_runner import LlamaCppRunner, TemperatureSampler, uses_temperature_sampler
from deepseek_serve.engine.runner import SampleResult, ScheduledSeq
from deepseek_serve.engine.sequence import Sequence
from deepseek_serve.engine.types import GenerationRequest, SamplingParams
from deepseek_serve.models.resolve import default_model_path
from tests.support.settings import make_settings

SYSTEM = "<|im_start|>system\nYou are a helpful assistant who answers briefly and precisely.<|im_end|>\n"
QUESTIONS = ["Name a color.", "Tell me a joke.", "What is 2+2?", "Name a color."]


@pytest.fixture(scope="module")
def runner() -> Iterator[LlamaCppRunner]:
    r = LlamaCppRunner(default_model_path(), context_length=1024, max_batch_size=4)
    yield r
    r.close()


def _sequences(runner: LlamaCppRunner, questions: list[str]) -> list[Sequence]:
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=True, top_logprobs=5)
    out = []
    for i, q in enumerate(questions):
        text = f"{SYSTEM}<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
        ids = runner.tokenizer.encode(text, add_special_tokens=False)
        out.append(Sequence(f"s{i}", ids, params, 8, time.monotonic() + 60))
    return out


def _generate(runner: LlamaCppRunner, seqs: list[Sequence], steps: int) -> list[list[SampleResult]]:
    """Prefill all of `seqs` in one step (allocating those without a slot), then decode them together;
    frees them and the prefix cache."""
    for s in seqs:
        if s.slot is None:
            runner.allocate(s)
    results: list[list[SampleResult]] = [[] for _ in seqs]
    batch = [ScheduledSeq(s, s.num_tokens - s.num_computed_tokens, True) for s in seqs]
    for _ in range(steps):
        for i, (s, r) in enumerate(zip(seqs, runner.step(batch), strict=True)):
            assert r is not None
            results[i].append(r)
            s.output_token_ids.append(r.token_id)
        batch = [ScheduledSeq(s, 1, True) for s in seqs]
    for s in seqs:
        runner.free(s)
    runner.clear_prefix_cache()
    return results


def test_prompts_arriving_together_prefill_their_shared_prefix_once(runner: LlamaCppRunner) -> None:
    alone = [_generate(runner, [s], 6)[0] for s in _sequences(runner, QUESTIONS)]
    seqs = _sequences(runner, QUESTIONS)
    lengths = [s.num_prompt_tokens for s in seqs]
    shared = min(sum(1 for _ in _common(seqs[0].prompt_token_ids, s.prompt_token_ids)) for s in seqs[1:3])
    before = runner.tokens_computed
    together = _generate(runner, seqs, 1)
    prefill = runner.tokens_computed - before
    # the system prompt once, then each distinct question; the repeated question costs nothing
    assert shared > 15
    assert prefill == shared + sum(n - shared for n in lengths[:3])
    assert prefill < sum(lengths) / 2

    seqs = _sequences(runner, QUESTIONS)
    together = _generate(runner, seqs, 6)
    for a, t in zip(alone, together, strict=True):
        assert [r.token_id for r in a] == [r.token_id for r in t]
        for ra, rt in zip(a, t, strict=True):
            assert ra.logprob is not None and rt.logprob is not None
            assert abs(ra.logprob.logprob - rt.logprob.logprob) < 0.25
    assert [r.token_id for r in together[0]] == [r.token_id for r in together[3]]  # same prompt, same cells


def _common(a: list[int], b: list[int]) -> Iterator[int]:
    for x, y in zip(a, b, strict=False):
        if x != y:
            return
        yield x


def test_shared_prefill_after_a_cached_prefix(runner: LlamaCppRunner) -> None:
    """Sequences that reuse one cached prefix start at the same position and share what follows."""

    def prime() -> None:  # leaves the system prompt's KV as an idle prefix-cache entry
        (seq,) = _sequences(runner, ["Say hi."])
        runner.allocate(seq)
        runner.step([ScheduledSeq(seq, seq.num_prompt_tokens, True)])
        runner.free(seq)

    questions = ["Name a color in one word please.", "Name a fruit in one word please."]
    alone = []
    for seq in _sequences(runner, questions):
        prime()
        alone.append(_generate(runner, [seq], 4)[0])
    prime()
    seqs = _sequences(runner, questions)
    for s in seqs:
        runner.allocate(s)
    start = seqs[0].num_computed_tokens
    assert start > 15 and seqs[1].num_computed_tokens == start
    shared = sum(1 for _ in _common(seqs[0].prompt_token_ids[start:], seqs[1].prompt_token_ids[start:]))
    assert shared > 0
    before = runner.tokens_computed
    first = runner.step([ScheduledSeq(s, s.num_prompt_tokens - start, True) for s in seqs])
    assert runner.tokens_computed - before == sum(s.num_prompt_tokens - start for s in seqs) - shared
    for s, r in zip(seqs, first, strict=True):
        assert r is not None
        s.output_token_ids.append(r.token_id)
    rest = _generate(runner, seqs, 3)
    for a, f, t in zip(alone, first, rest, strict=True):
        assert f is not None
        assert [r.token_id for r in a] == [f.token_id] + [r.token_id for r in t]


def test_temperature_sampler_draws_from_the_softmax() -> None:
    n = 3000  # not a multiple of the block size: the padded tail must never be drawn
    logits = np.random.default_rng(0).normal(0.0, 2.0, n).astype(np.float32)
    logits[-1] = logits.max() + 1.0  # the most likely token sits in the last, partial block
    temperature = 0.7
    sampler = TemperatureSampler(temperature, seed=5, n_vocab=n)
    draws = np.array([sampler.sample(logits) for _ in range(20000)])
    assert draws.min() >= 0 and draws.max() < n
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    # chi-square over the 30 most likely tokens and one bucket for the rest (df = 30)
    top = np.argsort(-p)[:30]
    observed = np.array([(draws == t).sum() for t in top] + [(~np.isin(draws, top)).sum()])
    expected = np.append(p[top], 1.0 - p[top].sum()) * len(draws)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 59.7, chi2  # the 99.9% quantile of chi-square(30)
    # without the temperature the same statistic is far off: the test can tell
    q = np.exp(logits - logits.max())
    q /= q.sum()
    wrong = np.append(q[top], 1.0 - q[top].sum()) * len(draws)
    assert float(((observed - wrong) ** 2 / wrong).sum()) > 200


def test_temperature_sampler_streams_are_per_seed() -> None:
    logits = np.random.default_rng(1).normal(0.0, 1.0, 500).astype(np.float32)
    solo = TemperatureSampler(1.0, seed=7, n_vocab=500)
    expected = [solo.sample(logits) for _ in range(40)]
    mine, other = TemperatureSampler(1.0, seed=7, n_vocab=500), TemperatureSampler(1.0, seed=8, n_vocab=500)
    interleaved = []
    for _ in range(40):
        other.sample(logits)
        interleaved.append(mine.sample(logits))
    assert interleaved == expected
    assert len(set(expected)) > 5


def test_only_plain_temperature_sampling_takes_the_numpy_path() -> None:
    assert uses_temperature_sampler(SamplingParams(temperature=0.7))
    assert not uses_temperature_sampler(SamplingParams(temperature=0.0))
    assert not uses_temperature_sampler(SamplingParams(temperature=0.7, top_p=0.9))
    assert not uses_temperature_sampler(SamplingParams(temperature=0.7, top_k=40))
    assert not uses_temperature_sampler(SamplingParams(temperature=0.7, min_p=0.05))
    assert not uses_temperature_sampler(SamplingParams(temperature=0.7, repetition_penalty=1.1))


async def test_a_burst_of_requests_is_admitted_into_one_step() -> None:
    # without the wait the first request starts a step alone (the engine thread wakes at once)
    eng = AsyncEngine.from_settings(make_settings(burst_wait_ms=100.0, max_batch_size=4))
    await eng.start()
    try:
        steps = eng.stats().steps_total
        streams = []
        for i, q in enumerate(QUESTIONS):
            prompt = eng.render_chat([{"role": "user", "content": q}])
            params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
            req = GenerationRequest(request_id=f"burst-{i}", prompt=prompt, params=params, add_special_tokens=False)
            streams.append(await eng.add_request(req))
            await asyncio.sleep(0.002)  # requests of a burst reach the engine a few milliseconds apart
        for stream in streams:
            async for _ in stream:
                pass
        # one new token each: every request is done after the step that prefills it
        assert eng.stats().steps_total - steps == 1
    finally:
        await eng.shutdown()
