"""Gated activations of the families' MLPs, on the fused [gate | up] projection:
act(gate) * up, with act SiLU (Llama, Qwen, Mistral, Phi-3, ...) or GELU's tanh approximation
(Gemma). In batch-invariant mode the CPU takes fused.c's vector code, which computes every
value alike: torch's elementwise kernels mix vector and scalar code depending on the size."""

from __future__ import annotations

import torch
from torch import nn

from shard.layers.fused import fused_ops
from shard.numerics import batch_invariant

# config.json's hidden_act -> (the torch reference, fused.c's code for it: gelu or not)
ACTIVATIONS = {
    "silu": (nn.functional.silu, False),
    "swish": (nn.functional.silu, False),
    "gelu_pytorch_tanh": (lambda x: nn.functional.gelu(x, approximate="tanh"), True),
    "gelu_tanh": (lambda x: nn.functional.gelu(x, approximate="tanh"), True),
}


def check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(
            f"hidden_act {name!r} is not supported natively ({', '.join(sorted(ACTIVATIONS))})"
        )


def gated(x: torch.Tensor, activation: str = "silu") -> torch.Tensor:  # [T, 2 * I] -> [T, I]
    if x.device.type == "cpu" and batch_invariant():
        ops = fused_ops()
        if ops is not None and x.dim() == 2 and ops.supports(x):
            return ops.gated_mul(x, gelu=ACTIVATIONS[activation][1])
    return gated_reference(x, activation)


def gated_reference(x: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return ACTIVATIONS[activation][0](gate) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] -> [T, I]
    return gated(x, "silu")


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] -> [T, I]
    return gated_reference(x, "silu")
