"""The one-row GEMV kernels (float, int8, int4; plain and with SiLU·up fused) against reference math,
each code -> float conversion (casts, bit tricks; the PTX one runs as the plain bit tricks here) bit
for bit against (code - zero) * scale at the code extremes (int8 -128 / 127, int4 0 / 15) and odd
tails, through the quantized linears, and inside the compiled decode step of a tiny model (greedy
tokens equal to those of the older path).

Without a GPU the kernels run in Triton's CPU interpreter, in a child process (the interpreter must be
on before `triton` is first imported). Needs the `triton` package (CUDA builds of torch ship it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.torch_models import R1_32B_OLD, run_triton_check, tiny_checkpoint

pytest.importorskip("triton", reason="Triton is not installed")


def test_gemv_kernels_and_one_row_decode(tmp_path: Path) -> None:
    path, _ = tiny_checkpoint(tmp_path / "qwen2", R1_32B_OLD, vocab_size=256)
    run_triton_check(Path(__file__).with_name("gemv_kernels_check.py"), str(path), passed="gemv kernel checks passed")
