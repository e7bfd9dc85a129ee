"""On-device checks of the packed prefill (CUDA only; about a minute on one GPU).

1. the chunk attention against SDPA per segment in float32 and bfloat16, and the packed layout
   (`chunk_attention_check`);
2. for tiny random fp32 Qwen2 (GQA) and Llama (MHA) models: several prompts of different lengths
   admitted together, prefilled through the packed CUDA graphs (several segments per replay, more
   tokens than one bucket holds split over replays), give the same greedy tokens as transformers
   `generate()`, as the eager runner and as the runner without packing; a warmed-up runner captures
   nothing while it serves; the logits and KV of one packed replay equal those of each chunk alone.

Usage, from the repository root on a CUDA machine:
    PYTHONPATH=src:bench python3 tests/engine/pytorch/packed_prefill_check.py
"""

from __future__ import annotations

import time
from typing import Any

import chunk_attention_check as kernel_checks
import torch

from deepseek_serve.engine.runners.pytorch.config import ModelArgs
from deepseek_serve.engine.runners.pytorch.loading import from_state_dict
from deepseek_serve.engine.runners.pytorch.packing import Segment
from deepseek_serve.engine.runners.pytorch.runner import TorchRunner
from gpu import SHAPES, TINY, hf_generate, hf_model, make_seqs
from tests.support.runner_driver import run_to_completion

DEVICE = torch.device("cuda")
LENGTHS = (5, 37, 130, 1, 64, 300, 200, 17, 90)
NEW_TOKENS = 16


def make_runner(hf: torch.nn.Module, cfg: dict[str, Any], **kw: Any) -> TorchRunner:
    model = from_state_dict(ModelArgs.from_config(cfg), dict(hf.state_dict()), torch.float32, DEVICE, "hf model")
    return TorchRunner(model, None, num_slots=16, max_len=512, device=DEVICE, dtype=torch.float32, **kw)


def count_replays(runner: TorchRunner) -> list[int]:
    """Segments of each packed graph replay of `runner` from now on."""
    graphs = runner.chunk_graphs
    assert graphs is not None
    seen: list[int] = []
    replay = graphs.replay

    def counted(segments: list[Segment]) -> torch.Tensor:
        seen.append(len(segments))
        return replay(segments)

    graphs.replay = counted  # type: ignore[method-assign]
    return seen


def check_model(name: str, cfg: dict[str, Any], warm: bool) -> None:
    hf = hf_model(cfg, torch.float32, seed=1)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, cfg["vocab_size"], (n,), generator=gen).tolist() for n in LENGTHS]
    refs = [hf_generate(hf, [p], NEW_TOKENS)[0] for p in prompts]
    # warmed up with the fused (compiled) ops as the server runs (the decode step eager: quicker), or
    # eager ops with the graphs captured on first use
    graphs = make_runner(hf, cfg, compile_ops=warm, compile_decode=False)
    if warm:
        graphs.warmup(512)
    assert graphs.chunk_graphs is not None and graphs.graphs is not None
    captured = (len(graphs.graphs), len(graphs.chunk_graphs))
    replays = count_replays(graphs)
    outputs = {}
    for label, runner in (
        ("graphs", graphs),
        ("eager", make_runner(hf, cfg, cuda_graphs=False, compile_ops=False)),
        ("unpacked", make_runner(hf, cfg, compile_ops=False, packed_prefill=False)),
    ):
        seqs = make_seqs(prompts, NEW_TOKENS)
        run_to_completion(runner, seqs, prefill_chunk=512)
        outputs[label] = [s.output_token_ids for s in seqs]
        if runner is graphs:  # before close(), which drops the graphs
            served = (len(graphs.graphs), len(graphs.chunk_graphs))
        runner.close()
    for label, got in outputs.items():
        bad = [n for n, ref, out in zip(LENGTHS, refs, got, strict=True) if ref != out]
        assert not bad, f"{name} {label}: prompts of {bad} tokens differ from generate()"
    # step 1: 843 prompt tokens (the 1-token prompt decodes) in forwards of at most 512 tokens after
    # warm-up (the bucket it captured last), of 1024 (the largest bucket) otherwise
    assert replays == ([4, 2, 2] if warm else [8]), replays
    if warm:
        assert served == captured, f"a graph was captured while serving: (decode, packed) graphs {captured} -> {served}"
    check_replay_logits(hf, cfg)
    print(f"{name}: {len(prompts)} prompts equal to generate() (graphs, eager, unpacked); replays {replays}")


def check_replay_logits(hf: torch.nn.Module, cfg: dict[str, Any]) -> None:
    """One replay of four chunks (two at nonzero positions, after a first replay) against each chunk
    fed alone through the eager runner: logits and KV."""
    gen = torch.Generator().manual_seed(5)
    ids = [torch.randint(0, cfg["vocab_size"], (n,), generator=gen).tolist() for n in (150, 3, 70, 41)]
    first = [Segment(ids[0][:100], 3, 0), Segment(ids[2][:6], 1, 0)]
    second = [Segment(ids[0][100:], 3, 100), Segment(ids[1], 0, 0), Segment(ids[2][6:], 1, 6), Segment(ids[3], 7, 0)]
    packed, alone = make_runner(hf, cfg, compile_ops=False), make_runner(hf, cfg, cuda_graphs=False, compile_ops=False)
    with torch.inference_mode():
        for step in (first, second):
            got = packed._prefill_packed(step)
            want = torch.cat([alone._prefill_eager([seg]) for seg in step])
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for slot, n in ((3, 150), (0, 3), (1, 70), (7, 41)):
        torch.testing.assert_close(
            packed.cache.kv[:, slot, :, :n], alone.cache.kv[:, slot, :, :n], atol=1e-5, rtol=1e-5
        )


def main() -> None:
    t0 = time.perf_counter()
    kernel_checks.check_layout()
    kernel_checks.check_kernel()
    kernel_checks.check_refusal()
    print(f"kernel checks passed (float32, bfloat16) in {time.perf_counter() - t0:.1f} s")
    for i, (name, shape) in enumerate(SHAPES.items()):
        t1 = time.perf_counter()
        cfg = {**shape, **TINY}
        heads = 4 if cfg["num_key_value_heads"] == cfg["num_attention_heads"] else 2
        cfg.update(num_attention_heads=4, num_key_value_heads=heads)
        check_model(name, cfg, warm=i == 0)
        print(f"{name}: {time.perf_counter() - t1:.1f} s")
    print(f"packed prefill checks passed in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
