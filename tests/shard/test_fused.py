"""The fused CPU ops (shard/layers/fused.c) against their PyTorch references: RMSNorm and
rotary in float32 and bfloat16, on strided rows, one row and many (the parallel path); rotary
(in place) is bit-exact, RMSNorm within a last-bit rounding."""

from __future__ import annotations

import pytest
import torch

from shard.layers.fused import FusedOps, fused_ops
from shard.layers.layernorm import rms_norm
from shard.layers.rotary import apply_rotary_reference


@pytest.fixture(scope="module")
def ops() -> FusedOps:
    built = fused_ops()
    assert built is not None, "gcc is part of the supported setup"
    return built


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype == torch.bfloat16:  # at most one bfloat16 step apart
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=8e-3)
    else:
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 37])
def test_rms_norm(ops, dtype, tokens):
    torch.manual_seed(tokens)
    wide = torch.randn(tokens, 200, dtype=dtype) * 3
    x = wide[:, 8:104]  # strided rows
    weight = torch.randn(96, dtype=dtype)
    close(ops.rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 37])
def test_rotary_is_bit_exact(ops, dtype, tokens):
    torch.manual_seed(tokens)
    qkv = torch.randn(tokens, 5 * 16 + 2 * 16, dtype=dtype)
    q = qkv[:, : 5 * 16].view(-1, 5, 16)  # a slice of the fused projection, as in a layer
    angles = torch.rand(tokens, 8) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    expected, kv = apply_rotary_reference(q, cos, sin), qkv[:, 5 * 16 :].clone()
    assert ops.rotary_(q, cos, sin) is q
    assert torch.equal(q, expected)
    assert torch.equal(qkv[:, 5 * 16 :], kv)  # k|v untouched


def test_other_dtypes_and_layouts_are_left_to_pytorch(ops):
    assert not ops.supports(torch.zeros(2, 4, dtype=torch.float16))
    assert not ops.supports(torch.zeros(4, 2).t())  # elements of a row not contiguous
    assert not ops.supports(torch.zeros(2, 4), torch.zeros(4, dtype=torch.bfloat16))
