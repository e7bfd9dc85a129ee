"""Whole-sequence scoring with a `TorchRunner`'s model, for quality checks (perplexity, the tokens a
quantized model picks after each prefix)."""

from __future__ import annotations

import torch
from torch import Tensor

from deepseek_serve.engine.runners.pytorch import TorchRunner
from deepseek_serve.engine.runners.pytorch.forward_batch import ForwardBatch, additive_mask
from deepseek_serve.engine.runners.pytorch.modules import KVCache


def full_logits(runner: TorchRunner, token_ids: list[int]) -> Tensor:
    """Logits after every token, float32 [len, V]; uses a private one-slot cache, so the runner's
    sequences are untouched."""
    t = len(token_ids)
    device, dtype, max_len = runner.device, runner.dtype, runner.max_model_len
    cache = KVCache(runner.args, 1, t, dtype, device)
    if t > max_len:
        runner.model.setup_rope(t + 1, device)
    try:
        with torch.inference_mode():
            tok = torch.tensor([token_ids], dtype=torch.int64, device=device)
            pos = torch.arange(t, device=device)[None, :]
            mask = additive_mask((pos[0][None, :] <= pos[0][:, None]).view(1, 1, t, t), dtype)
            fb = ForwardBatch(
                slots=torch.zeros(1, dtype=torch.int64, device=device),
                positions=pos,
                write_pos=pos,
                mask=mask,
                causal_tail=True,
            )
            return runner.model(tok, cache, fb, runner.ops)[0].float()
    finally:
        if t > max_len:
            runner.model.setup_rope(max_len + 1, device)


def score(runner: TorchRunner, token_ids: list[int]) -> Tensor:
    """Log-probability of each token given the ones before it, float32 [len - 1]."""
    logp = torch.log_softmax(full_logits(runner, token_ids)[:-1], dim=-1)
    return logp.gather(1, torch.tensor(token_ids[1:], device=logp.device)[:, None])[:, 0]
