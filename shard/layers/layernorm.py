"""RMSNorm (Zhang & Sennrich, 2019), computed in float32 as Llama does."""

from __future__ import annotations

import torch
from torch import nn

from shard.weights import Weights


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [hidden]
        self.eps = eps

    @classmethod
    def load(cls, weights: Weights, prefix: str, eps: float) -> "RMSNorm":
        return cls(weights.get(f"{prefix}.weight"), eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
