"""The one attention interface every backend implements.

A step's new tokens have already been written to the cache (LayerKV.write) when a backend
runs, so each sequence attends to its first `seq_len` cached positions, reached through its
block table. Query token i of a sequence sits at position `seq_len - query_len + i` and sees
every position up to and including its own (causal, aligned at the end); in a layer with a
sliding window of W, only the last W of them (its own included). A soft-capped layer maps each
score s (after scaling) to cap * tanh(s / cap) before the softmax.
"""

from __future__ import annotations

from typing import Protocol

import torch

from shard.engine.forward_context import AttentionMetadata
from shard.engine.kv_cache import LayerKV


class AttentionBackend(Protocol):
    name: str

    def prepare(self, meta: AttentionMetadata) -> None:
        """Once per step, before the first layer: precompute what every layer shares."""

    def forward(
        self,
        q: torch.Tensor,
        cache: LayerKV,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """q: [T, num_heads, head_dim] -> [T, num_heads, head_dim]."""
