"""Dense products in one fixed order per output (dense.c through ctypes), for batch-invariant
mode (shard/numerics.py): torch's GEMM changes its kernels and blocking with the number of
rows, so a row's output would depend on the other rows of its step.

Measured on 2 cores (AVX-512, float32): ~ torch's speed for decode steps (bound by reading
W), slower for long prompts (oneDNN's blocking is better; AMX bfloat16 much faster): the cost
of the guarantee where weights are dense. Quantized weights go to shard/quant/kernels.c.
The library is built like the quantized kernels (gcc, cached per CPU); the reference, and the
path where it cannot be built or the tensors do not suit it, is F.linear.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from shard.native import SIMD_HEADER, load_library

SOURCE = Path(__file__).with_name("dense.c")
DTYPES = (torch.float32, torch.bfloat16)
_ptr, _int = ctypes.c_void_p, ctypes.c_int


class DenseKernel:
    def __init__(self, lib: ctypes.CDLL):
        self._matmul = lib.dense_matmul
        self._matmul.restype = None
        # x, x_bf16, T, K, w, w_bf16, N, y, y_bf16
        self._matmul.argtypes = [_ptr, _int, _int, _int, _ptr, _int, _int, _ptr, _int]

    @staticmethod
    def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (
            x.is_cpu
            and weight.is_cpu
            and x.dim() == 2
            and x.dtype in DTYPES
            and weight.dtype in DTYPES
            and weight.is_contiguous()
        )

    def matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [T, K] @ weight [N, K]^T -> [T, N] in x's dtype."""
        x = x.contiguous()
        rows, k = x.shape
        y = torch.empty(rows, weight.shape[0], dtype=x.dtype)
        x_bf16 = int(x.dtype is torch.bfloat16)
        self._matmul(
            x.data_ptr(), x_bf16, rows, k, weight.data_ptr(), int(weight.dtype is torch.bfloat16),
            weight.shape[0], y.data_ptr(), x_bf16,
        )  # fmt: skip
        return y


@functools.cache
def dense_kernel() -> DenseKernel | None:
    """The process's kernel, built on first call; None where it cannot be built."""
    lib = load_library(SOURCE, (SIMD_HEADER,), fallback="dense products use F.linear")
    return None if lib is None else DenseKernel(lib)
