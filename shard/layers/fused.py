"""Fused RMSNorm and rotary embedding for CPU tensors (fused.c through ctypes).

At decode a decoder layer's element-wise work is tiny, and as PyTorch ops it is ~20 calls of a
few microseconds of dispatch each: RMSNorm took 23 us and rotary 16 us per call, ~2.4 ms of a
SmolLM2 step; fused, 8 and 5 us (most of it the ctypes call). SiLU-and-multiply stays in
PyTorch, but in batch-invariant mode (shard/numerics.py): torch's elementwise kernels split
their work by the tensor's size, computing some values in vector code and some in scalar code
whose exp differs in the last bit, so a row's values could depend on the step's rows. The
library is built like the quantized kernels (shard/quant/kernels.py: gcc, cached per CPU);
without a compiler, or for other devices and dtypes, the layers keep their PyTorch code, which
is also the reference the tests compare with.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from shard.native import SIMD_HEADER, load_library

SOURCE = Path(__file__).with_name("fused.c")
_ptr, _int, _long, _float = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
DTYPES = (torch.float32, torch.bfloat16)


class FusedOps:
    def __init__(self, lib: ctypes.CDLL):
        self._rms_norm = lib.fused_rms_norm
        self._rms_norm.argtypes = [_ptr, _long, _ptr, _ptr, _int, _int, _float, _int]
        self._rotary = lib.fused_rotary
        self._rotary.argtypes = [_ptr, _long, _ptr, _ptr, _ptr, _int, _int, _int, _int]
        self._gated_mul = lib.fused_gated_mul
        self._gated_mul.argtypes = [_ptr, _ptr, _int, _int, _int, _int]
        for fn in (self._rms_norm, self._rotary, self._gated_mul):
            fn.restype = None

    @staticmethod
    def supports(*tensors: torch.Tensor) -> bool:
        """CPU tensors of one dtype that fused.c handles, rows of contiguous elements."""
        dtype = tensors[0].dtype
        return dtype in DTYPES and all(
            t.is_cpu and t.dtype is dtype and t.stride(-1) == 1 for t in tensors
        )

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [T, H] (rows may be strided), weight [H] -> [T, H]."""
        y = torch.empty(x.shape, dtype=x.dtype)
        tokens, hidden = x.shape
        self._rms_norm(
            x.data_ptr(), x.stride(0), weight.data_ptr(), y.data_ptr(), tokens, hidden, eps,
            int(x.dtype is torch.bfloat16),
        )  # fmt: skip
        return y

    def rotary_(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotates x [T, heads, D] (heads contiguous, tokens may be strided) in place and
        returns it; cos, sin [T, D/2] contiguous."""
        tokens, heads, dim = x.shape
        ptr = x.data_ptr()
        self._rotary(
            ptr, x.stride(0), cos.data_ptr(), sin.data_ptr(), ptr, tokens, heads, dim,
            int(x.dtype is torch.bfloat16),
        )  # fmt: skip
        return x

    def gated_mul(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        """x [T, 2 I] = [gate | up] -> act(gate) * up [T, I]: silu, or gelu (tanh approximation)."""
        x = x.contiguous()
        tokens, width = x.shape
        y = torch.empty(tokens, width // 2, dtype=x.dtype)
        self._gated_mul(
            x.data_ptr(), y.data_ptr(), tokens, width // 2, int(x.dtype is torch.bfloat16),
            int(gelu),
        )  # fmt: skip
        return y


@functools.cache
def fused_ops() -> FusedOps | None:
    """The process's fused ops, built on first call; None where they cannot be built."""
    lib = load_library(SOURCE, (SIMD_HEADER,), fallback="using PyTorch ops")
    return None if lib is None else FusedOps(lib)
