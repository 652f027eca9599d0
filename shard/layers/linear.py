"""Linear layers that know how their weight is split across tensor-parallel ranks (Megatron):

ColumnParallelLinear  output features split: each rank computes its slice of the output.
                      Several checkpoint tensors can be fused into one matmul (q|k|v, gate|up).
RowParallelLinear     input features split: each rank computes a partial sum, all-reduced.
"""

from __future__ import annotations

import torch
from torch import nn

from shard.distributed import Dist
from shard.weights import Weights


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ weight[out, in]^T (+ bias). A single row in 16-bit on the CPU goes through
    matrix-vector product: oneDNN's GEMM reads 16-bit weights at ~2/3 of the memory bandwidth
    GEMV reaches, and one-token decode steps are bandwidth-bound."""
    if x.shape[0] == 1 and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        out = torch.mv(weight, x[0]).unsqueeze(0)
        return out if bias is None else out + bias
    return nn.functional.linear(x, weight, bias)


class ColumnParallelLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out / world, in]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def load_qkv(
        cls, weights: Weights, prefix: str, num_kv_heads: int, bias: bool = False
    ) -> "ColumnParallelLinear":
        """q | k | v fused: query heads split evenly, KV heads split or replicated."""
        names = [f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"]
        parts = [weights.get_sharded(f"{names[0]}.weight", dim=0)]
        parts += [weights.get_kv_heads(f"{n}.weight", num_kv_heads) for n in names[1:]]
        b = None
        if bias:
            b = torch.cat(
                [weights.get_sharded(f"{names[0]}.bias", dim=0)]
                + [weights.get_kv_heads(f"{n}.bias", num_kv_heads) for n in names[1:]]
            )
        return cls(torch.cat(parts, dim=0), b)

    @classmethod
    def load(
        cls, weights: Weights, prefixes: list[str], bias: bool = False
    ) -> "ColumnParallelLinear":
        """Fuses `prefix.weight` of every prefix along the output dimension, each one sharded."""
        weight = torch.cat([weights.get_sharded(f"{p}.weight", dim=0) for p in prefixes], dim=0)
        b = torch.cat([weights.get_sharded(f"{p}.bias", dim=0) for p in prefixes]) if bias else None
        return cls(weight, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)  # [T, in] -> [T, out / world]


class RowParallelLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dist: Dist):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in / world]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.dist = dist

    @classmethod
    def load(cls, weights: Weights, prefix: str, bias: bool = False) -> "RowParallelLinear":
        weight = weights.get_sharded(f"{prefix}.weight", dim=1)
        b = weights.get(f"{prefix}.bias") if bias else None
        return cls(weight, b, weights.dist)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight)  # [T, in / world] -> [T, out], partial sum
        out = self.dist.all_reduce(out)
        return out if self.bias is None else out + self.bias
