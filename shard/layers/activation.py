"""Gated activation of Llama's MLP: silu(gate) * up, on the fused [gate | up] projection."""

from __future__ import annotations

import torch
from torch import nn

from shard.layers.fused import fused_ops
from shard.numerics import batch_invariant


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] -> [T, I]
    if x.device.type == "cpu" and batch_invariant():
        ops = fused_ops()
        if ops is not None and x.dim() == 2 and ops.supports(x):
            return ops.silu_mul(x)
    return silu_and_mul_reference(x)


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] -> [T, I]
    gate, up = x.chunk(2, dim=-1)
    return nn.functional.silu(gate) * up
