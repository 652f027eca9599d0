"""Linear layers that know how their weight is split across tensor-parallel ranks (Megatron):

ColumnParallelLinear  output features split: each rank computes its slice of the output.
                      Several checkpoint tensors can be fused into one matmul (q|k|v, gate|up).
RowParallelLinear     input features split: each rank computes a partial sum, all-reduced.

A weight is dense (an nn.Parameter), a QuantizedWeight or a BlockMatrix (shard/quant: q4/q8,
or a GGUF file's blocks), multiplied by the quantized kernels, or StackedRows where fused parts
are quantized differently (a Q4_K_M file's Q4_K q and k beside its Q6_K v); the layers do not
otherwise care which.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn

from shard.checkpoint.weights import Matrix, Weights
from shard.distributed import Dist
from shard.layers import triton_invariant
from shard.layers.dense import dense_kernel
from shard.numerics import batch_invariant
from shard.quant.ggml import BlockMatrix
from shard.quant.kernels import get_kernels
from shard.quant.weight import QuantizedWeight

QUANTIZED = (QuantizedWeight, BlockMatrix)


@dataclass(frozen=True)
class StackedRows:
    """Matrices of different kinds fused along their output rows: each multiplied on its own,
    the outputs side by side."""

    parts: tuple  # of dense tensors or quantized matrices, [rows_i, in] each

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(p.shape[0] for p in self.parts), self.parts[0].shape[1])


log = logging.getLogger(__name__)


def linear(x: torch.Tensor, weight: Matrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ weight[out, in]^T (+ bias). Dense weights on the CPU take our fixed-order
    kernel in batch-invariant mode (shard/layers/dense.py). Otherwise a single row in 16-bit on
    the CPU goes through matrix-vector product: oneDNN's GEMM reads 16-bit weights at ~2/3 of
    the memory bandwidth GEMV reaches, and one-token decode steps are bandwidth-bound."""
    if isinstance(weight, QUANTIZED):
        out = get_kernels().matmul(x, weight)
        return out if bias is None else out + bias
    if isinstance(weight, StackedRows):
        out = torch.cat([linear(x, part) for part in weight.parts], dim=-1)
        return out if bias is None else out + bias
    if x.device.type == "cpu" and batch_invariant():
        kernel = dense_kernel()
        if kernel is not None and kernel.supports(x, weight):
            out = kernel.matmul(x, weight)
            return out if bias is None else out + bias
        _not_invariant(f"{x.dtype} x {weight.dtype} products" if kernel else "no dense kernel")
    if x.is_cuda and batch_invariant():
        out = triton_invariant.matmul(x, weight)  # cuBLAS's choice of kernel follows the rows
        return out if bias is None else out + bias
    if x.shape[0] == 1 and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        out = torch.mv(weight, x[0]).unsqueeze(0)
        return out if bias is None else out + bias
    return nn.functional.linear(x, weight, bias)


@functools.cache
def _not_invariant(reason: str) -> None:
    log.warning("batch invariance is not kept for %s: they run torch's GEMM", reason)


def as_weight(weight: Matrix | StackedRows) -> nn.Parameter | QuantizedWeight | BlockMatrix:
    """A layer's weight, dense ones contiguous: a row-parallel rank's columns are a strided
    slice of the checkpoint's matrix, which the fixed-order kernel does not take."""
    if isinstance(weight, (*QUANTIZED, StackedRows)):
        return weight
    return nn.Parameter(weight.contiguous(), requires_grad=False)


def take_rows(matrix: Matrix, start: int, end: int) -> Matrix:
    if isinstance(matrix, QUANTIZED):
        return matrix.rows(start, end)
    return matrix[start:end]


def rank_rows(size: int, dist: Dist) -> tuple[int, int]:
    """This rank's even part of `size` rows."""
    if size % dist.world_size:
        raise ValueError(f"{size} rows cannot be split in {dist.world_size}")
    block = size // dist.world_size
    return dist.rank * block, (dist.rank + 1) * block


def cat_rows(parts: list[Matrix]) -> Matrix | StackedRows:
    """Fuses matrices along their output rows: into one where they are quantized alike."""
    first = parts[0]
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts, dim=0)
    if all(isinstance(p, QuantizedWeight) for p in parts):
        if all(first.fuses_with(p) for p in parts):
            return QuantizedWeight.cat_rows(parts)
    if all(isinstance(p, BlockMatrix) and p.ggml_type == first.ggml_type for p in parts):
        return BlockMatrix.cat_rows(parts)
    return StackedRows(tuple(parts))


class ColumnParallelLinear(nn.Module):
    def __init__(self, weight: Matrix, bias: torch.Tensor | None):
        super().__init__()
        self.weight = as_weight(weight)  # [out / world, in]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def load_qkv(
        cls, weights: Weights, prefix: str, num_kv_heads: int, bias: bool = False
    ) -> "ColumnParallelLinear":
        """q | k | v fused: query heads split evenly, KV heads split or replicated."""
        names = [f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"]
        parts = [weights.get_matrix(names[0], dim=0)]
        parts += [weights.get_matrix_kv_heads(n, num_kv_heads) for n in names[1:]]
        b = None
        if bias:
            b = torch.cat(
                [weights.get_sharded(f"{names[0]}.bias", dim=0)]
                + [weights.get_kv_heads(f"{n}.bias", num_kv_heads) for n in names[1:]]
            )
        return cls(weights.finish_matrix(cat_rows(parts)), b)

    @classmethod
    def load_fused_qkv(
        cls, weights: Weights, prefix: str, num_heads: int, num_kv_heads: int, head_dim: int
    ) -> "ColumnParallelLinear":
        """A checkpoint's fused [q | k | v] rows (Phi-3's qkv_proj), split as load_qkv does."""
        whole, dist = weights.get_whole_matrix(prefix), weights.dist
        q_start, q_end = rank_rows(num_heads * head_dim, dist)
        parts = [take_rows(whole, q_start, q_end)]
        for base in (num_heads * head_dim, (num_heads + num_kv_heads) * head_dim):
            if num_kv_heads >= dist.world_size:
                start, end = rank_rows(num_kv_heads * head_dim, dist)
            else:  # this rank's group reads one replicated KV head
                head = dist.rank // (dist.world_size // num_kv_heads)
                start, end = head * head_dim, (head + 1) * head_dim
            parts.append(take_rows(whole, base + start, base + end))
        return cls(weights.finish_matrix(cat_rows(parts)), None)

    @classmethod
    def load_fused(cls, weights: Weights, prefix: str, sizes: list[int]) -> "ColumnParallelLinear":
        """A checkpoint matrix that fuses parts of `sizes` rows (Phi-3's gate_up_proj): each
        part split across the ranks, this rank's parts fused again."""
        whole, parts, base = weights.get_whole_matrix(prefix), [], 0
        for size in sizes:
            start, end = rank_rows(size, weights.dist)
            parts.append(take_rows(whole, base + start, base + end))
            base += size
        return cls(weights.finish_matrix(cat_rows(parts)), None)

    @classmethod
    def load(
        cls, weights: Weights, prefixes: list[str], bias: bool = False
    ) -> "ColumnParallelLinear":
        """Fuses `prefix.weight` of every prefix along the output dimension, each one sharded."""
        weight = weights.finish_matrix(cat_rows([weights.get_matrix(p, dim=0) for p in prefixes]))
        b = torch.cat([weights.get_sharded(f"{p}.bias", dim=0) for p in prefixes]) if bias else None
        return cls(weight, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)  # [T, in] -> [T, out / world]


class RowParallelLinear(nn.Module):
    def __init__(self, weight: Matrix, bias: torch.Tensor | None, dist: Dist):
        super().__init__()
        self.weight = as_weight(weight)  # [out, in / world]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.dist = dist

    @classmethod
    def load(cls, weights: Weights, prefix: str, bias: bool = False) -> "RowParallelLinear":
        weight = weights.finish_matrix(weights.get_matrix(prefix, dim=1))
        b = weights.get(f"{prefix}.bias") if bias else None
        return cls(weight, b, weights.dist)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """[T, in / world] -> [T, out]: this rank's partial sum (without the bias)."""
        return linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dist.all_reduce(self.partial(x))
        return out if self.bias is None else out + self.bias
