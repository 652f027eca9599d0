"""Paged attention on the CPU, in C (paged_decode.c): each query token attends to its own
sequence's cache in place, through the block table, up to its own position. The SDPA backend
takes this path for every step in batch-invariant mode (shard/numerics.py), and otherwise for
decode-only steps, its general path (gather K/V, pad, SDPA) serving the rest.

Measured on SmolLM2-135M (2 cores, bf16, 16 sequences of ~150 tokens): the gathers and SDPA
calls took ~7 ms of a 53 ms decode step.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from shard.engine.forward_context import AttentionMetadata
from shard.engine.kv_cache import LayerKV
from shard.native import SIMD_HEADER, load_library
from shard.numerics import batch_invariant

SOURCE = Path(__file__).with_name("paged_decode.c")
DTYPES = (torch.float32, torch.bfloat16)  # of q and the output
KV_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # simd.h's KV_F32, ...
_ptr, _int, _float = ctypes.c_void_p, ctypes.c_int, ctypes.c_float


class PagedKV(ctypes.Structure):  # paged_decode.c's PagedKV
    _fields_ = [
        ("heads", _int), ("kv_heads", _int), ("head_dim", _int), ("block_size", _int),
        ("max_blocks", _int), ("kv_type", _int), ("scale", _float),
        ("block_tables", _ptr), ("token_seq", _ptr), ("token_len", _ptr),
        ("window", _int), ("softcap", _float),
    ]  # fmt: skip


def token_layout(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query token's sequence and how many positions it sees (its position + 1): two [T]
    int32 tensors, built once per step (meta.prepared)."""
    layout = meta.prepared.get("token_layout")
    if layout is None:
        query_lens = torch.tensor(meta.query_lens_list, dtype=torch.int64)  # [B]
        seqs = torch.repeat_interleave(torch.arange(meta.num_seqs), query_lens)  # [T]
        first = torch.tensor(meta.seq_lens_list, dtype=torch.int64) - query_lens + 1  # [B]
        starts = torch.cumsum(query_lens, 0) - query_lens  # [B]
        offset = torch.arange(len(seqs)) - starts[seqs]  # [T]: index within its sequence
        lens = first[seqs] + offset
        layout = meta.prepared["token_layout"] = (seqs.to(torch.int32), lens.to(torch.int32))
    return layout


def paged_kv(
    meta: AttentionMetadata,
    cache: LayerKV,
    heads: int,
    kv_heads: int,
    head_dim: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> PagedKV:
    """Where the step's tokens and sequences are; valid while `meta` lives. window 0 and
    softcap 0 mean none."""
    seqs, lens = token_layout(meta)
    return PagedKV(
        heads, kv_heads, head_dim, meta.block_size, meta.block_tables.shape[1],
        KV_TYPES[cache.key.dtype], scale, meta.block_tables.data_ptr(),
        seqs.data_ptr(), lens.data_ptr(), window or 0, softcap or 0.0,
    )  # fmt: skip


class PagedDecodeKernel:
    def __init__(self, lib: ctypes.CDLL):
        self._run = lib.paged_decode_attention
        self._run.restype = None
        self._run.argtypes = [_ptr, _int, _ptr, _ptr, _int, _ptr, _ptr]

    @staticmethod
    def supports(
        q: torch.Tensor, cache: LayerKV, meta: AttentionMetadata, any_step: bool = False
    ) -> bool:
        """A step on the CPU (any step in batch-invariant mode or with any_step, else a decode
        step), q in one of DTYPES and the cache in one of KV_TYPES, heads of 16k floats."""
        return (
            (meta.is_decode_only or batch_invariant() or any_step)
            and q.is_cpu
            and q.dtype in DTYPES
            and cache.key.dtype in KV_TYPES
            and q.shape[-1] % 16 == 0
            and q.shape[1] % cache.key.shape[2] == 0
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
        """q [T, heads, D] -> [T, heads, D]; the step's PagedKV is built once per kind of layer
        (its window and soft-capping) at its first layer."""
        key = "paged_decode" if window is None and softcap is None else (window, softcap)
        paged = meta.prepared.get(key)
        if paged is None:
            kv_heads = cache.key.shape[2]
            paged = meta.prepared[key] = paged_kv(
                meta, cache, q.shape[1], kv_heads, q.shape[2], scale, window, softcap
            )
        q = q.contiguous()
        out = torch.empty_like(q)
        self._run(
            ctypes.byref(paged), q.shape[0], q.data_ptr(), out.data_ptr(),
            int(q.dtype is torch.bfloat16), cache.key.data_ptr(), cache.value.data_ptr(),
        )  # fmt: skip
        return out


@functools.cache
def paged_decode_kernel() -> PagedDecodeKernel | None:
    """The process's kernel, built on first call; None where it cannot be built."""
    lib = load_library(SOURCE, (SIMD_HEADER,), fallback="decode steps use SDPA")
    return None if lib is None else PagedDecodeKernel(lib)
