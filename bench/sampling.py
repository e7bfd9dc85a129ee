"""Per-token sampling cost on the engine thread: llama.cpp's native sampler chain against the numpy
samplers the llama.cpp runner uses (`TemperatureSampler`, `TruncatedSampler`), over one logits row of
a 151,936-entry vocabulary (Qwen2.5 / DeepSeek-R1-Distill-Qwen).

    .venv/bin/python bench/sampling.py [--vocab 151936] [--draws 300] [--repeats 5]

Logits are model-like (a peaked head of 40 tokens over a long flat tail, seed 0); the history for
penalties is 64 generated tokens. The native chain is timed as `llama_sampler_sample` runs it: the
candidates array filled from the logits row (one memory copy here), then the whole chain
(`make_sampler_chain`) applied.
Each row is the median of --repeats rounds of --draws draws. Prints a Markdown table with ratios.
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import statistics
import time

import llama_cpp as lc
import numpy as np

from deepseek_serve.engine.runners.llamacpp.sampling import (
    TemperatureSampler,
    TruncatedSampler,
    make_sampler_chain,
    uses_temperature_sampler,
)
from deepseek_serve.engine.types import SamplingParams

CASES = {
    "temperature 0.7": SamplingParams(temperature=0.7),
    "fallback defaults (T 0.7, top-p 0.8, repetition 1.05)": SamplingParams(
        temperature=0.7, top_p=0.8, repetition_penalty=1.05
    ),
    "Qwen2.5's own (T 0.7, top-k 20, top-p 0.8, repetition 1.05)": SamplingParams(
        temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05
    ),
    "llama-server's defaults (top-k 40, top-p 0.95, min-p 0.05, T 0.8)": SamplingParams(
        temperature=0.8, top_k=40, top_p=0.95, min_p=0.05
    ),
    "T 1.0, top-p 0.95": SamplingParams(temperature=1.0, top_p=0.95),
}

_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


def logits_row(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.normal(-4.0, 2.0, n).astype(np.float32)
    head = rng.choice(n, 40, replace=False)
    x[head] = rng.normal(8.0, 2.5, 40).astype(np.float32)
    return x


def time_native(p: SamplingParams, logits: np.ndarray, history: list[int], draws: int) -> float:
    n = len(logits)
    chain = make_sampler_chain(p, n)
    for token in history:
        lc.llama_sampler_accept(chain, token)
    cand = (lc.llama_token_data * n)()
    filled = np.zeros(n, dtype=_TOKEN_DATA)  # what llama_sampler_sample writes before the chain runs
    filled["id"] = np.arange(n, dtype=np.int32)
    filled["logit"] = logits
    size = filled.nbytes
    start = time.perf_counter()
    for _ in range(draws):
        ctypes.memmove(cand, filled.ctypes.data, size)
        arr = lc.llama_token_data_array(cand, n, -1, False)
        lc.llama_sampler_apply(chain, ctypes.byref(arr))
    elapsed = time.perf_counter() - start
    lc.llama_sampler_free(chain)
    return elapsed / draws


def time_numpy(p: SamplingParams, logits: np.ndarray, history: list[int], draws: int) -> float:
    n = len(logits)
    if uses_temperature_sampler(p):
        fast = TemperatureSampler(p.temperature, 0, n)
        start = time.perf_counter()
        for _ in range(draws):
            fast.sample(logits)
        return (time.perf_counter() - start) / draws
    sampler = TruncatedSampler(p, n)
    start = time.perf_counter()
    for _ in range(draws):
        sampler.sample(logits, history)
    return (time.perf_counter() - start) / draws


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--draws", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    logits = logits_row(args.vocab)
    history = [int(t) for t in np.random.default_rng(1).integers(0, args.vocab, 64)]
    print(f"# sampling cost per token, vocabulary {args.vocab}, {platform.processor() or platform.machine()}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, median of {args.repeats} x {args.draws} draws\n")
    print("| parameters | native chain | numpy | native / numpy |")
    print("|---|---:|---:|---:|")
    for name, p in CASES.items():
        native, mine = [], []
        for _ in range(args.repeats):  # interleaved, so a slow moment hits both
            native.append(time_native(p, logits, history, args.draws))
            mine.append(time_numpy(p, logits, history, args.draws))
        a, b = statistics.median(native), statistics.median(mine)
        print(f"| {name} | {a * 1e3:.3f} ms | {b * 1e3:.3f} ms | {a / b:.1f}x |")


if __name__ == "__main__":
    main()
