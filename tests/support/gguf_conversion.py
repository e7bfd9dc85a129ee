"""GGUF -> Hugging Face folder (dequantized safetensors + tokenizer), through transformers' GGUF loader.

Slow (transformers parses the GGUF metadata in Python: minutes for a 100k-token vocabulary on a
busy CPU); callers cache the result. Makes Hugging Face checkpoints of GGUF packs for the torch
runner's tests and benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def gguf_to_hf(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `config.json`, `model.safetensors` and the tokenizer files of `gguf_path` into `out_dir`."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    tok.save_pretrained(str(out_dir))
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    tied = bool(cfg.get("tie_word_embeddings"))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(out_dir / "model.safetensors"))
    return out_dir
