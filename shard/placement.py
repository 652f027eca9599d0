"""Where a rank runs and with what, decided once at start-up from what was asked (`auto` or
None: ours to choose) and the machine:

- device: `cuda:{rank % visible GPUs}` where CUDA is available (TGI's rule), else the CPU;
- dtype: on a GPU the checkpoint's own (`torch_dtype` bfloat16/float16; bfloat16 for a float32
  checkpoint), on the CPU bfloat16 where it computes it natively (AVX512-BF16, AMX), else
  float32 (emulated bfloat16 is slower);
- block size: what the attention backend pages best (flash-attn 2 needs 256, ours 16);
- KV cache budget: on the CPU what the token limits need (`--max-batch-total-tokens`, else
  16,384 tokens or two requests of `--max-total-tokens`), as llama.cpp sizes its cache by
  its context, at most 30% of the memory free after warmup (the OS and the router share it);
  90% on a GPU (TGI's wiggle room), within `--cuda-memory-fraction` of the GPU;
- batch invariance (shard/numerics.py): on for the CPU, where our own kernels give it at
  little cost; off for a GPU unless asked (`--batch-invariant true`, as vLLM's opt-in mode),
  which then takes the triton attention backend.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from common.cpu import cpu_flags, native_bf16
from shard.attention import resolve_backend_name
from shard.config import MemoryBudget, ShardConfig

CPU_KV_FRACTION = 0.3
GPU_KV_FRACTION = 0.9  # TGI_WIGGLE_ROOM: what is left covers fragmentation and graphs
HALF_DTYPES = ("bfloat16", "float16")


def resolve_device(requested: str, rank: int, cuda_count: int) -> torch.device:
    """`auto`: cuda:{rank % cuda_count} when there are GPUs, else cpu; `cuda` always takes the
    rank's GPU; an explicit `cuda:N` or `cpu` stays."""
    if requested == "auto":
        requested = "cuda" if cuda_count > 0 else "cpu"
    if requested == "cuda":
        if cuda_count == 0:
            raise ValueError("--device cuda, but torch sees no CUDA device")
        return torch.device("cuda", rank % cuda_count)
    return torch.device(requested)


def default_dtype(device: torch.device, checkpoint_dtype: str | None, flags: frozenset[str]) -> str:
    if device.type == "cuda":
        return checkpoint_dtype if checkpoint_dtype in HALF_DTYPES else "bfloat16"
    return "bfloat16" if native_bf16(flags) else "float32"


def default_block_size(backend: str) -> int:
    from shard.attention.flash_attn import FLASH_BLOCK_MULTIPLE

    return FLASH_BLOCK_MULTIPLE if backend == "flash" else 16


def default_kv_budget(device: torch.device) -> MemoryBudget:
    if device.type == "cuda":
        return MemoryBudget(fraction=GPU_KV_FRACTION)
    return MemoryBudget(fraction=CPU_KV_FRACTION, sized_to_need=True)


def check_kv_dtype(kv_dtype: str | None, dtype: str, device: torch.device) -> None:
    """A cache dtype other than the model's is read by the CPU's paged kernel only: the GPU
    backends (flash-attn, Triton) attend over a cache of q's own dtype."""
    if device.type == "cuda" and kv_dtype not in (None, dtype):
        raise ValueError(
            f"--kv-cache-dtype {kv_dtype} runs on the CPU only: on a GPU the KV cache keeps "
            f"the model's dtype ({dtype})"
        )


def resolve_placement(
    config: ShardConfig, checkpoint_dtype: str | None, cuda_count: int | None = None
) -> ShardConfig:
    """`config` with every `auto`/None setting made concrete for this rank and machine."""
    if cuda_count is None:
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = resolve_device(config.device, config.rank, cuda_count)
    invariant = device.type == "cpu" if config.batch_invariant is None else config.batch_invariant
    attention = config.attention
    if invariant and device.type == "cuda" and attention == "auto":
        attention = "triton"  # the invariant backend there (flash-attn's split work varies)
    backend = resolve_backend_name(attention, device, config.block_size)
    dtype = config.dtype or default_dtype(device, checkpoint_dtype, cpu_flags())
    check_kv_dtype(config.kv_cache_dtype, dtype, device)
    return replace(
        config,
        device=str(device),
        dtype=dtype,
        attention=backend,
        block_size=config.block_size or default_block_size(backend),
        kv_cache_memory=config.kv_cache_memory or default_kv_budget(device),
        batch_invariant=invariant,
    )
