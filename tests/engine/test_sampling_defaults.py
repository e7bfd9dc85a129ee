"""A model's recommended sampling: read from real DeepSeek generation_config.json files (shared
fixtures), GGUF metadata keys, the fallback, and how a request's open fields are filled."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from deepseek_serve.engine.sampling_defaults import FALLBACK, from_generation_config, from_gguf_metadata
from deepseek_serve.engine.types import SamplingDefaults
from deepseek_serve.serving.plan import sampling_params

FIXTURES = Path(
    os.environ.get("DEEPSEEK_FIXTURES", Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "deepseek")
)


def _fixture(name: str, tmp_path: Path) -> Path:
    src = FIXTURES / name / "generation_config.json"
    if not src.is_file():
        pytest.skip(f"DeepSeek fixtures not found at {FIXTURES}")
    shutil.copy(src, tmp_path / "generation_config.json")
    return tmp_path


def test_r1_distill_recommendation_is_taken_as_a_whole(tmp_path: Path) -> None:
    got = from_generation_config(_fixture("deepseek-r1-distill-qwen-1.5b", tmp_path))
    assert (got.temperature, got.top_p, got.top_k, got.min_p, got.repetition_penalty) == (0.6, 0.95, 0, 0.0, 1.0)
    assert got.source == "generation_config.json"


def test_silent_or_broken_configs_fall_back(tmp_path: Path) -> None:
    assert from_generation_config(_fixture("deepseek-coder-6.7b-instruct", tmp_path)) == FALLBACK  # ids only
    (tmp_path / "generation_config.json").write_text("{not json")
    assert from_generation_config(tmp_path) == FALLBACK
    (tmp_path / "generation_config.json").write_text('{"temperature": "hot", "top_p": 7, "top_k": true}')
    assert from_generation_config(tmp_path) == FALLBACK  # nothing usable: not a recommendation
    assert from_generation_config(tmp_path / "missing") == FALLBACK
    assert (FALLBACK.temperature, FALLBACK.top_p, FALLBACK.repetition_penalty) == (0.7, 0.8, 1.05)


def test_gguf_metadata_keys() -> None:
    meta = {"general.sampling.temp": "0.6", "general.sampling.top_k": "40", "general.sampling.penalty_repeat": "1.1"}
    got = from_gguf_metadata(meta.get)
    assert (got.temperature, got.top_p, got.top_k, got.repetition_penalty) == (0.6, 1.0, 40, 1.1)
    assert got.source == "gguf metadata"
    assert from_gguf_metadata(lambda key: None) == FALLBACK


def test_open_fields_take_the_recommendation_greedy_stays_plain() -> None:
    rec = SamplingDefaults(temperature=0.6, top_p=0.95, top_k=20, min_p=0.05, repetition_penalty=1.1)
    body = SimpleNamespace(
        temperature=None,
        top_p=None,
        top_k=None,
        min_p=None,
        repetition_penalty=None,
        presence_penalty=None,
        frequency_penalty=None,
        seed=None,
        stop=None,
        ignore_eos=None,
        min_tokens=None,
    )
    p = sampling_params(body, 8, False, 0, rec)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == (0.6, 0.95, 20, 0.05, 1.1)
    body.top_p, body.repetition_penalty = 0.5, 1.0
    p = sampling_params(body, 8, False, 0, rec)
    assert (p.temperature, p.top_p, p.repetition_penalty) == (0.6, 0.5, 1.0)  # the request's own values win
    body.temperature, body.top_p, body.repetition_penalty = 0.0, None, None
    p = sampling_params(body, 8, False, 0, rec)
    assert p.is_greedy and (p.top_p, p.top_k, p.min_p, p.repetition_penalty) == (1.0, 0, 0.0, 1.0)
