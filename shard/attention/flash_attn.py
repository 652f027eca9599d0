"""Paged attention through flash-attn 2 (>= 2.5): the CUDA path.

`flash_attn` is imported only when a FlashPagedAttention is constructed, so this module imports
fine on machines without it. Prefill and mixed steps go through `flash_attn_varlen_func` with a
`block_table` (k/v are the paged cache tensors, cu_seqlens_k the cumulative seq_lens), decode-only
steps through `flash_attn_with_kvcache` (one query per sequence, cache_seqlens = seq_lens).

flash-attn's documented constraints this relies on:
  * paged KV (block_table) needs page_block_size % 256 == 0 in flash-attn 2, so the cache's
    block_size must be a multiple of 256 (checked at construction and in `prepare`);
  * with causal=True and seqlen_q != seqlen_k the causal mask is aligned to the bottom-right
    corner, i.e. query i of a sequence sees keys <= seqlen_k - seqlen_q + i: exactly our
    "query i sits at seq_len - query_len + i" convention (chunked prefill, decode);
  * q has nheads divisible by the cache's nheads_k (GQA: head h reads kv head h // group);
  * cu_seqlens_q/k, cache_seqlens and block_table are int32 on the same device as q;
  * fp16/bf16 only, head_dim <= 256.
The kernels can be injected (`varlen_fn`, `kvcache_fn`) to contract-test this class on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from shard.engine.forward_context import AttentionMetadata
from shard.engine.kv_cache import LayerKV

FLASH_BLOCK_MULTIPLE = 256  # flash-attn 2 paged KV: page_block_size % 256 == 0


def import_flash_attn() -> Any:
    """The flash_attn module, or an ImportError that says what to do."""
    try:
        import flash_attn
    except ImportError as e:
        raise ImportError(
            "the 'flash' attention backend needs flash-attn >= 2.5 (pip install flash-attn "
            "--no-build-isolation) and a CUDA GPU; use the 'sdpa' backend otherwise"
        ) from e
    return flash_attn


def check_block_size(block_size: int, multiple: int = FLASH_BLOCK_MULTIPLE) -> None:
    if block_size % multiple != 0:
        raise ValueError(
            f"the 'flash' attention backend needs a KV cache block_size that is a multiple of "
            f"{multiple} (flash-attn paged KV), got {block_size}; use the 'sdpa' backend or "
            f"a block size of {multiple}"
        )


@dataclass
class FlashStep:
    """What every layer of one step shares (meta.prepared["flash"])."""

    decode_only: bool
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    cu_seqlens_k: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32, contiguous
    max_query_len: int
    max_seq_len: int


class FlashPagedAttention:
    name = "flash"

    def __init__(
        self,
        block_size: int | None = None,
        varlen_fn: Callable[..., torch.Tensor] | None = None,
        kvcache_fn: Callable[..., torch.Tensor] | None = None,
        block_multiple: int = FLASH_BLOCK_MULTIPLE,
    ):
        """block_size: the KV cache's, checked now if given (and in `prepare` anyway).
        varlen_fn / kvcache_fn: stand-ins for flash_attn's functions (tests); flash_attn is
        imported only if one of them is missing."""
        self.block_multiple = block_multiple
        if block_size is not None:
            check_block_size(block_size, block_multiple)
        if varlen_fn is None or kvcache_fn is None:
            flash_attn = import_flash_attn()
            varlen_fn = varlen_fn or flash_attn.flash_attn_varlen_func
            kvcache_fn = kvcache_fn or flash_attn.flash_attn_with_kvcache
        self.varlen_fn = varlen_fn
        self.kvcache_fn = kvcache_fn

    def prepare(self, meta: AttentionMetadata) -> None:
        check_block_size(meta.block_size, self.block_multiple)
        seq_lens = meta.seq_lens.to(torch.int32)  # [B]
        meta.prepared["flash"] = FlashStep(
            decode_only=meta.is_decode_only,
            cu_seqlens_q=meta.query_start_loc.to(torch.int32),
            cu_seqlens_k=F.pad(seq_lens.cumsum(0, dtype=torch.int32), (1, 0)),  # [B + 1]
            seq_lens=seq_lens,
            block_tables=meta.block_tables.to(torch.int32).contiguous(),
            max_query_len=meta.max_query_len,
            max_seq_len=meta.max_seq_len,
        )

    def forward(
        self,
        q: torch.Tensor,
        cache: LayerKV,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """flash-attn's own sliding window (window_size: the window - 1 positions to the left
        and none to the right) and soft-capping (flash-attn >= 2.6)."""
        extra = dict(window_size=(window - 1, 0) if window else (-1, -1), softcap=softcap or 0.0)
        step = meta.prepared.get("flash")
        if step is None:  # prepare was skipped: build it now, once, for every later layer
            self.prepare(meta)
            step = meta.prepared["flash"]
        if step.decode_only:  # T == B: one new token per sequence
            out = self.kvcache_fn(
                q.unsqueeze(1),
                cache.key,
                cache.value,  # [B, 1, H, D], paged cache
                cache_seqlens=step.seq_lens,
                block_table=step.block_tables,
                softmax_scale=scale,
                causal=True,
                **extra,
            )  # [B, 1, H, D]
            return out.squeeze(1)
        return self.varlen_fn(
            q,
            cache.key,
            cache.value,  # [T, H, D], paged cache
            step.cu_seqlens_q,
            step.cu_seqlens_k,
            step.max_query_len,
            step.max_seq_len,
            softmax_scale=scale,
            causal=True,
            block_table=step.block_tables,
            **extra,
        )  # [T, H, D]
