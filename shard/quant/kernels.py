"""Builds the C kernels of kernels.c for this CPU on first use and calls them through ctypes.

The library is compiled with the system's C compiler (`$CC`, else gcc) and `-march=native`,
so AVX-512, AVX2 or plain code is chosen where it runs, and cached under the model cache
(keyed by the source, the flags, the compiler and the CPU) so later starts load it at once.
It links the OpenMP runtime torch already loaded (same soname), so both share one thread pool.
Without a compiler the reference (dequantize, then a dense product) runs instead, with a
warning: correct, several times slower.

Products with at most `direct_max_rows` rows of x (decode steps of few sequences; the library
says how many its kernels win at: 8 with AVX-512 VNNI, else 2) read the
quantized weight directly: that is where quantization pays, since such steps are bound by
memory bandwidth. Larger products use the dense GEMM (oneDNN, AMX where the CPU has it), many
times faster than our kernel's arithmetic once a weight is reused across rows: on the
weight's dense copy where the shard keeps one, else dequantized into a scratch matrix.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.nn import functional as F

from common.cpu import cpu_flags
from shard.convert import default_cache_dir
from shard.quant.weight import QuantizedWeight, dequantize

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
KIND_CODES = {"q4": 4, "q8": 8}
_ptr, _int = ctypes.c_void_p, ctypes.c_int


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "gcc"))


def _library_key(compiler: str, sources: list[Path]) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    cpu = platform.machine() + " " + " ".join(sorted(cpu_flags()))
    texts = [s.read_text() for s in sources]
    raw = "\n".join([*texts, " ".join(CFLAGS), version, cpu, torch.__version__])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def build_library(cache_dir: Path, source: Path = SOURCE, includes: tuple[Path, ...] = ()) -> Path:
    """The compiled library of `source` for this CPU, compiled once into cache_dir. `includes`
    are the files `source` #includes: a change to them builds a new library too."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (install gcc or set CC)")
    target = cache_dir / f"{source.stem}-{_library_key(compiler, [source, *includes])}.so"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *CFLAGS, str(source), "-o", tmp, "-lm"], capture_output=True, text=True
        )
        if done.returncode:
            raise RuntimeError(f"compiling {source.name} failed:\n{done.stderr}")
        os.replace(tmp, target)  # atomic: concurrent shards never load a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class NativeKernels:
    name = "native"

    def __init__(self, path: Path):
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

    def matmul(self, x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
        """x [T, K] float32 or bfloat16 -> [T, N] in x's dtype."""
        if x.dtype not in (torch.float32, torch.bfloat16):
            return self.matmul(x.float(), w).to(x.dtype)
        x = x.contiguous()
        rows = x.shape[0]
        if rows > self.direct_max_rows:
            dense = w.dense if w.dense is not None and w.dense.dtype == x.dtype else None
            return F.linear(x, dense if dense is not None else self.dequantize(w, x.dtype))
        y = torch.empty(rows, w.out_features, dtype=x.dtype)
        is_bf16 = int(x.dtype == torch.bfloat16)
        self._matmul(
            KIND_CODES[w.kind], x.data_ptr(), is_bf16, rows, w.in_features, w.qs.data_ptr(),
            w.scale.data_ptr(), 0 if w.min is None else w.min.data_ptr(), w.out_features,
            w.group, y.data_ptr(), is_bf16,
        )  # fmt: skip
        return y

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
    """Pure PyTorch: what the native kernels compute, used where they cannot be built."""

    name = "reference"
    direct_max_rows = 0  # every product dequantizes first

    def matmul(self, x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
        return F.linear(x, dequantize(w, x.dtype))

    def dequantize(self, w: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(w, dtype)


_kernels: NativeKernels | ReferenceKernels | None = None


def get_kernels(cache_dir: Path | None = None) -> NativeKernels | ReferenceKernels:
    """The process's kernels, built on first call (only CPU tensors reach them)."""
    global _kernels
    if _kernels is None:
        try:
            _kernels = NativeKernels(build_library(cache_dir or default_cache_dir() / "kernels"))
        except (OSError, RuntimeError) as err:
            log.warning("quantized kernels unavailable, using the slow reference: %s", err)
            _kernels = ReferenceKernels()
    return _kernels
