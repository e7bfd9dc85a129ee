"""PyTorch runner for Hugging Face Llama / Qwen2 checkpoints (CPU and CUDA, int8/int4 weight-only).

Layout: `runner` (TorchRunner: slots, steps, sampling results), `config` (ModelArgs from config.json),
`ops` (the layer's computation as functions, `Ops`), `modules` (the decoder and its KV cache),
`forward_batch` (what a forward reads besides tokens), `compile` (everything torch.compile'd),
`cuda_graphs` (captured decode forwards), `loading`, `quantize` (+ Triton `quant_kernels`),
`decode_attention` (Triton), `memory` (the KV budget), `slots`, `sampler`, `tokenizer`,
`speculative` (prompt lookup).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepseek_serve.engine.runners.pytorch.runner import TorchRunner

__all__ = ["TorchRunner"]


def __getattr__(name: str) -> Any:
    """`TorchRunner` on first use: the package's light modules (the tokenizer an API process unpickles)
    do not import torch."""
    if name == "TorchRunner":
        from deepseek_serve.engine.runners.pytorch.runner import TorchRunner

        return TorchRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
