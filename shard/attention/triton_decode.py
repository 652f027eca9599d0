"""Paged attention on CUDA with nothing beyond PyTorch and Triton (both ship with CUDA torch),
for machines without flash-attn: prefill and mixed steps go through the SDPA backend (gathered
K/V, PyTorch's fused attention kernels), decode-only steps through the Triton kernel below,
which reads K/V straight from the paged cache through the block tables.

The kernel: one program per (sequence, kv head). It loads the GROUP query heads that share the
kv head as one [GROUP_PAD, DIM_PAD] tile (padded to Triton's 16-row dot minimum), walks the
sequence's blocks one page at a time (BLOCK_SIZE keys), and keeps an online softmax (running
max m, running sum l, accumulator acc) in float32:

    scores = q @ k^T * scale            [GROUP_PAD, BLOCK_SIZE], keys past seq_len = -inf
    m' = max(m, rowmax(scores));  p = exp(scores - m');  alpha = exp(m - m')
    l = l * alpha + rowsum(p);    acc = acc * alpha + p @ v
    out = acc / l

`torch_ref.TorchReferenceAttention` is its reference; the tests run the kernel with Triton's
interpreter (TRITON_INTERPRET=1) on the CPU, and on the GPU in the device check.
Not done yet: splitting long sequences across programs (flash-decoding), which a batch of one
long sequence would need to fill a large GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from shard.attention.paged_decode import token_layout
from shard.attention.sdpa import SdpaPagedAttention
from shard.attention.torch_ref import TorchReferenceAttention
from shard.engine.forward_context import AttentionMetadata
from shard.engine.kv_cache import LayerKV
from shard.numerics import batch_invariant

MIN_DOT = 16  # tl.dot's smallest M, N and K


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton's interpreter runs kernels on CPU tensors (TRITON_INTERPRET=1: tests only)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.cache
def _kernel():
    """The jitted kernel, imported on first use (importing Triton takes about a second)."""
    from shard.attention.triton_kernel import paged_decode_kernel

    return paged_decode_kernel


def paged_decode(
    q: torch.Tensor,
    cache: LayerKV,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence. q: [B, H, D]; cache [N, BLOCK_SIZE, KV, D];
    block_tables [B, max_blocks] int32; seq_lens [B] int32 -> [B, H, D]."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = cache.key.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    _kernel()[(batch, num_kv_heads)](
        q,
        cache.key,
        cache.value,
        out,
        block_tables,
        seq_lens,
        scale,
        q.stride(0),
        q.stride(1),
        cache.key.stride(0),
        cache.key.stride(1),
        cache.key.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=max(_next_pow2(group), MIN_DOT),
        HEAD_DIM=head_dim,
        DIM_PAD=max(_next_pow2(head_dim), MIN_DOT),
        BLOCK_SIZE=block_size,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out


def supports(q: torch.Tensor, cache: LayerKV, meta: AttentionMetadata) -> bool:
    """A step the kernel takes (a decode step, or any in batch-invariant mode): on CUDA (or
    interpreted), pages of >= 16 keys in a power of two, contiguous head dims, the cache in
    q's dtype."""
    block_size = cache.key.shape[1]
    return (
        (meta.is_decode_only or batch_invariant())
        and (q.is_cuda or interpreting())
        and block_size >= MIN_DOT
        and block_size & (block_size - 1) == 0
        and q.stride(-1) == 1
        and cache.key.stride(-1) == 1
        and cache.key.dtype == q.dtype
        and q.shape[1] % cache.key.shape[2] == 0
    )


def per_token(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query token as a sequence of its own for the kernel: its sequence's block table
    and its position + 1 ([T, max_blocks], [T] int32, on the step's device), built once per
    step. A prompt token is then attended exactly as a decode token at its position."""
    layout = meta.prepared.get("triton_tokens")
    if layout is None:
        seqs, lens = token_layout(meta)
        device = meta.block_tables.device
        tables = meta.block_tables.index_select(0, seqs.to(device, torch.int64))
        layout = meta.prepared["triton_tokens"] = (tables, lens.to(device))
    return layout


class TritonPagedAttention:
    """Decode steps through the Triton kernel, everything else through SDPA; in batch-invariant
    mode every step through the kernel, one query token at a time (no SDPA)."""

    name = "triton"

    def __init__(self) -> None:
        self.sdpa = SdpaPagedAttention()

    def prepare(self, meta: AttentionMetadata) -> None:
        if not meta.is_decode_only and not batch_invariant():
            self.sdpa.prepare(meta)

    def forward(
        self,
        q: torch.Tensor,
        cache: LayerKV,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """Layers with a sliding window or soft-capping take the torch reference (right, slow:
        the Triton kernel has neither yet)."""
        if window is not None or softcap is not None:
            return TorchReferenceAttention().forward(q, cache, meta, scale, window, softcap)
        if supports(q, cache, meta):
            if meta.is_decode_only:  # a token per sequence already (and what graphs replay)
                return paged_decode(q, cache, meta.block_tables, meta.seq_lens, scale)
            tables, lens = per_token(meta)
            return paged_decode(q, cache, tables, lens, scale)
        return self.sdpa.forward(q, cache, meta, scale)
