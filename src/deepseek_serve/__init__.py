"""deepseek-serve: a self-hosted serving stack for small DeepSeek chat models."""

__version__ = "0.1.0"
