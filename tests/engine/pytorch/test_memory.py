"""The torch runner's memory plan: slots and KV follow DS_GPU_MEMORY_UTILIZATION x free memory and the
requested context; a context that does not fit even once is refused with the settings and bytes named.

The planning tests use the exact deepseek-coder-1.3b shape with an H200's free memory as numbers (no GPU
here); `from_settings` runs the real SmolLM2 on CPU, where the budget is the host's available RAM.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepseek_serve.config import load_settings
from deepseek_serve.engine.torch_runner import runner as runner_module
from deepseek_serve.engine.torch_runner.loading import load_model
from deepseek_serve.engine.torch_runner.memory import (
    FIXED_RESERVE,
    GiB,
    MemoryPlanError,
    free_memory,
    kv_bytes_per_token,
    kv_length_buckets,
    model_bytes,
    plan_memory,
    rows_buckets,
)
from deepseek_serve.engine.torch_runner.model import ModelArgs
from deepseek_serve.engine.torch_runner.runner import KV_LEN_BUCKET, TorchRunner
from tests.support.torch_models import smollm2_checkpoint

CODER_13B = ModelArgs.from_config(
    dict(
        architectures=["LlamaForCausalLM"],
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        intermediate_size=5504,
        vocab_size=32256,
        rope_theta=100000.0,
        rope_scaling={"type": "linear", "factor": 4.0},
        max_position_embeddings=16384,
    )
)
H200_FREE = 139 * GiB
CODER_WEIGHTS = 2 * CODER_13B.num_params


def _plan(**kw: object) -> object:
    base: dict[str, object] = dict(
        device="cuda:0",
        free_bytes=H200_FREE,
        utilization=0.9,
        weight_bytes=CODER_WEIGHTS,
        max_len=16384,
        requested_slots=128,
        chunk_tokens=512,
        kv_bucket=KV_LEN_BUCKET,
    )
    base.update(kw)
    return plan_memory(CODER_13B, torch.bfloat16, **base)  # type: ignore[arg-type]


def test_kv_bytes_match_the_out_of_memory_report() -> None:
    # 24 layers x 16 KV heads x (K + V) x 128 dims x 2 bytes; 128 slots of 16k tokens = the 384 GiB
    # that the unsized cache tried to allocate
    assert kv_bytes_per_token(CODER_13B, torch.bfloat16) == 196_608
    assert 128 * 16385 * 196_608 / GiB == pytest.approx(384, rel=1e-3)


def test_slots_follow_the_budget() -> None:
    plan = _plan()
    assert 30 <= plan.num_slots < 128  # type: ignore[attr-defined]
    used = plan.kv_bytes + plan.weight_bytes + plan.reserve_bytes  # type: ignore[attr-defined]
    assert used <= plan.budget_bytes < used + plan.kv_bytes_per_slot  # type: ignore[attr-defined]
    assert plan.budget_bytes == int(0.9 * H200_FREE)  # type: ignore[attr-defined]
    assert "slots x 16384 tokens" in plan.describe()  # type: ignore[attr-defined]
    # a shorter context fits every requested slot; a lower utilization fewer slots
    assert _plan(max_len=4096).num_slots == 128  # type: ignore[attr-defined]
    assert _plan(utilization=0.5).num_slots < plan.num_slots  # type: ignore[attr-defined]
    # on CPU (no graphs, no CUDA workspaces) the reserve drops the graphs' logits and the fixed part
    cpu = _plan(device="cpu", cuda_graphs=False)
    assert cpu.reserve_bytes <= plan.reserve_bytes - FIXED_RESERVE  # type: ignore[attr-defined]
    # int4 weights (about a quarter) leave room for more sequences
    assert _plan(weight_bytes=CODER_WEIGHTS // 4).num_slots >= plan.num_slots  # type: ignore[attr-defined]


def test_impossible_context_is_refused_with_the_numbers() -> None:
    with pytest.raises(MemoryPlanError) as info:
        _plan(free_bytes=8 * GiB)
    msg = str(info.value)
    for needle in ("16384 tokens", "DS_MAX_MODEL_LEN", "DS_GPU_MEMORY_UTILIZATION=0.9", "DS_QUANTIZATION", "GiB"):
        assert needle in msg, (needle, msg)
    # the KV of one sequence (3.0 GiB) and of all 128 (384 GiB) are both named
    assert "3.00 GiB per sequence" in msg and "would need 38" in msg
    with pytest.raises(ValueError):
        _plan(utilization=0.0)


def test_graph_buckets_counted_like_warmup() -> None:
    assert rows_buckets(1) == [1]
    assert rows_buckets(39) == [1, 2, 4, 8, 16, 32, 39]
    assert rows_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert kv_length_buckets(16384, 256) == 7
    assert kv_length_buckets(300, 256) == 2
    assert kv_length_buckets(256, 256) == 1


def test_free_memory_on_cpu_is_the_hosts() -> None:
    free = free_memory(torch.device("cpu"))
    assert 64 << 20 < free < 1 << 44


@pytest.mark.slow
def test_from_settings_sizes_and_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    smol = smollm2_checkpoint(request.config)
    common = dict(_env_file=None, data_dir=tmp_path, runner="torch", device="cpu", max_model_len=2048)
    # refused at start: a budget smaller than the weights
    with pytest.raises(MemoryPlanError, match="DS_GPU_MEMORY_UTILIZATION=1e-05"):
        TorchRunner.from_settings(load_settings(**common, gpu_memory_utilization=1e-5), smol)
    # the host's free RAM moves with whatever else runs here; a fixed figure for "free" makes the
    # expected slot count exact (it is the only stand-in: the plan and the runner are real)
    model = load_model(smol, torch.float32, torch.device("cpu"))
    probe = plan_memory(
        model.args,
        torch.float32,
        device="cpu",
        free_bytes=1 << 50,
        utilization=1.0,
        weight_bytes=model_bytes(model),
        max_len=2048,
        requested_slots=6,
        chunk_tokens=512,
        cuda_graphs=False,
    )
    free = probe.weight_bytes + probe.reserve_bytes + int(2.5 * probe.kv_bytes_per_slot)
    monkeypatch.setattr(runner_module, "free_memory", lambda device: free)
    runner = TorchRunner.from_settings(load_settings(**common, max_batch_size=6, gpu_memory_utilization=1.0), smol)
    assert runner.max_num_seqs == 2 and runner.kv_capacity_tokens == 2 * 2048
    assert runner.cache.kv.shape[1] == 2
