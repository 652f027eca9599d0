"""What one forward step needs to know besides the token ids: where each token's K/V goes
(slots) and which cached K/V each sequence attends to (block_tables, seq_lens).

Vocabulary, the same from the proto to the kernels:
  block        a group of `block_size` consecutive KV positions of one sequence
  slot         one KV position in the cache: slot = block * block_size + offset
  block_table  the blocks of one sequence, in order
  T            tokens in this step (all sequences, flattened); B = sequences in this step
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    slots: torch.Tensor  # [T] int64: cache slot written by each new token
    query_start_loc: torch.Tensor  # [B + 1] int32: cumulative new-token counts (cu_seqlens_q)
    seq_lens: torch.Tensor  # [B] int32: tokens in the cache after this step (cache_len + new)
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0 (block 0 is reserved)
    query_lens_list: list[int]  # [B] new tokens of each sequence (diffs of query_start_loc)
    seq_lens_list: list[int]  # the same as seq_lens, as Python ints
    block_size: int
    # Filled once per step by the attention backend's `prepare` (e.g. gather indices, masks).
    prepared: dict[str, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_list)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_list)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        slots: list[int],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> "AttentionMetadata":
        """Turns per-sequence Python lists into the step's tensors."""
        max_blocks = max(len(t) for t in block_tables)
        padded = [t + [0] * (max_blocks - len(t)) for t in block_tables]
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        return cls(
            slots=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
            query_lens_list=list(query_lens),
            seq_lens_list=list(seq_lens),
            block_size=block_size,
        )


@dataclass
class ForwardContext:
    """Passed down the model for one step: metadata, the KV cache and the attention backend."""

    attn: AttentionMetadata
    kv_cache: "KVCache"  # noqa: F821 (shard.engine.kv_cache.KVCache)
    backend: "AttentionBackend"  # noqa: F821 (shard.attention.base.AttentionBackend)
    # Rotary cos/sin [T, rotary_dim // 2] for this step's positions, computed once per table
    # (shard.layers.rotary.RopeSpec) and shared by every layer that uses it.
    rotary: dict = field(default_factory=dict)
