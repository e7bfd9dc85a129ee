"""The numpy `TruncatedSampler` against llama.cpp's own sampler chain and against a plain float64
reading of the same chain (the whole vocabulary sorted): for the same logits, history and parameters
all keep the same tokens with the same probabilities; seeded draws repeat."""

from __future__ import annotations

import ctypes

import llama_cpp as lc
import numpy as np
import pytest

from deepseek_serve.engine.runners.llamacpp.sampling import TruncatedSampler
from deepseek_serve.engine.types import SamplingParams

N_VOCAB = 151_936  # Qwen2.5's vocabulary: the size the thresholds must cope with


def native_candidates(p: SamplingParams, logits: np.ndarray, history: list[int]) -> dict[int, float]:
    """The tokens llama.cpp's chain (make_sampler_chain's order, without the final draw) keeps, with
    their probabilities after temperature."""
    n = len(logits)
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    if p.logit_bias:
        biases = (lc.llama_logit_bias * len(p.logit_bias))()
        for i, (token, bias) in enumerate(p.logit_bias):
            biases[i].token = token
            biases[i].bias = bias
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_logit_bias(n, len(p.logit_bias), biases))
    if p.has_penalties:
        pen = lc.llama_sampler_init_penalties(
            n, p.penalty_last_n, p.repetition_penalty, p.frequency_penalty, p.presence_penalty
        )
        for token in history:
            lc.llama_sampler_accept(pen, token)
        lc.llama_sampler_chain_add(chain, pen)
    if p.top_k > 0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(p.top_k))
    if p.top_p < 1.0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(p.top_p, 1))
    if p.min_p > 0.0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(p.min_p, 1))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(p.temperature))
    cand = (lc.llama_token_data * n)()
    for i in range(n):
        cand[i].id = i
        cand[i].logit = float(logits[i])
        cand[i].p = 0.0
    arr = lc.llama_token_data_array(cand, n, -1, False)
    lc.llama_sampler_apply(chain, ctypes.byref(arr))
    ids = [arr.data[i].id for i in range(arr.size)]
    z = np.array([arr.data[i].logit for i in range(arr.size)], dtype=np.float64)
    lc.llama_sampler_free(chain)
    w = np.exp(z - z.max())
    return dict(zip(ids, (w / w.sum()).tolist(), strict=True))


def reference_candidates(p: SamplingParams, logits: np.ndarray, history: list[int]) -> dict[int, float]:
    """The chain's definition in float64 over the sorted vocabulary (no thresholds)."""
    x = logits.astype(np.float64)
    for token, bias in p.logit_bias:
        x[token] += bias
    window = history if p.penalty_last_n < 0 else history[-p.penalty_last_n :] if p.penalty_last_n else []
    for token in set(window):
        c = window.count(token)
        x[token] = x[token] / p.repetition_penalty if x[token] > 0 else x[token] * p.repetition_penalty
        x[token] -= c * p.frequency_penalty + p.presence_penalty
    order = np.argsort(-x, kind="stable")
    if p.top_k > 0:
        order = order[: p.top_k]
    if p.top_p < 1.0:
        w = np.exp(x[order] - x[order[0]])
        cum = np.cumsum(w / w.sum())
        order = order[: int(np.argmax(cum >= p.top_p)) + 1 if cum[-1] >= p.top_p else len(order)]
    if p.min_p > 0.0:
        order = order[x[order] >= x[order[0]] + np.log(p.min_p)]
    w = np.exp((x[order] - x[order[0]]) / p.temperature)
    return dict(zip(order.tolist(), (w / w.sum()).tolist(), strict=True))


def model_like_logits(seed: int) -> np.ndarray:
    """A peaked head over a long flat tail, as a language model's logits look."""
    rng = np.random.default_rng(seed)
    x = rng.normal(-4.0, 2.0, N_VOCAB).astype(np.float32)
    head = rng.choice(N_VOCAB, 40, replace=False)
    x[head] = rng.normal(8.0, 2.5, 40).astype(np.float32)
    return x


CASES = [
    SamplingParams(temperature=0.7, top_p=0.8, repetition_penalty=1.05),  # the fallback defaults
    SamplingParams(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05),  # Qwen2.5's own
    SamplingParams(temperature=1.0, top_k=40),
    SamplingParams(temperature=0.9, top_p=0.95, min_p=0.05),
    SamplingParams(temperature=1.3, top_p=0.999),  # the long tail: thresholds must widen
    SamplingParams(temperature=0.6, min_p=0.1, presence_penalty=1.5, frequency_penalty=0.5),
    SamplingParams(temperature=0.8, top_p=0.9, logit_bias=((5, 12.0), (17, -100.0)), repetition_penalty=1.3),
    SamplingParams(temperature=1.0, top_k=5, repetition_penalty=2.0, penalty_last_n=3),
    SamplingParams(temperature=0.0, repetition_penalty=1.5),  # greedy over penalized logits
    SamplingParams(temperature=0.7, repetition_penalty=1.1),  # no cut: the whole vocabulary
    SamplingParams(temperature=0.5, min_p=0.2),  # min-p alone
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_truncated_sampler_keeps_what_the_native_chain_keeps(case: int) -> None:
    p = CASES[case]
    logits = model_like_logits(case)
    best = [int(t) for t in np.argsort(-logits)[:6]]
    history = [best[0], best[0], best[1], 99, best[2], 17]  # repeats, and the head of the distribution
    ids, probs = TruncatedSampler(p, N_VOCAB).candidates(logits, history)
    if p.is_greedy:
        native = native_candidates(SamplingParams(temperature=1.0, top_k=1, **_penalties(p)), logits, history)
        assert ids.tolist() == list(native)
        assert ids[0] != best[0]  # the penalty moved the pick: the history was applied
        return
    expected = [reference_candidates(p, logits, history)]
    if p.top_p <= 0.99:
        # llama.cpp sums the softmax in float32: with p near 1 the tail it loses moves the cut
        expected.append(native_candidates(p, logits, history))
    for want in expected:
        assert set(ids.tolist()) == set(want)
        assert len(want) > 1
        for token, prob in zip(ids.tolist(), probs.tolist(), strict=True):
            assert prob == pytest.approx(want[token], rel=1e-4, abs=1e-7)


def _penalties(p: SamplingParams) -> dict[str, float | int]:
    return {
        "repetition_penalty": p.repetition_penalty,
        "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty,
        "penalty_last_n": p.penalty_last_n,
    }


def test_truncated_sampler_draws_follow_its_probabilities_and_seeds_repeat() -> None:
    p = SamplingParams(temperature=0.9, top_k=8, seed=11)
    logits = model_like_logits(3)
    ids, probs = TruncatedSampler(p, N_VOCAB).candidates(logits, [])
    draws = np.array([TruncatedSampler(p, N_VOCAB).sample(logits, []) for _ in range(3)])
    assert len(set(draws.tolist())) == 1  # one seed, one stream: the same first draw
    sampler = TruncatedSampler(SamplingParams(temperature=0.9, top_k=8, seed=12), N_VOCAB)
    many = np.array([sampler.sample(logits, []) for _ in range(20000)])
    assert set(many.tolist()) <= set(ids.tolist())
    observed = np.array([(many == t).sum() for t in ids])
    expected = probs * len(many)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 24.3, chi2  # the 99.9% quantile of chi-square(7)
