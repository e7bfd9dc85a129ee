"""PyTorch runner for Hugging Face Llama / Qwen2 checkpoints (CPU and CUDA, int8/int4 weight-only).

Layout: `runner` (TorchRunner: slots, steps, sampling results), `config` (ModelArgs from config.json),
`ops` (the layer's computation as functions, `Ops`), `modules` (the decoder and its KV cache),
`forward_batch` (what a forward reads besides tokens), `compile` (everything torch.compile'd),
`cuda_graphs` (captured decode forwards), `loading`, `quantize` (+ Triton `quant_kernels`),
`decode_attention` (Triton), `memory` (the KV budget), `slots`, `sampler`, `tokenizer`,
`speculative` (prompt lookup).
"""

from deepseek_serve.engine.runners.pytorch.runner import TorchRunner

__all__ = ["TorchRunner"]
