"""Prompt lookup in the torch runner on a tiny random model (fp32 CPU): greedy outputs token for token
those of the runner without it, alone and batched with sequences that do not speculate (opted out,
with logprobs, prefilling); the measured costs it plans with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from deepseek_serve.engine.runners.pytorch.loading import load_model
from deepseek_serve.engine.runners.pytorch.runner import TorchRunner
from deepseek_serve.engine.runners.pytorch.speculative import TorchSpeculator
from deepseek_serve.engine.sequence import Sequence
from deepseek_serve.engine.speculative import SpeculativeConfig
from deepseek_serve.engine.types import SamplingParams
from tests.support.runner_driver import run_to_completion
from tests.support.torch_models import CODER, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 512


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _ = tiny_checkpoint(tmp_path_factory.mktemp("coder"), CODER, vocab_size=VOCAB)
    return Path(path)


def make_runner(path: Path, speculative: SpeculativeConfig | None = None) -> TorchRunner:
    model = load_model(path, torch.float32, torch.device("cpu"))
    runner = TorchRunner(model, None, num_slots=4, max_len=200, device=torch.device("cpu"), dtype=torch.float32)
    if speculative is not None:
        runner.speculator = TorchSpeculator(runner, speculative)
    return runner


def make_seq(name: str, prompt: list[int], n: int, **params: Any) -> Sequence:
    return Sequence(name, list(prompt), SamplingParams(**{"temperature": 0.0, **params}), n, float("inf"))


def copy_prompts() -> list[list[int]]:
    """Prompts that repeat a random phrase: prompt lookup finds matches in them and in the loops a
    random model's greedy output falls into."""
    g = torch.Generator().manual_seed(3)
    phrases = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (7, 11, 5, 9)]
    return [p * r for p, r in zip(phrases, (4, 3, 6, 2), strict=True)]


def outputs(runner: TorchRunner, cases: list[tuple[list[int], int, dict[str, Any]]]) -> list[list[int]]:
    seqs = [make_seq(f"s{i}", p, n, **kw) for i, (p, n, kw) in enumerate(cases)]
    run_to_completion(runner, seqs, prefill_chunk=16)
    return [s.output_token_ids for s in seqs]


def test_greedy_with_prompt_lookup_is_the_plain_output_alone_and_batched(tiny: Path) -> None:
    fixed = SpeculativeConfig(mode="ngram", max_draft_tokens=4, ngram_min=1, ngram_max=3, adaptive=False)
    plain, spec = make_runner(tiny), make_runner(tiny, fixed)
    prompts = copy_prompts()
    alone = [(prompts[0], 40, {})]
    assert outputs(spec, alone) == outputs(plain, alone)
    assert spec.speculator is not None
    ((_, drafted, accepted),) = spec.speculator.counters.snapshot()
    assert accepted > 0, "no guess was ever right"
    batched = [
        (prompts[1], 36, {}),
        (prompts[2], 30, {"speculative": False}),  # opted out: decodes in the graph step beside the others
        (prompts[3], 33, {"logprobs": True}),  # not plain greedy: decodes plainly
        (prompts[0], 41, {}),
    ]
    assert outputs(spec, batched) == outputs(plain, batched)
    ((_, drafted2, accepted2),) = spec.speculator.counters.snapshot()
    assert accepted2 > accepted and drafted2 - accepted2 > drafted - accepted  # accepted and rejected


def test_the_adaptive_plan_is_priced_by_measured_costs_and_keeps_the_output(tiny: Path) -> None:
    adaptive = SpeculativeConfig(mode="ngram", max_draft_tokens=4, ngram_min=1, ngram_max=3)
    plain, spec = make_runner(tiny), make_runner(tiny, adaptive)
    assert spec.speculator is not None
    spec.speculator.calibrate()
    decode, verify = spec.speculator.decode_cost, spec.speculator.verify_cost
    assert decode.measured and verify.measured
    # wall times of a tiny model: positive and finite (their order between sizes is noise here)
    assert all(0 < c < 10 for c in (verify.estimate(9), verify.estimate(2), decode.estimate(1)))
    cases = [(p, 30, {}) for p in copy_prompts()]
    assert outputs(spec, cases) == outputs(plain, cases)
