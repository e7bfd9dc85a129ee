"""The Triton weight-only int8 / int4 matmuls against reference math, and inside the compiled decode
step of a quantized model.

Without a GPU the kernels run in Triton's CPU interpreter, in a child process (the interpreter must be
on before `triton` is first imported). Needs the `triton` package (CUDA builds of torch ship it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.torch_models import R1_32B_OLD, run_triton_check, tiny_checkpoint

pytest.importorskip("triton", reason="Triton is not installed")


def test_quant_kernels_and_quantized_decode_step(tmp_path: Path) -> None:
    path, _ = tiny_checkpoint(tmp_path / "qwen2", R1_32B_OLD, vocab_size=256)
    run_triton_check(Path(__file__).with_name("quant_kernels_check.py"), str(path), passed="quant kernel checks passed")
