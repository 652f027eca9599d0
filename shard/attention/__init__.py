"""Attention backends and the one place that picks one.

torch   per-sequence pure-PyTorch reference (slow, any device)
sdpa    one batched scaled_dot_product_attention call per layer (the CPU path)
flash   flash-attn 2 paged kernels (CUDA; needs flash_attn and block_size % 256 == 0)
triton  SDPA for prompts, a Triton paged kernel for decode steps (CUDA; needs only the
        Triton that ships with CUDA torch)
auto    on CUDA: flash when flash_attn imports (and the block size suits it), else triton when
        Triton is there, else sdpa; on the CPU: sdpa
"""

from __future__ import annotations

import importlib.util

import torch

from shard.attention.base import AttentionBackend
from shard.attention.sdpa import SdpaPagedAttention
from shard.attention.torch_ref import TorchReferenceAttention
from shard.attention.triton_decode import TritonPagedAttention, triton_available

BACKENDS = ("torch", "sdpa", "flash", "triton", "auto")


def flash_attn_available() -> bool:
    """True when flash_attn imports (not merely when it is installed: its CUDA extension can
    fail to load, e.g. built against another torch)."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        importlib.import_module("flash_attn")
    except (ImportError, OSError, RuntimeError):  # e.g. a mismatched CUDA extension
        return False
    return True


def resolve_backend_name(
    name: str, device: torch.device | str, block_size: int | None = None
) -> str:
    """The concrete backend `name` means on `device` ("auto" -> "flash" or "sdpa")."""
    if name not in BACKENDS:
        expected = ", ".join(BACKENDS)
        raise ValueError(f"unknown attention backend {name!r}; expected one of {expected}")
    if name != "auto":
        return name
    from shard.attention.flash_attn import FLASH_BLOCK_MULTIPLE

    if torch.device(device).type != "cuda":
        return "sdpa"
    if (block_size is None or block_size % FLASH_BLOCK_MULTIPLE == 0) and flash_attn_available():
        return "flash"
    return "triton" if triton_available() else "sdpa"


def get_backend(
    name: str, device: torch.device | str, block_size: int | None = None
) -> AttentionBackend:
    """A backend by name; block_size (the KV cache's) lets "auto" skip flash when it can't page
    that block size, and makes "flash" fail now rather than at the first step."""
    resolved = resolve_backend_name(name, device, block_size)
    if resolved == "torch":
        return TorchReferenceAttention()
    if resolved == "sdpa":
        return SdpaPagedAttention()
    if resolved == "triton":
        return TritonPagedAttention()
    from shard.attention.flash_attn import FlashPagedAttention

    return FlashPagedAttention(block_size=block_size)


__all__ = ["BACKENDS", "AttentionBackend", "get_backend", "resolve_backend_name"]
