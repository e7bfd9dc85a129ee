"""The runner choice and the helpers both runners share (no model needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepseek_serve.config import load_settings
from deepseek_serve.engine.runners import SampleResult, ScheduledSeq, choose_runner
from deepseek_serve.engine.runners.common import common_prefix_len, entry_refusal, split_refused
from deepseek_serve.engine.sequence import Sequence
from deepseek_serve.engine.types import SamplingParams
from deepseek_serve.models.resolve import ResolvedModel

GGUF = ResolvedModel(Path("m.gguf"), "gguf", "m", "local")
HF = ResolvedModel(Path("folder"), "hf", "m", "local")


def test_auto_picks_the_runner_by_format(tmp_path: Path) -> None:
    settings = load_settings(_env_file=None, data_dir=tmp_path)
    assert choose_runner(settings, GGUF) == "llamacpp"
    assert choose_runner(settings, HF) == "torch"


def test_a_runner_that_cannot_read_the_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="DS_RUNNER=llamacpp needs a GGUF file"):
        choose_runner(load_settings(_env_file=None, data_dir=tmp_path, runner="llamacpp"), HF)
    with pytest.raises(ValueError, match="DS_RUNNER=torch needs a Hugging Face folder"):
        choose_runner(load_settings(_env_file=None, data_dir=tmp_path, runner="torch"), GGUF)


def test_common_prefix_len() -> None:
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len((1, 2), [1, 2, 3]) == 2
    assert common_prefix_len([], [1]) == 0


def _entry(prompt: list[int], new: int, computed: int = 0, max_tokens: int = 4) -> ScheduledSeq:
    seq = Sequence("r", prompt, SamplingParams(), max_tokens, float("inf"))
    seq.num_computed_tokens = computed
    return ScheduledSeq(seq, new, True)


def test_entry_refusal() -> None:
    assert entry_refusal(_entry([1, 2, 3], 3), max_len=16, vocab_size=10) is None
    assert entry_refusal(_entry([1, 2, 3], 1, computed=2), max_len=16, vocab_size=10) is None
    assert "reservation" in (entry_refusal(_entry([1, 2, 3], 4), max_len=16, vocab_size=10) or "")
    assert "reservation" in (entry_refusal(_entry([1, 2, 3], 0), max_len=16, vocab_size=10) or "")
    assert "reservation" in (entry_refusal(_entry([1, 2, 3], 3), max_len=2, vocab_size=10) or "")
    assert "vocabulary" in (entry_refusal(_entry([1, 12, 3], 3), max_len=16, vocab_size=10) or "")
    assert "vocabulary" in (entry_refusal(_entry([1, 2, -1], 1, computed=2), max_len=16, vocab_size=10) or "")


def test_split_refused_fails_only_the_refused_entries() -> None:
    batch = [_entry([1], 1), _entry([2], 1), _entry([3], 1)]
    results, accepted = split_refused(batch, lambda e: "no" if e.seq.prompt_token_ids == [2] else None)
    assert accepted == [0, 2]
    assert results == [None, SampleResult.failed("no"), None]
