"""How many KV slots of how many tokens the torch runner may allocate: a memory budget, vLLM's
`gpu_memory_utilization` idea applied to the slot cache.

budget = DS_GPU_MEMORY_UTILIZATION x the device memory free before the weights are loaded (GPU
memory on CUDA, the host's available RAM on CPU). The weights (measured after loading and
quantizing) and a reserve for activations come off it; what is left holds `slots x (max_len + 1)`
KV positions. Fewer slots than DS_MAX_BATCH_SIZE fit: the runner gets the slots that fit (logged);
not even one sequence of max_len fits: `MemoryPlanError`, naming the settings and the bytes needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deepseek_serve.engine.runners.pytorch.config import ModelArgs
from deepseek_serve.engine.runners.pytorch.cuda_graphs import CHUNK_SIZES, chunk_size
from deepseek_serve.engine.runners.pytorch.packing import MAX_SEGMENTS, segment_cap

GiB = 1 << 30
FIXED_RESERVE = 512 << 20  # cuBLAS / Triton workspaces, the CUDA graph pool's own slack, fragmentation
SAMPLER_COPIES = 6  # float32 [rows, vocab] tensors alive at once in the sampler (logits, probs, sort, ...)


class MemoryPlanError(ValueError):
    """The requested context does not fit the memory budget, not even for one sequence."""


def kv_bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
    """K and V of one position in every layer."""
    return args.num_layers * args.num_kv_heads * 2 * args.head_dim * dtype.itemsize


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (the embedding included; shared tensors once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def rows_buckets(num_slots: int) -> list[int]:
    """Row counts of the decode graphs: powers of two below num_slots, then num_slots."""
    out, n = [], 1
    while n < num_slots:
        out.append(n)
        n *= 2
    return [*out, num_slots]


def activation_reserve(
    args: ModelArgs,
    dtype: torch.dtype,
    *,
    chunk_tokens: int,
    max_len: int,
    num_slots: int,
    kv_buckets: int,
    fixed: int = FIXED_RESERVE,
) -> int:
    """An upper estimate of the memory a step needs beyond weights and KV.

    - one prefill forward of `chunk_tokens` tokens reading up to `max_len` positions: attention scores
      and probabilities in float32 (SDPA's math path, the worst case), the additive mask repeated over
      the query heads of a KV head, and the layer's activations (twice, for the input and the output);
    - the sampler's float32 copies of the logits of every slot;
    - the logits each captured graph keeps in the shared pool: rows x vocab per decode graph, and
      `segment_cap` segments x vocab per packed prefill graph up to the bucket of
      `chunk_tokens` (none without graphs: kv_buckets = 0);
    - `fixed` for workspaces (CUDA).
    """
    item = dtype.itemsize
    h, hk, d, i = args.num_heads, args.num_kv_heads, args.head_dim, args.intermediate_size
    t = min(chunk_tokens, max_len)
    s = max_len + 1
    attention = t * h * s * 8 + t * (h // hk) * s * (item + 1)
    layer = 2 * t * (3 * args.hidden_size + (h + 2 * hk) * d + 3 * i) * item
    sampler = num_slots * args.vocab_size * 4 * SAMPLER_COPIES
    graphs = sum(rows_buckets(num_slots)) * kv_buckets * (args.vocab_size * item + 8)
    if kv_buckets:
        largest = chunk_size(t) or CHUNK_SIZES[-1]
        cap = min(MAX_SEGMENTS, num_slots)
        segments = sum(segment_cap(size, cap) for size in CHUNK_SIZES if size <= largest)
        graphs += segments * args.vocab_size * item
    return attention + layer + sampler + graphs + fixed


def kv_length_buckets(max_len: int, bucket: int) -> int:
    """How many KV-length buckets (bucket x powers of two, capped at max_len) the decode graphs use."""
    n, length = 0, bucket
    while True:
        n += 1
        if length >= max_len:
            return n
        length *= 2


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    free_bytes: int
    utilization: float
    weight_bytes: int
    reserve_bytes: int
    kv_bytes_per_slot: int
    max_len: int
    requested_slots: int
    num_slots: int

    @property
    def budget_bytes(self) -> int:
        return int(self.free_bytes * self.utilization)

    @property
    def kv_bytes(self) -> int:
        return self.num_slots * self.kv_bytes_per_slot

    def describe(self) -> str:
        return (
            f"{self.num_slots} slots x {self.max_len} tokens: KV {_gib(self.kv_bytes)} + weights "
            f"{_gib(self.weight_bytes)} + reserve {_gib(self.reserve_bytes)} of a budget of "
            f"{_gib(self.budget_bytes)} (DS_GPU_MEMORY_UTILIZATION={self.utilization:g} x "
            f"{_gib(self.free_bytes)} free on {self.device})"
        )


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def plan_memory(
    args: ModelArgs,
    dtype: torch.dtype,
    *,
    device: str,
    free_bytes: int,
    utilization: float,
    weight_bytes: int,
    max_len: int,
    requested_slots: int,
    chunk_tokens: int,
    kv_bucket: int = 256,
    cuda_graphs: bool = True,
) -> MemoryPlan:
    """The slots that fit (at most `requested_slots`); MemoryPlanError when not even one does.
    `device` "cuda..." adds the fixed workspace reserve; `cuda_graphs` the graphs' logits."""
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")
    per_slot = (max_len + 1) * kv_bytes_per_token(args, dtype)
    reserve = activation_reserve(
        args,
        dtype,
        chunk_tokens=chunk_tokens,
        max_len=max_len,
        num_slots=requested_slots,
        kv_buckets=kv_length_buckets(max_len, kv_bucket) if cuda_graphs else 0,
        fixed=FIXED_RESERVE if device.startswith("cuda") else 0,
    )
    budget = int(free_bytes * utilization)
    fit = max(0, (budget - weight_bytes - reserve) // per_slot)
    if fit < 1:
        need = weight_bytes + reserve + per_slot
        raise MemoryPlanError(
            f"the torch runner cannot hold one sequence of {max_len} tokens on {device}: it needs "
            f"{_gib(need)} (KV cache {_gib(per_slot)} per sequence, weights {_gib(weight_bytes)}, "
            f"activation reserve {_gib(reserve)}; {requested_slots} sequences would need "
            f"{_gib(weight_bytes + reserve + requested_slots * per_slot)}), but "
            f"DS_GPU_MEMORY_UTILIZATION={utilization:g} of the {_gib(free_bytes)} free gives "
            f"{_gib(budget)}. Lower DS_MAX_MODEL_LEN (or DS_CONTEXT_LENGTH), use DS_QUANTIZATION=int8 or "
            f"int4, or raise DS_GPU_MEMORY_UTILIZATION."
        )
    return MemoryPlan(
        device=device,
        free_bytes=free_bytes,
        utilization=utilization,
        weight_bytes=weight_bytes,
        reserve_bytes=reserve,
        kv_bytes_per_slot=per_slot,
        max_len=max_len,
        requested_slots=requested_slots,
        num_slots=min(requested_slots, int(fit)),
    )


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: the CUDA driver's count, or the host's MemAvailable on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
