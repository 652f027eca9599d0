"""Loads the C kernels of kernels.c and ggml_kernels.c for this CPU (shard/native.py: built at
install) and calls them through ctypes. Without them the reference (dequantize, then a dense
product) runs instead, with an error in the log and in /info: correct, several times slower.

In batch-invariant mode (the default, shard/numerics.py) every product reads the quantized
weight directly, whatever its rows: each row of x is quantized on its own and its sums run in
one order, so a row's output never depends on the other rows. Otherwise only products with at
most `direct_max_rows` rows of x (decode steps of few sequences; the library says how many its
kernels win at: 8 with AVX-512 VNNI, else 2) do: that is where quantization pays, since such
steps are bound by memory bandwidth. Larger products then use the dense GEMM (oneDNN, AMX where
the CPU has it), faster than our kernel's arithmetic once a weight is reused across rows
where the CPU has AMX: on the weight's dense copy where the shard keeps one, else dequantized
into a scratch matrix.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch
from torch.nn import functional as F

from shard.native import SIMD_HEADER, library_path, mark_unavailable
from shard.numerics import batch_invariant
from shard.quant.ggml import BlockMatrix, dequantize_blocks
from shard.quant.weight import QuantizedWeight, dequantize

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
BLOCK_SOURCE = Path(__file__).with_name("ggml_kernels.c")  # GGML block types (shard/quant/ggml.py)
INCLUDES = (SIMD_HEADER,)  # what kernels.c and ggml_kernels.c #include
KIND_CODES = {"q4": 4, "q8": 8}
_ptr, _int = ctypes.c_void_p, ctypes.c_int


class NativeKernels:
    name = "native"

    def __init__(self, path: Path, block_path: Path):
        lib = ctypes.CDLL(str(path))
        self._matmul = lib.quant_matmul
        self._matmul.restype = None
        # kind, x, x_bf16, T, K, qs, scale, min, N, group, y, y_bf16
        ints = [_int, _int, _int]
        self._matmul.argtypes = [_int, _ptr, *ints, _ptr, _ptr, _ptr, _int, _int, _ptr, _int]
        self._dequantize = lib.quant_dequantize
        self._dequantize.restype = None
        self._dequantize.argtypes = [_int, _ptr, _ptr, _ptr, _int, _int, _int, _ptr, _int]
        self._scratch: dict[torch.dtype, torch.Tensor] = {}
        lib.quant_direct_max_rows.restype = _int
        self.direct_max_rows = lib.quant_direct_max_rows()
        blocks = ctypes.CDLL(str(block_path))
        self._block_matmul = blocks.ggml_matmul
        self._block_matmul.restype = None
        # type, x, x_bf16, T, K, W, row_bytes, N, y, y_bf16, ldy
        _long = ctypes.c_long
        self._block_matmul.argtypes = [
            _int,
            _ptr,
            _int,
            _int,
            _int,
            _ptr,
            _long,
            _int,
            _ptr,
            _int,
            _long,
        ]
        self._block_rows = blocks.ggml_dequantize_rows
        self._block_rows.restype = None
        self._block_rows.argtypes = [_int, _ptr, _long, _int, _ptr, _int, _ptr]

    def matmul(self, x: torch.Tensor, w: QuantizedWeight | BlockMatrix) -> torch.Tensor:
        """x [T, K] float32 or bfloat16 -> [T, N] in x's dtype."""
        if isinstance(w, BlockMatrix):
            return self.matmul_blocks(x, w)
        if x.dtype not in (torch.float32, torch.bfloat16):
            return self.matmul(x.float(), w).to(x.dtype)
        rows = x.shape[0]
        if rows > self.direct_max_rows and not batch_invariant():
            dense = w.dense if w.dense is not None and w.dense.dtype == x.dtype else None
            if dense is None:  # in qs's column order, x's where there is no act-order
                dense = self.dequantize(w, x.dtype) if w.perm is None else dequantize(w, x.dtype)
            return F.linear(x, dense)
        x = x.contiguous() if w.perm is None else x.index_select(1, w.perm)  # qs's column order
        y = torch.empty(rows, w.out_features, dtype=x.dtype)
        is_bf16 = int(x.dtype == torch.bfloat16)
        self._matmul(
            KIND_CODES[w.kind], x.data_ptr(), is_bf16, rows, w.in_features, w.qs.data_ptr(),
            w.scale.data_ptr(), 0 if w.min is None else w.min.data_ptr(), w.out_features,
            w.group, y.data_ptr(), is_bf16,
        )  # fmt: skip
        return y

    def matmul_blocks(self, x: torch.Tensor, w: BlockMatrix) -> torch.Tensor:
        """x [T, K] float32 or bfloat16 -> [T, N] in x's dtype, from W's GGML blocks."""
        if x.dtype not in (torch.float32, torch.bfloat16):
            return self.matmul_blocks(x.float(), w).to(x.dtype)
        x = x.contiguous()
        rows, n = x.shape[0], w.out_features
        y = torch.empty(rows, n, dtype=x.dtype)
        is_bf16 = int(x.dtype == torch.bfloat16)
        self._block_matmul(
            int(w.ggml_type), x.data_ptr(), is_bf16, rows, w.in_features, w.blocks.data_ptr(),
            w.blocks.shape[1], n, y.data_ptr(), is_bf16, n,
        )  # fmt: skip
        return y

    def embedding(self, ids: torch.Tensor, w: QuantizedWeight | BlockMatrix, dtype: torch.dtype):
        """Rows `ids` [T] of the dequantized matrix: [T, K] in dtype (an embedding lookup)."""
        if isinstance(w, QuantizedWeight):
            return quantized_rows(w, ids, dtype)
        ids = ids.to(torch.int64).contiguous()
        out = torch.empty(ids.shape[0], w.in_features, dtype=torch.float32)
        self._block_rows(
            int(w.ggml_type), w.blocks.data_ptr(), w.blocks.shape[1], w.in_features,
            ids.data_ptr(), ids.shape[0], out.data_ptr(),
        )  # fmt: skip
        return out.to(dtype)

    def dequantize(self, w: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        """[N, K] in dtype, in a scratch buffer reused by the next call (one allocation per
        dtype and process: fresh multi-MB tensors each call would page-fault every time)."""
        numel = w.out_features * w.in_features
        scratch = self._scratch.get(dtype)
        if scratch is None or scratch.numel() < numel:
            scratch = self._scratch[dtype] = torch.empty(numel, dtype=dtype)
        out = scratch[:numel].view(w.shape)
        self._dequantize(
            KIND_CODES[w.kind], w.qs.data_ptr(), w.scale.data_ptr(),
            0 if w.min is None else w.min.data_ptr(), w.out_features, w.in_features, w.group,
            out.data_ptr(), int(dtype == torch.bfloat16),
        )  # fmt: skip
        return out


class ReferenceKernels:
    """Pure PyTorch: what the native kernels compute (but for the int8 rounding of x), used
    where they cannot be built. Not batch-invariant: the dense GEMM's order depends on the rows."""

    name = "reference"
    direct_max_rows = 0  # every product dequantizes first

    def matmul(self, x: torch.Tensor, w: QuantizedWeight | BlockMatrix) -> torch.Tensor:
        if isinstance(w, BlockMatrix):
            return F.linear(x, dequantize_blocks(w, x.dtype))
        return F.linear(x, dequantize(w, x.dtype))

    def embedding(self, ids: torch.Tensor, w: QuantizedWeight | BlockMatrix, dtype: torch.dtype):
        if isinstance(w, QuantizedWeight):
            return quantized_rows(w, ids, dtype)
        return dequantize_blocks(w.select_rows(ids.long()), dtype)

    def dequantize(self, w: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(w, dtype)


def quantized_rows(w: QuantizedWeight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of a q4/q8 matrix, dequantized (gathered first: only those rows)."""
    ids = ids.long()
    rows = QuantizedWeight(
        w.kind, w.qs[ids], w.scale[ids], None if w.min is None else w.min[ids], w.group,
        perm=w.perm,
    )  # fmt: skip
    return dequantize(rows, dtype)


_kernels: NativeKernels | ReferenceKernels | None = None


def get_kernels() -> NativeKernels | ReferenceKernels:
    """The process's kernels, loaded on first call (only CPU tensors reach them)."""
    global _kernels
    if _kernels is None:
        try:
            path = library_path(SOURCE, INCLUDES)
            _kernels = NativeKernels(path, library_path(BLOCK_SOURCE, INCLUDES))
        except (OSError, RuntimeError) as err:
            log.error("quantized kernels unavailable, using the slow reference: %s", err)
            mark_unavailable(SOURCE, f"the PyTorch reference runs: {err}")
            _kernels = ReferenceKernels()
    return _kernels
