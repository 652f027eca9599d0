"""Pure-PyTorch paged attention, one sequence at a time: the reference every backend is
tested against. Slow but obvious; it runs on any device."""

from __future__ import annotations

import torch

from shard.engine.forward_context import AttentionMetadata
from shard.engine.kv_cache import LayerKV


def gather_context(cache: LayerKV, block_table: torch.Tensor, seq_len: int):
    """Returns the first `seq_len` cached K and V of one sequence: [seq_len, kv_heads, head_dim]."""
    block_size = cache.key.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    k = cache.key[blocks].flatten(0, 1)[
        :seq_len
    ]  # [num_blocks * block_size, kv, d] -> [seq_len, kv, d]
    v = cache.value[blocks].flatten(0, 1)[:seq_len]
    return k, v


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention aligned at the end. q: [n, H, d]; k, v: [L, KV, d] with L >= n. With a
    window, query position p sees keys (p - window, p]; softcap: scores -> cap tanh(s / cap)."""
    n, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=1).float()  # [L, H, d]
    v = v.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) * scale  # [H, n, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    query_pos = torch.arange(seq_len - n, seq_len).unsqueeze(1)  # [n, 1]
    key_pos = torch.arange(seq_len).unsqueeze(0)  # [1, L]
    hidden = key_pos > query_pos
    if window is not None:
        hidden = hidden | (key_pos <= query_pos - window)
    scores = scores.masked_fill(hidden, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("hnl,lhd->nhd", probs, v).to(q.dtype)  # [n, H, d]


class TorchReferenceAttention:
    name = "torch"

    def prepare(self, meta: AttentionMetadata) -> None:
        pass

    def forward(
        self,
        q: torch.Tensor,
        cache: LayerKV,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        start = 0
        for i, (n, seq_len) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list)):
            k, v = gather_context(cache, meta.block_tables[i], seq_len)
            out[start : start + n] = attend(q[start : start + n], k, v, scale, window, softcap)
            start += n
        return out
