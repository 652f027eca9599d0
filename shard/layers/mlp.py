"""The gated MLP of every family we serve natively: down(act(gate(x)) * up(x)), gate and up
fused into one column-parallel product, down row-parallel."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shard.checkpoint.weights import Weights
from shard.layers.activation import check_activation, gated
from shard.layers.linear import ColumnParallelLinear, RowParallelLinear


@dataclass(frozen=True)
class MlpSpec:
    intermediate_size: int
    activation: str = "silu"  # config.json's hidden_act
    bias: bool = False  # mlp_bias
    fused_gate_up: bool = False  # the checkpoint holds one gate_up_proj (Phi-3)
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def __post_init__(self):
        check_activation(self.activation)


class MLP(nn.Module):
    def __init__(self, spec: MlpSpec, weights: Weights, prefix: str):
        super().__init__()
        self.activation = spec.activation
        gate, up, down = (f"{prefix}.{name}" for name in spec.names)
        if spec.fused_gate_up:
            size = spec.intermediate_size
            self.gate_up_proj = ColumnParallelLinear.load_fused(
                weights, f"{prefix}.gate_up_proj", [size, size]
            )
        else:
            self.gate_up_proj = ColumnParallelLinear.load(weights, [gate, up], bias=spec.bias)
        self.down_proj = RowParallelLinear.load(weights, down, bias=spec.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        return self.down_proj(gated(self.gate_up_proj(x), self.activation))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum, before the all-reduce (an MoE reduces once for all its
        experts)."""
        return self.down_proj.partial(gated(self.gate_up_proj(x), self.activation))
