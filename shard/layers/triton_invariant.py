"""Batch-invariant products and RMSNorm on CUDA, in Triton (`--batch-invariant true` on a GPU,
shard/numerics.py): cuBLAS picks its kernel, tiles and split-K from the shapes, so a row's
output depends on how many rows its step has; torch's reduction kernels likewise choose how
many threads share a row from the tensor's shape.

- `matmul`: y = x @ W^T, one fixed tile configuration whatever M (BLOCK_M x BLOCK_N outputs
  per program, the whole K in one program, BLOCK_K at a time in order): an output row is
  computed by the same instructions in the same order alone or among others (rows past M are
  masked loads of zeros in their own rows of the tile). float32 uses IEEE dots (no TF32).
- `rms_norm`: one program per row, the row's sum of squares one tl.sum over a fixed block.

The references are F.linear and shard/layers/layernorm.rms_norm; the tests run both kernels
under Triton's interpreter on the CPU, the device check compiled on a GPU. Not tuned: the fixed
tiles are the guarantee's cost, which vLLM's batch-invariant mode pays too.
"""

from __future__ import annotations

import functools

import torch

BLOCK_M, BLOCK_N, BLOCK_K = 32, 64, 64  # fixed whatever the shapes: the guarantee


@functools.cache
def _kernels():
    from shard.layers import triton_invariant_kernels

    return triton_invariant_kernels


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T -> [M, N] in x's dtype (float32 accumulation)."""
    import triton

    x, weight = x.contiguous(), weight.contiguous()
    (rows, k), n = x.shape, weight.shape[0]
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _kernels().matmul_kernel[grid](
        x, weight, y, rows, n, k, x.stride(0), weight.stride(0), y.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] -> [T, H], as shard/layers/layernorm.rms_norm."""
    x = x.contiguous()
    tokens, hidden = x.shape
    y = torch.empty_like(x)
    _kernels().rms_norm_kernel[(tokens,)](
        x, weight, y, hidden, eps, x.stride(0), y.stride(0), BLOCK_H=_next_pow2(hidden)
    )
    return y
