"""Decode speed with a JSON-schema constraint vs unconstrained, on the engine (llama.cpp runner).

    .venv/bin/python bench/structured.py [--model PATH|PACK] [--threads N] [--new-tokens 128] [--repeats 3]

Every stream decodes greedily from fixed prompts. Unconstrained streams ignore EOS; constrained streams
follow a schema (an array of exactly 16 objects) whose JSON is longer than --new-tokens, so both
generate --new-tokens tokens. The rate is decode tokens/s: tokens after the first over the time after
the first token (prefill excluded), summed over streams for the aggregate. Rounds interleave both
modes; each row is the median of --repeats rounds. A last table times llama.cpp's grammar sampler on
the model's whole vocabulary once (what masking every step would cost) against checking one token;
--mask-only prints it with a second one, the same two costs at every position of a document valid
under the schema (bench/structured_schema.py; bench/grammar_engines.py makes the same walk with
llguidance and xgrammar).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import llama_cpp as lc
import numpy as np

from deepseek_serve.cli._common import run_loop
from deepseek_serve.config import load_settings
from deepseek_serve.engine.async_engine import AsyncEngine
from deepseek_serve.engine.runners.llamacpp.backend import physical_cores
from deepseek_serve.engine.types import GenerationRequest, SamplingParams
from deepseek_serve.models.resolve import default_model_path, resolve_model
from deepseek_serve.serving.structured import schema_grammar
from structured_schema import SCHEMA, GreedySpeller, document

PROMPTS = [
    "List the items of a grocery order as JSON.",
    "Make up a warehouse inventory in JSON.",
    "Return a JSON list of products in a shop.",
    "Give me a JSON catalogue of garden tools.",
    "Describe a box of office supplies as JSON.",
    "Write a JSON packing list for a trip.",
    "Produce JSON for a toy store's stock.",
    "Create a JSON list of kitchen items.",
]


async def run(engine: AsyncEngine, streams: int, new_tokens: int, grammar: str | None) -> float:
    """Aggregate decode tokens/s of `streams` simultaneous requests."""

    async def one(i: int) -> tuple[int, float]:
        prompt = engine.render_chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=grammar is None, grammar=grammar)
        _, last = await engine.complete(
            GenerationRequest(
                request_id=f"bench-{streams}-{i}-{time.monotonic_ns()}",
                prompt=prompt,
                add_special_tokens=False,
                params=params,
            )
        )
        assert last.usage is not None and last.timings is not None and last.timings.first_token_s is not None
        if last.usage.completion_tokens < new_tokens:
            print(f"note: a stream stopped after {last.usage.completion_tokens} tokens", flush=True)
        return last.usage.completion_tokens - 1, last.timings.total_s - last.timings.first_token_s

    results = await asyncio.gather(*(one(i) for i in range(streams)))
    return sum(n for n, _ in results) / max(t for _, t in results)


async def rejections(engine: AsyncEngine, streams: int, new_tokens: int, grammar: str) -> tuple[int, int]:
    """(constrained sampling steps, steps whose unconstrained pick the grammar rejected) over `streams`
    schema-constrained requests: how often the runner's fast path falls back to a full mask. Counted by
    wrapping the llama.cpp runner's LogitsSampler (a full mask fills the candidates a second time)."""
    from deepseek_serve.engine.runners.llamacpp.sampling import LogitsSampler

    counts = {"steps": 0, "fills": 0}
    sample, fill = LogitsSampler._sample_constrained, LogitsSampler._fill_candidates

    def counted_sample(self: LogitsSampler, samplers: Any, idx: int) -> int:
        counts["steps"] += 1
        return sample(self, samplers, idx)

    def counted_fill(self: LogitsSampler, idx: int) -> Any:
        counts["fills"] += 1
        return fill(self, idx)

    LogitsSampler._sample_constrained = counted_sample  # type: ignore[method-assign]
    LogitsSampler._fill_candidates = counted_fill  # type: ignore[method-assign]
    try:
        await run(engine, streams, new_tokens, grammar)
    finally:
        LogitsSampler._sample_constrained = sample  # type: ignore[method-assign]
        LogitsSampler._fill_candidates = fill  # type: ignore[method-assign]
    return counts["steps"], counts["fills"] - counts["steps"]


def mask_cost(model_path: Path, grammar: str, repeats: int = 20) -> tuple[float, float, float, int]:
    """At the grammar's start: ms to mask the whole vocabulary, ms to check one token, ms of the runner's
    whole fast path (fill the candidates from a logits row, greedy pick, check it), vocabulary size."""
    lc.llama_backend_init()
    params = lc.llama_model_default_params()
    params.vocab_only = True
    model = lc.llama_model_load_from_file(str(model_path).encode(), params)
    vocab = lc.llama_model_get_vocab(model)
    n = lc.llama_vocab_n_tokens(vocab)
    sampler = lc.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    cand = (lc.llama_token_data * n)()
    view = np.frombuffer(memoryview(cand), dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))
    rng = np.random.default_rng(0)
    full, one, fast = [], [], []
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
    ids = np.arange(n, dtype=np.int32)
    for _ in range(repeats):
        logits = rng.standard_normal(n).astype(np.float32)
        t0 = time.perf_counter()  # the runner's fast path: fill the candidates, chain pick, one-token check
        view["id"] = ids
        view["logit"] = logits
        view["p"] = 0.0
        arr = lc.llama_token_data_array(cand, n, -1, False)
        lc.llama_sampler_apply(chain, ctypes.byref(arr))
        first = lc.llama_token_data_array(cand, 1, -1, False)
        lc.llama_sampler_apply(sampler, ctypes.byref(first))
        fast.append(time.perf_counter() - t0)
    lc.llama_sampler_free(chain)
    for _ in range(repeats):
        view["id"] = np.arange(n, dtype=np.int32)
        view["logit"] = rng.standard_normal(n).astype(np.float32)
        arr = lc.llama_token_data_array(cand, n, -1, False)
        t0 = time.perf_counter()
        lc.llama_sampler_apply(sampler, ctypes.byref(arr))
        full.append(time.perf_counter() - t0)
        single = lc.llama_token_data_array(cand, 1, -1, False)
        t0 = time.perf_counter()
        lc.llama_sampler_apply(sampler, ctypes.byref(single))
        one.append(time.perf_counter() - t0)
    lc.llama_sampler_free(sampler)
    lc.llama_model_free(model)
    return statistics.median(full) * 1000, statistics.median(one) * 1000, statistics.median(fast) * 1000, n


def mask_walk(model_path: Path, grammar: str) -> tuple[list[float], list[float], int]:
    """llama.cpp's grammar sampler along structured_schema.document() spelled in the model's tokens (the
    walk bench/grammar_engines.py makes with llguidance and xgrammar): at each position, seconds to mask
    the whole vocabulary and seconds to check the one next token; then the token is accepted."""
    lc.llama_backend_init()
    params = lc.llama_model_default_params()
    params.vocab_only = True
    model = lc.llama_model_load_from_file(str(model_path).encode(), params)
    vocab = lc.llama_model_get_vocab(model)
    n = lc.llama_vocab_n_tokens(vocab)
    buf = ctypes.create_string_buffer(256)
    pieces = []
    for token in range(n):
        size = lc.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
        is_text = size > 0 and not lc.llama_vocab_is_control(vocab, token)
        pieces.append(bytes(buf[:size]) if is_text else b"")
    ids = GreedySpeller(pieces)(document().encode())
    sampler = lc.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    cand = (lc.llama_token_data * n)()
    view = np.frombuffer(memoryview(cand), dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))
    rng = np.random.default_rng(0)
    full, one = [], []
    for token in ids:
        view["id"] = np.arange(n, dtype=np.int32)
        view["logit"] = rng.standard_normal(n).astype(np.float32)
        arr = lc.llama_token_data_array(cand, n, -1, False)
        t0 = time.perf_counter()
        lc.llama_sampler_apply(sampler, ctypes.byref(arr))
        full.append(time.perf_counter() - t0)
        if not np.isfinite(view["logit"][token]):
            raise RuntimeError(f"the grammar rejects token {token} {pieces[token]!r} of the document")
        view[0] = (token, 0.0, 0.0)
        single = lc.llama_token_data_array(cand, 1, -1, False)
        t0 = time.perf_counter()
        lc.llama_sampler_apply(sampler, ctypes.byref(single))
        one.append(time.perf_counter() - t0)
        lc.llama_sampler_accept(sampler, token)
    lc.llama_sampler_free(sampler)
    lc.llama_model_free(model)
    return full, one, len(ids)


def _print_walk(model_path: Path, grammar: str) -> None:
    full, one, n_tokens = mask_walk(model_path, grammar)

    def row(times: list[float]) -> str:
        ms = sorted(t * 1000 for t in times)
        p90 = ms[int(0.9 * (len(ms) - 1))]
        return f"{statistics.median(ms):.3f} | {statistics.fmean(ms):.3f} | {p90:.3f} | {ms[-1]:.3f}"

    print(f"\n| llama.cpp grammar sampler, document of {n_tokens} tokens | ms per token: median | mean | p90 | max |")
    print("|---|---:|---:|---:|---:|")
    print(f"| mask the whole vocabulary | {row(full)} |")
    print(f"| check the next token only | {row(one)} |")


def _print_mask(model_path: Path, grammar: str) -> None:
    full_ms, one_ms, fast_ms, n_vocab = mask_cost(model_path, grammar)
    print(f"\n| grammar sampler, vocabulary of {n_vocab} | ms per call |\n|---|---:|")
    print(f"| mask every candidate (grammar in the chain) | {full_ms:.2f} |")
    print(f"| check the chain's one pick (what the runner does first) | {one_ms:.4f} |")
    print(f"| the runner's whole fast path: fill candidates, greedy pick, check | {fast_ms:.3f} |")


def bench_model(value: str) -> Path:
    """The GGUF file of --model: SmolLM2 when empty, a path as is, else a model pack (or hub) name."""
    if not value:
        return default_model_path()
    if Path(value).is_file():
        return Path(value)
    return resolve_model(value, cache_dir=load_settings(_env_file=None).models_dir).path


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        default="",
        help="GGUF file or model pack name, e.g. qwen2.5-coder-0.5b-instruct, the server's default model "
        "(pulled into the model cache when missing); default: SmolLM2-135M-Instruct Q4_1",
    )
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--mask-only", action="store_true", help="only the grammar sampler table (no decoding)")
    ap.add_argument(
        "--print-grammar", action="store_true", help="print the schema's GBNF (as the server builds it) and exit"
    )
    ap.add_argument(
        "--grammar-engine",
        choices=["llama", "llguidance"],
        default="llama",
        help="DS_GRAMMAR_ENGINE of the constrained streams (llguidance: the optional grammar extra)",
    )
    ap.add_argument(
        "--rejections",
        action="store_true",
        help="only count, over one round of the largest --streams level of constrained requests, the "
        "steps where the grammar rejects the model's own pick (a full mask), then exit",
    )
    args = ap.parse_args()
    if args.print_grammar:
        print(schema_grammar(SCHEMA), end="")
        return
    threads = args.threads or physical_cores()
    levels = [int(c) for c in args.streams.split(",")]
    model_path = bench_model(args.model)
    settings = load_settings(
        _env_file=None,
        model=str(model_path),
        n_threads=threads,
        max_batch_size=max(levels),
        context_length=8192,
        grammar_engine=args.grammar_engine,
    )
    grammar = schema_grammar(SCHEMA)
    if args.mask_only:
        _print_mask(model_path, grammar)
        _print_walk(model_path, grammar)
        return
    engine = AsyncEngine.from_settings(settings)
    await engine.start()
    if args.rejections:
        steps, rejected = await rejections(engine, max(levels), args.new_tokens, grammar)
        await engine.shutdown()
        print(
            f"model {model_path.name}, {max(levels)} streams x {args.new_tokens} tokens, greedy: {steps} constrained "
            f"steps, {rejected} rejected picks (full mask), {rejected / max(steps, 1):.1%}"
        )
        return
    await run(engine, 1, 8, None)  # warm-up
    await run(engine, 1, 8, grammar)
    rates: dict[tuple[int, bool], list[float]] = {(c, g): [] for c in levels for g in (False, True)}
    for r in range(args.repeats):
        for c in levels:
            for constrained in (False, True):
                await engine.clear_prefix_cache()
                rates[(c, constrained)].append(await run(engine, c, args.new_tokens, grammar if constrained else None))
        print(
            f"round {r + 1}: "
            + ", ".join(f"x{c} {'schema' if g else 'free'} {v[-1]:.1f}" for (c, g), v in rates.items()),
            flush=True,
        )
    await engine.shutdown()

    commit = _commit()
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {threads} threads; commit {commit}; "
        f"model {model_path.name}; grammar engine {args.grammar_engine}; {args.new_tokens} new tokens/stream, "
        f"greedy; median of {args.repeats}\n"
    )
    print("| concurrent streams | unconstrained decode tok/s | json_schema decode tok/s | ratio |")
    print("|---:|---:|---:|---:|")
    for c in levels:
        free = statistics.median(rates[(c, False)])
        schema = statistics.median(rates[(c, True)])
        print(f"| {c} | {free:.1f} | {schema:.1f} | {schema / free:.2f}x |")
    _print_mask(model_path, grammar)


if __name__ == "__main__":
    run_loop(main())
