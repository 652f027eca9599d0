"""Owns the model, its paged KV cache and the attention backend; runs one forward step.

The runner turns a step's Python lists into tensors, lets the backend precompute what all
layers share, runs the model, and computes logits only for the rows that need them."""

from __future__ import annotations

import logging

import torch

from shard.attention.base import AttentionBackend
from shard.forward_context import AttentionMetadata, ForwardContext
from shard.kv_cache import KVCache

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model,
        backend: AttentionBackend,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        quantize: str = "none",
    ):
        self.model = model
        self.quantize = quantize  # the resolved --quantize method, for Info and logs
        self.config = model.config
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self.kv_cache: KVCache | None = None
        self.allocate_cache(num_blocks=1)  # block 0 only, until Warmup sizes the real cache

    @property
    def num_kv_heads(self) -> int:
        return self.model.layers[0].self_attn.num_kv_heads

    def bytes_per_block(self) -> int:
        c = self.config
        return KVCache.bytes_per_block(
            c.num_layers, self.block_size, self.num_kv_heads, c.head_dim, self.dtype
        )

    def allocate_cache(self, num_blocks: int) -> None:
        self.kv_cache = None  # free the old cache before allocating the new one
        c = self.config
        self.kv_cache = KVCache(
            c.num_layers,
            num_blocks,
            self.block_size,
            self.num_kv_heads,
            c.head_dim,
            self.dtype,
            self.device,
        )

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.num_blocks

    @torch.inference_mode()
    def forward(
        self,
        input_ids: list[int],
        positions: list[int],
        meta: AttentionMetadata,
        logit_rows: list[int],
    ) -> torch.Tensor:
        """Runs the step; returns float32 logits [len(logit_rows), vocab] for those token rows."""
        ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)  # [T]
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)  # [T]
        self.backend.prepare(meta)
        ctx = ForwardContext(meta, self.kv_cache, self.backend)
        hidden = self.model(ids, pos, ctx)  # [T, hidden]
        if len(logit_rows) != len(input_ids):
            hidden = hidden[torch.tensor(logit_rows, dtype=torch.int64, device=self.device)]
        return self.model.compute_logits(hidden)  # [N, V]
