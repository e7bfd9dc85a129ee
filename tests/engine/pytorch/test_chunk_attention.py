"""The Triton chunk attention (packed prompt chunks of several sequences against their cached
prefixes): the kernel against SDPA per segment over the explicit mask, the packed layout, and the
runner's packed forward (kernel and masked SDPA paths) against the masked model.

Without a GPU the kernel runs in Triton's CPU interpreter, in a child process (the interpreter must be
on before `triton` is first imported). Needs the `triton` package (CUDA builds of torch ship it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.torch_models import R1_32B_OLD, run_triton_check, tiny_checkpoint

pytest.importorskip("triton", reason="Triton is not installed")


def test_chunk_attention_kernel_and_chunk_forward(tmp_path: Path) -> None:
    path, _ = tiny_checkpoint(tmp_path / "qwen2", R1_32B_OLD, vocab_size=256)
    run_triton_check(
        Path(__file__).with_name("chunk_attention_check.py"), str(path), passed="chunk attention checks passed"
    )
