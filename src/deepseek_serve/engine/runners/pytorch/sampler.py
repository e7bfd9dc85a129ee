"""Batched sampling on the device. One row per sequence that samples this step.

Order (llama.cpp's): logit bias -> penalties -> grammar mask -> temperature -> top-k -> top-p -> min-p
-> draw. Greedy rows take the argmax of the penalized (and masked) logits. A row with a seed draws its
noise from a generator seeded by (seed, position), so its tokens do not depend on the batch it runs in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deepseek_serve.engine.types import SamplingParams


@dataclass(frozen=True)
class SampleRow:
    params: SamplingParams
    history: list[int]  # the last `params.penalty_last_n` tokens (penalties only; else empty)
    position: int  # index of the token being sampled (seed counter)
    banned: tuple[int, ...] = ()  # ids masked out (EOS before min_tokens)
    allowed: Tensor | None = None  # [V] bool on the logits' device: the grammar's allowed tokens


@dataclass
class SampleOutput:
    tokens: Tensor  # [m] int64
    logprobs: Tensor | None  # [m] float32 logprob of each chosen token (raw model distribution)
    top_ids: Tensor | None  # [m, k] int64
    top_logprobs: Tensor | None  # [m, k] float32


def _row_seed(seed: int, position: int) -> int:
    # splitmix64 of (seed, position): decorrelates neighbouring positions and seeds
    x = (seed * 0x9E3779B97F4A7C15 + position) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def _apply_penalties(logits: Tensor, rows: list[SampleRow], idx: list[int]) -> None:
    device = logits.device
    width = max(1, max(len(rows[i].history) for i in idx))
    hist = torch.full((len(idx), width), -1, dtype=torch.int64)
    for j, i in enumerate(idx):
        h = rows[i].history
        if h:
            hist[j, : len(h)] = torch.tensor(h, dtype=torch.int64)
    hist = hist.to(device, non_blocking=True)
    valid = hist >= 0
    counts = torch.zeros((len(idx), logits.shape[1]), dtype=torch.float32, device=device)
    counts.scatter_add_(1, hist.clamp(min=0), valid.float())  # [mp, V]
    pr = torch.tensor(
        [
            [
                rows[i].params.repetition_penalty,
                rows[i].params.presence_penalty,
                rows[i].params.frequency_penalty,
            ]
            for i in idx
        ],
        dtype=torch.float32,
    ).to(device)
    sub = logits[idx]
    seen = counts > 0
    rep = pr[:, 0:1]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - pr[:, 1:2] * seen.float() - pr[:, 2:3] * counts
    logits[idx] = sub


def sample(logits: Tensor, rows: list[SampleRow], generator: torch.Generator | None = None) -> SampleOutput:
    """logits [m, V] (any float dtype) -> chosen tokens, on the logits' device. No host sync."""
    logits = logits.float()
    vocab = logits.shape[1]
    device = logits.device
    want_lp = any(r.params.logprobs for r in rows)
    raw_lp = torch.log_softmax(logits, dim=-1) if want_lp else None
    biased = [i for i, r in enumerate(rows) if r.params.logit_bias]
    pen = [i for i, r in enumerate(rows) if r.params.has_penalties and r.history]
    if biased or pen:
        logits = logits.clone()
    for i in biased:
        bias = rows[i].params.logit_bias
        if not all(0 <= t < vocab for t, _ in bias):  # checked on the host: on CUDA a bad index is fatal
            raise ValueError(f"logit_bias holds a token id outside the vocabulary [0, {vocab})")
        ids = torch.tensor([t for t, _ in bias], dtype=torch.int64, device=device)
        logits[i].index_add_(0, ids, torch.tensor([b for _, b in bias], dtype=torch.float32, device=device))
    if pen:
        _apply_penalties(logits, rows, pen)
    for i, r in enumerate(rows):
        if r.banned:
            logits[i, list(r.banned)] = float("-inf")
        if r.allowed is not None:
            logits[i].masked_fill_(~r.allowed[:vocab], float("-inf"))
    greedy = torch.argmax(logits, dim=-1)
    random_rows = [i for i, r in enumerate(rows) if not r.params.is_greedy]
    if not random_rows:
        tokens = greedy
    else:
        sub = logits[random_rows]
        ps = [rows[i].params for i in random_rows]
        temps = torch.tensor([p.temperature for p in ps], dtype=torch.float32).to(device)
        sub = sub / temps[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in ps):
            sorted_logits, order = sub.sort(dim=-1, descending=True)  # [r, V]
            probs = sorted_logits.softmax(dim=-1)
            ks = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in ps], dtype=torch.int64).to(device)
            tp = torch.tensor([p.top_p for p in ps], dtype=torch.float32).to(device)
            mp = torch.tensor([p.min_p for p in ps], dtype=torch.float32).to(device)
            rank = torch.arange(vocab, device=device)[None, :]
            drop = rank >= ks[:, None]
            drop |= (probs.cumsum(dim=-1) - probs) > tp[:, None]
            drop |= probs < mp[:, None] * probs[:, :1]
            drop[:, 0] = False  # the most likely token always survives
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            sub = torch.full_like(sub, float("-inf")).scatter(1, order, sorted_logits)
        probs = sub.softmax(dim=-1)
        noise = torch.empty_like(probs)
        for j, i in enumerate(random_rows):
            seed = rows[i].params.seed
            if seed is not None:
                g = torch.Generator(device=device).manual_seed(_row_seed(seed, rows[i].position))
                noise[j].exponential_(generator=g)
            else:
                noise[j].exponential_(generator=generator)
        drawn = torch.argmax(probs / noise, dim=-1)  # exponential race == multinomial draw
        tokens = greedy.clone()
        tokens[random_rows] = drawn
    if raw_lp is None:
        return SampleOutput(tokens, None, None, None)
    chosen = raw_lp.gather(1, tokens[:, None])[:, 0]
    k = max(r.params.top_logprobs for r in rows)
    top_lp, top_ids = raw_lp.topk(k, dim=-1) if k else (None, None)
    return SampleOutput(tokens, chosen, top_ids, top_lp)
