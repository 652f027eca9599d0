"""Gated activation of Llama's MLP: silu(gate) * up, on the fused [gate | up] projection."""

from __future__ import annotations

import torch
from torch import nn


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] -> [T, I]
    gate, up = x.chunk(2, dim=-1)
    return nn.functional.silu(gate) * up
