"""Owns the model, its paged KV cache and the attention backend; runs one forward step.

The runner turns a step's Python lists into tensors, lets the backend precompute what all
layers share, runs the model, and computes logits only for the rows that need them. On a GPU,
decode steps that fit a captured CUDA graph replay it instead (shard/engine/cuda_graphs.py)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from shard.attention.base import AttentionBackend
from shard.engine.cuda_graphs import GRAPH_BACKENDS, DecodeGraphs, StaticBatch
from shard.engine.forward_context import AttentionMetadata, ForwardContext
from shard.engine.kv_cache import KVCache

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
        kv_dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.quantize = quantize  # the resolved --quantize method, for Info and logs
        self.config = model.config
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype  # of the stored K/V (--kv-cache-dtype)
        self.kv_cache: KVCache | None = None
        self.graphs: DecodeGraphs | None = None  # captured once the cache is final
        self.allocate_cache(num_blocks=1)  # block 0 only, until Warmup sizes the real cache

    @property
    def window_size(self) -> int | None:
        """TGI's Info.window_size: the sliding window when every layer has the same one."""
        return getattr(self.model, "window_size", None)

    @property
    def num_kv_heads(self) -> int:
        return self.model.num_kv_heads

    def bytes_per_block(self) -> int:
        c = self.config
        return KVCache.bytes_per_block(
            c.num_layers, self.block_size, self.num_kv_heads, self.model.head_dim, self.kv_dtype
        )

    def allocate_cache(self, num_blocks: int) -> None:
        self.graphs = None  # they recorded the old cache's addresses
        self.kv_cache = None  # free the old cache before allocating the new one
        c = self.config
        self.kv_cache = KVCache(
            c.num_layers,
            num_blocks,
            self.block_size,
            self.num_kv_heads,
            self.model.head_dim,
            self.kv_dtype,
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
        if self.graphs is not None:
            logits = self.graphs.run(input_ids, positions, meta, logit_rows)
            if logits is not None:
                return logits
        ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)  # [T]
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)  # [T]
        self.backend.prepare(meta)
        ctx = ForwardContext(meta, self.kv_cache, self.backend)
        hidden = self.model(ids, pos, ctx)  # [T, hidden]
        if len(logit_rows) != len(input_ids):
            hidden = hidden[torch.tensor(logit_rows, dtype=torch.int64, device=self.device)]
        return self.model.compute_logits(hidden)  # [N, V]

    def graphs_unsupported(self, buckets: Sequence[int]) -> str | None:
        """Why decode steps cannot be captured here, or None."""
        if not buckets:
            return "--cuda-graphs 0"
        if self.device.type != "cuda":
            return f"the model runs on {self.device.type}"
        if self.backend.name not in GRAPH_BACKENDS:
            return f"the {self.backend.name} attention backend plans each step on the host"
        if getattr(self.model, "implementation", "native") == "transformers":
            return "the transformers backend runs transformers' model code eagerly"
        if getattr(self.model.rotary, "dynamic_factor", None) is not None:
            return "dynamic RoPE scaling rebuilds its table as sequences grow"
        return None

    @torch.inference_mode()
    def capture_graphs(self, buckets: Sequence[int], max_positions: int) -> None:
        """Captures a decode graph per bucket over the final KV cache, for sequences of up to
        `max_positions` tokens; logs why not where it cannot."""
        reason = self.graphs_unsupported(buckets)
        if reason is not None:
            log.info("decode steps run without CUDA graphs: %s", reason)
            return
        for rotary in getattr(self.model, "rotaries", {}).values():  # Gemma 3 has two
            rotary.ensure(max_positions)  # a table must not move after the capture
        max_blocks = math.ceil(max_positions / self.block_size)
        graphs = DecodeGraphs(buckets, max_blocks, self.block_size, self.device, self._replayable)
        graphs.capture_all()
        self.graphs = graphs

    def _replayable(self, static: StaticBatch) -> torch.Tensor:
        """The decode step a graph records: the model over a bucket's static tensors."""
        ctx = ForwardContext(static.metadata(), self.kv_cache, self.backend)
        hidden = self.model(static.input_ids, static.positions, ctx)  # [size, hidden]
        return self.model.compute_logits(hidden)  # [size, V]
