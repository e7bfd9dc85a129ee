"""PyTorch runner for Hugging Face Llama / Qwen2 checkpoints (CPU and CUDA, int8/int4 weight-only)."""

from deepseek_serve.engine.torch_runner.runner import TorchRunner

__all__ = ["TorchRunner"]
