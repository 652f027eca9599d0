"""RMSNorm (Zhang & Sennrich, 2019), computed in float32 as Llama does. Gemma's norms scale
by (1 + weight): the offset is added to the weight once, in float32, at load."""

from __future__ import annotations

import torch
from torch import nn

from shard.checkpoint.weights import Weights
from shard.layers import triton_invariant
from shard.layers.fused import fused_ops
from shard.numerics import batch_invariant


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [hidden]
        self.eps = eps

    @classmethod
    def load(cls, weights: Weights, prefix: str, eps: float, offset: float = 0.0) -> "RMSNorm":
        weight = weights.get(f"{prefix}.weight")
        if offset:
            weight = (weights.get_full(f"{prefix}.weight", torch.float32) + offset).to(weight)
        return cls(weight, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        if x.is_cuda and x.dim() == 2 and batch_invariant():
            return triton_invariant.rms_norm(x, self.weight, self.eps)
        ops = fused_ops() if x.device.type == "cpu" else None
        if ops is not None and x.dim() == 2 and ops.supports(x, self.weight):
            return ops.rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference: [T, hidden] -> [T, hidden]."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)
