"""Vocabulary-parallel token embedding and LM head.

Each rank holds rows [rank * V/world, (rank + 1) * V/world) of the embedding matrix. The
embedding looks up the ids it owns (zeros elsewhere) and all-reduces; the LM head computes its
slice of the logits and all-gathers them.
"""

from __future__ import annotations

import torch
from torch import nn

from shard.checkpoint.weights import Matrix, Weights
from shard.distributed import Dist
from shard.layers.linear import as_weight, linear
from shard.quant.kernels import get_kernels
from shard.quant.weight import QuantizedWeight


class VocabParallelEmbedding(nn.Module):
    """Dense, or quantized as a GGUF file stores it: a lookup then dequantizes only the rows
    it reads, and a tied LM head multiplies by the same blocks (no dense copy)."""

    def __init__(self, weight: Matrix, dist: Dist, dtype: torch.dtype):
        super().__init__()
        self.weight = as_weight(weight)  # [V / world, hidden]
        self.dtype = dtype
        self.dist = dist
        self.start = dist.rank * weight.shape[0]

    @classmethod
    def load(cls, weights: Weights, name: str) -> "VocabParallelEmbedding":
        return cls(weights.get_embedding(name), weights.dist, weights.dtype)

    @property
    def quantized(self) -> bool:
        return not isinstance(self.weight, torch.Tensor)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quantized:
            return get_kernels().embedding(ids, self.weight, self.dtype)
        return nn.functional.embedding(ids, self.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        if self.dist.world_size == 1:
            return self._lookup(ids)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = self._lookup(local.masked_fill(outside, 0))
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        return self.dist.all_reduce(out)


class ParallelLMHead(nn.Module):
    def __init__(self, weight: Matrix, dist: Dist):
        super().__init__()
        self.weight = as_weight(weight)  # [V / world, hidden]
        self.dist = dist

    @classmethod
    def load(cls, weights: Weights, prefix: str) -> "ParallelLMHead":
        return cls(weights.finish_matrix(weights.get_matrix(prefix, dim=0)), weights.dist)

    @classmethod
    def tied(
        cls, embedding: VocabParallelEmbedding, weights: Weights, prefix: str
    ) -> "ParallelLMHead":
        """The embedding matrix as the head: shared when dense or quantized in the file (GGUF),
        its own quantized copy when the shard quantizes a dense embedding."""
        if embedding.quantized:  # the same blocks (a dense copy only where the shard keeps them)
            return cls(weights.finish_matrix(embedding.weight), weights.dist)
        if weights.quantizer is not None:
            quantized = weights.get_matrix(prefix, dim=0)
            if isinstance(quantized, QuantizedWeight):
                return cls(weights.finish_matrix(quantized), weights.dist)
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head.weight = embedding.weight  # the same Parameter: tied, no copy
        head.dist = embedding.dist
        return head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, V] float32
        logits = linear(hidden, self.weight)
        return self.dist.all_gather_last_dim(logits).float()
