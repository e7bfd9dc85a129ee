"""The Triton split-KV decode attention: kernels against SDPA, and inside the compiled decode step.

Without a GPU the kernels run in Triton's CPU interpreter, in a child process (the interpreter must be
on before `triton` is first imported). Needs the `triton` package (CUDA builds of torch ship it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.torch_models import R1_32B_OLD, tiny_checkpoint

pytest.importorskip("triton", reason="Triton is not installed")


def test_decode_attention_kernels_and_decode_step(tmp_path: Path) -> None:
    path, _ = tiny_checkpoint(tmp_path / "qwen2", R1_32B_OLD, vocab_size=256)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("decode_attention_check.py")), str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "decode attention checks passed" in proc.stdout
