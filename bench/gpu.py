"""GPU benchmark + on-device correctness of the torch runner (one call does everything).

Run on a CUDA machine from the repository root:
    PYTHONPATH=src python3 bench/gpu.py [--out DIR] [--quick]

1. checks: tiny random Llama/Qwen2 models (fp32, CUDA graphs on) give the same greedy tokens as
   transformers `generate()` for mixed-length batched requests (each step's prompt chunks of
   different lengths packed into one prefill graph replay); int8/int4 linears match their
   dequantized weights (tests/engine/pytorch/packed_prefill_check.py checks the packed prefill
   further);
2. measures the device-to-device copy bandwidth (bytes read + written);
3. for random bf16 models of the exact DeepSeek-R1-Distill-Qwen-1.5B and deepseek-coder-1.3b shapes:
   tokens/s at 1, 8, 32, 64 concurrent sequences (128-token prompts, 256 new tokens) for this runner
   and for `generate()` on the same weights; the one-stream decode rate as % of the bandwidth roofline;
4. int8 / int4 for the 1.5B shape: weight bytes and tokens/s.
Prints a table; writes results.json and a log under --out (default: $OUT or ./bench-out).
Imports only the engine's value types and the torch runner package (no pydantic-settings needed).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from deepseek_serve.engine.runners.pytorch.config import ModelArgs
from deepseek_serve.engine.runners.pytorch.loading import from_state_dict
from deepseek_serve.engine.runners.pytorch.quantize import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    quantize_int4,
    quantize_model,
    weight_bytes,
)
from deepseek_serve.engine.runners.pytorch.runner import TorchRunner
from deepseek_serve.engine.sequence import Sequence
from deepseek_serve.engine.types import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.runner_driver import run_to_completion

SHAPES: dict[str, dict[str, Any]] = {
    "r1-distill-qwen-1.5b": dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        max_position_embeddings=131072,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        use_sliding_window=False,
    ),
    "deepseek-coder-1.3b": dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        intermediate_size=5504,
        vocab_size=32256,
        tie_word_embeddings=False,
        rope_theta=100000.0,
        rope_scaling={"type": "linear", "factor": 4.0},
        max_position_embeddings=16384,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        attention_bias=False,
    ),
}
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, vocab_size=1024, max_position_embeddings=1024)
CONCURRENCY: tuple[int, ...] = (1, 8, 32, 64)
PROMPT_LEN, NEW_TOKENS = 128, 256
OVERLAP = True  # bench_runner: steps overlapped as in the engine (--sync-steps: one at a time)

LOG: list[str] = []
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def linears(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """The distinct linears of a shape's decoder step, name -> (K, N): the fused q/k/v and gate/up
    projections, o, down and the LM head."""
    d, i = cfg["hidden_size"], cfg["intermediate_size"]
    head = d // cfg["num_attention_heads"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * head
    return {"qkv": (d, qkv), "o": (d, d), "gate_up": (d, 2 * i), "down": (i, d), "lm_head": (d, cfg["vocab_size"])}


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


LOG_FILE: Path | None = None


def log(msg: str) -> None:
    print(msg, flush=True)
    LOG.append(msg)
    if LOG_FILE is not None:
        with LOG_FILE.open("a") as f:
            f.write(msg + "\n")


def hf_model(cfg: dict[str, Any], dtype: torch.dtype, seed: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(seed)
    with DEVICE:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # transformers' init leaves some weights tiny; re-draw them so logits are not flat.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.02)
    return model.eval()


def our_runner(
    hf: torch.nn.Module,
    cfg: dict[str, Any],
    dtype: torch.dtype,
    slots: int,
    max_len: int,
    quant: str = "none",
    graphs: bool = True,
    quant_options: dict[str, Any] | None = None,
) -> TorchRunner:
    """`quant_options`: more arguments of `quantize_model` (group size, CUDA kernels)."""
    args = ModelArgs.from_config(cfg)
    model = from_state_dict(args, dict(hf.state_dict()), dtype, DEVICE, "hf model")
    if quant != "none":
        # quantizing swaps modules in place; work on private copies of the shared tensors
        model = from_state_dict(args, {k: v.clone() for k, v in hf.state_dict().items()}, dtype, DEVICE)
        quantize_model(model, quant, **(quant_options or {}))  # type: ignore[arg-type]
    return TorchRunner(model, None, num_slots=slots, max_len=max_len, device=DEVICE, dtype=dtype, cuda_graphs=graphs)


def make_seqs(prompts: list[list[int]], new_tokens: int) -> list[Sequence]:
    return [
        Sequence(f"r{i}", list(p), SamplingParams(temperature=0.0), new_tokens, float("inf"))
        for i, p in enumerate(prompts)
    ]


def hf_generate(hf: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    ids = torch.tensor(prompts, device=DEVICE)
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,  # type: ignore[operator]
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    return [row[ids.shape[1] :].tolist() for row in out]


# --- 1. correctness --------------------------------------------------------------------------------
def check_correctness(results: dict[str, Any]) -> None:
    for name, shape in SHAPES.items():
        cfg = {**shape, **TINY}
        if cfg["num_key_value_heads"] == cfg["num_attention_heads"]:
            cfg.update(num_attention_heads=4, num_key_value_heads=4)
        else:
            cfg.update(num_attention_heads=4, num_key_value_heads=2)
        hf = hf_model(cfg, torch.float32, seed=1)
        gen = torch.Generator().manual_seed(2)
        lens = (5, 37, 130, 1, 64, 300)
        prompts = [torch.randint(0, cfg["vocab_size"], (n,), generator=gen).tolist() for n in lens]
        runner = our_runner(hf, cfg, torch.float32, slots=8, max_len=512)
        seqs = make_seqs(prompts, 24)
        run_to_completion(runner, seqs, prefill_chunk=48)
        refs = [hf_generate(hf, [p], 24)[0] for p in prompts]
        ok = sum(ref == s.output_token_ids for ref, s in zip(refs, seqs, strict=True))
        # one sequence alone in slot 0 of a fresh runner: the 1-row decode graph (in `runner` the
        # prefix cache would hand it its old slot 2, decoded through the 4-row graph)
        solo = make_seqs(prompts[2:3], 24)
        run_to_completion(our_runner(hf, cfg, torch.float32, slots=8, max_len=512), solo, prefill_chunk=48)
        ok_solo = refs[2] == solo[0].output_token_ids
        results.setdefault("correctness", {})[f"{name}-tiny-fp32"] = f"{ok}/{len(prompts)}"
        results["correctness"][f"{name}-tiny-fp32-solo"] = ok_solo
        log(
            f"correctness {name} tiny fp32 (graphs, packed prefill, lengths {lens}): {ok}/{len(prompts)} equal; "
            f"alone: {'equal' if ok_solo else 'DIFFERENT'}"
        )
        del hf, runner
    # quantized linears vs their dequantized weights
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    lin = torch.nn.Linear(1536, 8960, bias=False, device=DEVICE, dtype=torch.bfloat16)
    lin.weight.data.normal_(0, 0.02, generator=gen)
    x = torch.randn(4, 1536, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    q8 = Int8Linear(lin)
    ref8 = x.float() @ (q8.weight.float() * q8.scales.float()[:, None]).t()
    err8 = ((q8(x).float() - ref8).norm() / ref8.norm()).item()
    try:
        q4 = Int4Linear(lin)
        codes, sz = quantize_int4(lin.weight.data, q4.group_size)
        ref4 = x.float() @ dequantize_int4(codes, sz, q4.group_size).t()
        err4 = ((q4(x).float() - ref4).norm() / ref4.norm()).item()
    except Exception as exc:
        err4 = float("nan")
        log(f"int4 on CUDA failed: {exc!r}")
    results.setdefault("correctness", {}).update(int8_rel_err=err8, int4_rel_err=err4)
    log(f"int8 linear rel err vs dequantized {err8:.2e}; int4 {err4:.2e}")


# --- 2. bandwidth ----------------------------------------------------------------------------------
def copy_bandwidth() -> float:
    if DEVICE.type != "cuda":
        return 20e9  # smoke runs on CPU only; not a measurement
    n = 1 << 30  # 2 GiB of bf16
    a = torch.randn(n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    bw = 2 * a.numel() * a.element_size() / times[len(times) // 2]
    del a, b
    return bw


# --- 3. throughput ---------------------------------------------------------------------------------
def timed(fn: Any) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def bench_runner(runner: TorchRunner, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    """Total tokens/s (prefill included) and decode-only tokens/s; steps overlapped as the engine
    runs them (step N+1 launched before step N's tokens are taken in) unless --sync-steps."""
    seqs = make_seqs(prompts, new_tokens)
    marks: dict[str, float] = {}

    def on_step(step: int) -> None:
        if step == 1:  # after the first step every prompt is prefilled (chunk >= prompt)
            sync()
            marks["prefilled"] = time.perf_counter()

    t0 = time.perf_counter()
    run_to_completion(runner, seqs, prefill_chunk=PROMPT_LEN, on_step=on_step, overlap=OVERLAP)
    sync()
    t1 = time.perf_counter()
    n = len(prompts) * new_tokens
    return {
        "tok_s": n / (t1 - t0),
        "decode_tok_s": len(prompts) * (new_tokens - 1) / (t1 - marks["prefilled"]),
        "seconds": t1 - t0,
    }


def bench_shape(
    name: str, cfg: dict[str, Any], bw: float, results: dict[str, Any], quick: bool, quant: bool = True
) -> None:
    hf = hf_model(cfg, torch.bfloat16, seed=0)
    max_len = PROMPT_LEN + NEW_TOKENS
    runner = our_runner(hf, cfg, torch.bfloat16, slots=max(CONCURRENCY), max_len=max_len)
    t_capture = timed(runner.warmup)
    wbytes = weight_bytes(runner.model)
    roof = bw / wbytes
    log(
        f"\n{name}: weights {wbytes / 1e9:.2f} GB (embedding excluded), "
        f"roofline {roof:.0f} tok/s one stream; "
        f"{len(runner.graphs or ())} graphs captured in {t_capture:.1f} s; KV {runner.cache.nbytes / 1e9:.2f} GB"
    )
    if DEVICE.type == "cuda":
        # GPU time of one captured decode step (1 row), without the host's share of a step
        assert runner.graphs is not None
        g = runner.graphs.get(1, runner.kv_bucket(PROMPT_LEN + NEW_TOKENS // 2))
        for _ in range(5):
            g.graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(100):
            g.graph.replay()
        end.record()
        end.synchronize()
        replay_ms = start.elapsed_time(end) / 100
        results.setdefault("graph_replay_ms_1", {})[name] = replay_ms
        log(
            f"one decode graph replay (1 row): {replay_ms:.3f} ms = {1e3 / replay_ms:.0f} tok/s "
            f"({100 * 1e3 / replay_ms / roof:.0f}% of roofline)"
        )
    gen = torch.Generator().manual_seed(0)
    rows = []
    # bf16 agreement with generate(): one prompt, greedy
    p0 = torch.randint(0, cfg["vocab_size"], (PROMPT_LEN,), generator=gen).tolist()
    k = min(64, NEW_TOKENS)
    ref = hf_generate(hf, [p0], k)[0]
    s0 = make_seqs([p0], k)
    run_to_completion(runner, s0, prefill_chunk=PROMPT_LEN)
    agree = next((i for i, (a, b) in enumerate(zip(ref, s0[0].output_token_ids, strict=True)) if a != b), k)
    log(f"bf16 greedy agreement with generate(): first {agree}/{k} tokens equal")
    for conc in CONCURRENCY:
        prompts = [torch.randint(0, cfg["vocab_size"], (PROMPT_LEN,), generator=gen).tolist() for _ in range(conc)]
        bench_runner(runner, prompts, 2)  # warm (compiles the prefill shapes)
        ours = bench_runner(runner, prompts, NEW_TOKENS)
        hf_new = 32 if quick else NEW_TOKENS
        hf_generate(hf, prompts[:1], 4)  # warm
        t_hf = timed(functools.partial(hf_generate, hf, prompts, hf_new))
        hf_tok_s = conc * hf_new / t_hf
        row = {
            "model": name,
            "concurrency": conc,
            "ours_tok_s": ours["tok_s"],
            "ours_decode_tok_s": ours["decode_tok_s"],
            "generate_tok_s": hf_tok_s,
            "speedup": ours["tok_s"] / hf_tok_s,
        }
        if conc == 1:
            row["roofline_pct"] = 100 * ours["decode_tok_s"] / roof
        rows.append(row)
        log(json.dumps(row))
    results.setdefault("throughput", []).extend(rows)
    results.setdefault("models", {})[name] = {
        "weight_bytes": wbytes,
        "roofline_tok_s": roof,
        "bf16_agree_first": agree,
    }
    del runner
    if quant and name.startswith("r1"):
        for quant_mode in ("int8", "int4"):
            try:
                qr = our_runner(hf, cfg, torch.bfloat16, slots=max(CONCURRENCY), max_len=max_len, quant=quant_mode)
                qr.warmup()
                qb = weight_bytes(qr.model)
                qrows = {}
                for conc in (1, CONCURRENCY[-1]):
                    prompts = [
                        torch.randint(0, cfg["vocab_size"], (PROMPT_LEN,), generator=gen).tolist() for _ in range(conc)
                    ]
                    bench_runner(qr, prompts, 2)
                    qrows[conc] = bench_runner(qr, prompts, NEW_TOKENS)
                q = {
                    "model": name,
                    "quant": quant_mode,
                    "weight_bytes": qb,
                    "saved_pct": 100 * (1 - qb / wbytes),
                    "tok_s_1": qrows[1]["tok_s"],
                    "decode_tok_s_1": qrows[1]["decode_tok_s"],
                    "tok_s_64": qrows[CONCURRENCY[-1]]["tok_s"],
                    "roofline_pct_1": 100 * qrows[1]["decode_tok_s"] / (bw / qb),
                }
                log(json.dumps(q))
                results.setdefault("quant", []).append(q)
                del qr
            except Exception as exc:
                log(f"{quant_mode} failed: {exc!r}")
    del hf
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


# --- 5. decode-step variants (profiling aid) -----------------------------------------------------
VARIANTS: dict[str, dict[str, Any] | None] = {
    "eager-ops": None,  # the layers run eagerly (small compiled elementwise ops) inside the graph
    "compiled": dict(gemv_reductions=True, attention="sdpa", eager_argmax=False),
    "default": {},  # DecodeStep's defaults
    "compiled-cublas": dict(gemv_reductions=False, attention="sdpa", eager_argmax=False),
    "compiled-red-attn": dict(gemv_reductions=True, attention="reductions", eager_argmax=False),
    "compiled-triton-attn": dict(gemv_reductions=True, attention="triton", eager_argmax=False),
    "compiled-triton-attn-eager-argmax": dict(gemv_reductions=True, attention="triton", eager_argmax=True),
    "cublas-triton-attn": dict(gemv_reductions=False, attention="triton", eager_argmax=False),
    "cublas-triton-attn-eager-argmax": dict(gemv_reductions=False, attention="triton", eager_argmax=True),
}


def replay_ms(g: Any, reps: int = 50, rounds: int = 5) -> float:
    for _ in range(5):
        g.graph.replay()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            g.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return sorted(times)[len(times) // 2]


def profile_step(runner: TorchRunner, n: int, kv_len: int) -> tuple[str, float, int]:
    """Kernel table of eager calls of one decode step; (table, device µs per step, kernels per step)."""
    from torch.profiler import ProfilerActivity, profile

    inputs = torch.zeros((3, n), dtype=torch.int64, device=DEVICE)
    inputs[0].random_(0, runner.args.vocab_size)
    inputs[1].fill_(kv_len // 2)
    inputs[2].fill_(kv_len // 2)
    steps = 3
    with torch.inference_mode():
        runner.decode_forward(inputs, kv_len)
        sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                runner.decode_forward(inputs, kv_len)
            sync()
    avgs = prof.key_averages()

    def dev(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

    kernels = [e for e in avgs if dev(e) > 0]
    total = sum(dev(e) for e in kernels) / steps
    count = sum(e.count for e in kernels) // steps
    rows = sorted(kernels, key=dev, reverse=True)[:40]
    lines = [f"{dev(e) / steps:9.1f} us/step {e.count // steps:5d}x  {e.key[:150]}" for e in rows]
    return "\n".join(lines), total, count


def decode_variants(name: str, cfg: dict[str, Any], names: list[str], results: dict[str, Any], out: Path) -> None:
    """Per decode-step variant: compile + capture time, 1-row and 64-row graph replay, greedy tokens
    against the first variant, and an eager kernel profile of the 1-row step (appended to profiles.txt)."""
    import torch._inductor.config

    from deepseek_serve.engine.runners.pytorch.compile import DecodeStep

    hf = hf_model(cfg, torch.bfloat16, seed=0)
    max_len = PROMPT_LEN + NEW_TOKENS
    kv = 256
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, cfg["vocab_size"], (PROMPT_LEN,), generator=gen).tolist()
    first: list[int] | None = None
    for vname in names:
        # NAME+pdl: the variant with Inductor's programmatic dependent launch, where torch has it
        opts = VARIANTS[vname.removesuffix("+pdl")]
        row: dict[str, Any] = {"model": name, "variant": vname}
        try:
            if hasattr(torch._inductor.config.triton, "enable_pdl"):
                torch._inductor.config.triton.enable_pdl = vname.endswith("+pdl")
            elif vname.endswith("+pdl"):
                raise RuntimeError("this torch's Inductor has no triton.enable_pdl")
            torch._dynamo.reset()
            runner = our_runner(hf, cfg, torch.bfloat16, slots=max(CONCURRENCY), max_len=max_len)
            runner.decode_step = None if opts is None else DecodeStep(runner.model, compiler=runner.compiler, **opts)
            # graph inputs are inference tensors: fill them under inference_mode too
            with torch.inference_mode():
                for n in (1, max(CONCURRENCY)):
                    assert runner.graphs is not None
                    row[f"capture_{n}_s"] = timed(functools.partial(runner.graphs.get, n, kv))
                    g = runner.graphs.get(n, kv)
                    g.inputs[0].random_(0, cfg["vocab_size"])
                    g.inputs[1].fill_(kv // 2)
                    g.inputs[2].fill_(kv // 2)
                    row[f"replay_ms_{n}"] = replay_ms(g)
            roof = results["copy_bandwidth_GBps"] * 1e9 / weight_bytes(runner.model)
            row["replay_roofline_pct_1"] = 100 * 1e3 / row["replay_ms_1"] / roof
            runner.warmup()  # every graph captured before the timed runs
            seqs = make_seqs([prompt], 48)
            run_to_completion(runner, seqs, prefill_chunk=PROMPT_LEN)
            toks = seqs[0].output_token_ids
            first = toks if first is None else first
            row["agree_first"] = next(
                (i for i, (a, b) in enumerate(zip(first, toks, strict=True)) if a != b), len(toks)
            )
            # end to end, one stream (a new prompt: slot 0's prefix is the run above)
            p1 = torch.randint(0, cfg["vocab_size"], (PROMPT_LEN,), generator=gen).tolist()
            bench_runner(runner, [p1], 2)
            e2e = bench_runner(runner, [p1[::-1]], NEW_TOKENS)
            row["decode_tok_s_1"] = e2e["decode_tok_s"]
            row["roofline_pct_1"] = 100 * e2e["decode_tok_s"] / roof
            table, dev_us, nk = profile_step(runner, 1, kv)
            row["profile_device_us_1"] = dev_us
            row["profile_kernels_1"] = nk
            with (out / "profiles.txt").open("a") as f:
                f.write(f"\n=== {name} {vname}: {dev_us:.0f} us of kernels, {nk} kernels per 1-row step ===\n")
                f.write(table + "\n")
        except Exception as exc:  # a failing variant must not hide the others
            row["error"] = repr(exc)[:2000]
        log(json.dumps(row))
        results.setdefault("variants", []).append(row)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        runner = None  # free this variant's graphs and KV cache before the next one
        torch.cuda.empty_cache()
    del hf


def main() -> None:
    global CONCURRENCY, PROMPT_LEN, NEW_TOKENS, LOG_FILE, OVERLAP
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--quick", action="store_true", help="generate() baseline with 32 new tokens")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and few tokens (CPU dry run)")
    ap.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    ap.add_argument("--no-quant", action="store_true", help="skip the int8 / int4 runs")
    ap.add_argument("--sync-steps", action="store_true", help="one runner step at a time (no overlap)")
    ap.add_argument(
        "--variants",
        default="",
        help=f"decode-step variants to compare instead of the benchmark (of {', '.join(VARIANTS)})",
    )
    a = ap.parse_args()
    CONCURRENCY = tuple(int(c) for c in a.concurrency.split(","))
    OVERLAP = not a.sync_steps
    if a.smoke:
        CONCURRENCY, PROMPT_LEN, NEW_TOKENS = (1, 4), 16, 8
        for shape in SHAPES.values():
            shape.update(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                vocab_size=512,
                num_attention_heads=4,
                num_key_value_heads=2 if shape["model_type"] == "qwen2" else 4,
            )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    LOG_FILE = out / "log.txt"
    import transformers

    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "argv": sys.argv,
    }
    log(json.dumps(results))
    try:
        if not a.skip_check:
            check_correctness(results)
        if a.check_only:
            return
        bw = copy_bandwidth()
        results["copy_bandwidth_GBps"] = bw / 1e9
        log(f"device-to-device copy: {bw / 1e9:.0f} GB/s (read + write)")
        for name in a.shapes.split(","):
            if a.variants:
                decode_variants(name, SHAPES[name], a.variants.split(","), results, out)
            else:
                bench_shape(name, SHAPES[name], bw, results, a.quick, quant=not a.no_quant)
    finally:
        (out / "results.json").write_text(json.dumps(results, indent=2))
    log("\n| model | conc | ours tok/s | ours decode tok/s | generate() tok/s | x generate | % roofline |")
    log("|---|---|---|---|---|---|---|")
    for r in results.get("throughput", []):
        log(
            f"| {r['model']} | {r['concurrency']} | {r['ours_tok_s']:.0f} | {r['ours_decode_tok_s']:.0f} | "
            f"{r['generate_tok_s']:.1f} | {r['speedup']:.1f} | {r.get('roofline_pct', float('nan')):.0f} |"
        )
    for q in results.get("quant", []):
        log(
            f"| {q['model']} {q['quant']} | weights {q['weight_bytes'] / 1e9:.2f} GB "
            f"(-{q['saved_pct']:.0f}%) | 1: {q['tok_s_1']:.0f} tok/s ({q['roofline_pct_1']:.0f}% of its "
            f"roofline) | {CONCURRENCY[-1]}: {q['tok_s_64']:.0f} |"
        )


if __name__ == "__main__":
    main()
