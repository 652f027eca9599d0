"""Reads a GGUF file's tensors straight from the file, one at a time, as the model asks for them.

A GGUF model directory (shard/checkpoint/convert.py: `prepare_gguf_dir`) holds config.json and
the tokenizer beside `model.gguf`, a link to the file; no tensor is copied there. Each tensor is
read with one positioned read into its own buffer: the file is never mapped whole, so the
shard's memory is the model it serves plus the one tensor being read, and nothing is made
dense unless asked for.

What each tensor becomes, with the shard's quantization `gguf` (the default for a GGUF model):
  Q4_0, Q4_1, Q8_0                  QuantizedWeight (the same bytes, split into nibbles/int8 and
                                    their float16 scales; the compiled decoder runs them)
  Q5_0, Q5_1, Q2_K ... Q6_K         BlockMatrix: the blocks as stored (shard/quant/ggml.py)
  F32, F16, BF16                    dense, in the model dtype
  any other type                    dense, dequantized by gguf-py, with a warning
With `--quantize none` every matrix is dequantized to the model dtype. The token embedding
stays quantized too: a lookup dequantizes the rows it reads, and a tied LM head multiplies by
the same blocks.

llama.cpp permutes the rows of Q and K within each head for its rotary layout; the rows are
put back in Hugging Face's order here (shard/checkpoint/convert.py: unpermute_rope_rows), on
the blocks themselves, since a row is whole blocks.
"""

from __future__ import annotations

import json
import logging
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from shard.checkpoint.convert import ROPE_FREQS, hf_tensor_name, unpermute_rope_rows
from shard.checkpoint.weights import CheckpointError, Matrix, Weights
from shard.distributed import SINGLE, Dist
from shard.quant.ggml import BLOCK_TYPES, BlockMatrix
from shard.quant.loaders import GGUF_LINK, Quantizer
from shard.quant.weight import QuantizedWeight

log = logging.getLogger(__name__)

DENSE_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
LEGACY_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # the types QuantizedWeight holds


def is_gguf_dir(model_dir: Path) -> bool:
    return (Path(model_dir) / GGUF_LINK).exists()


@dataclass(frozen=True)
class TensorEntry:
    """Where a tensor lies in a GGUF file. `shape` as GGUF lists it (innermost first)."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data_offset: int  # from the start of the file
    n_bytes: int


# GGUF metadata value types: struct formats of the fixed-size ones; 8 string, 9 array.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}


def read_tensor_index(path: Path) -> dict[str, TensorEntry]:
    """The tensors of a GGUF file, from its header alone (GGUF v2/v3, little-endian).

    gguf-py's GGUFReader builds a numpy view of every metadata value: 9.4 s for a Llama 3
    file (128k vocabulary strings, 300k fields) before one tensor is read; the loader needs
    only the tensor table, so the metadata is skipped here in a fraction of a second."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", m, 0)
        if magic != b"GGUF" or version < 2:
            raise CheckpointError(f"{path} is not a GGUF file of version 2 or later")
        at, alignment = 24, 32

        def string(at: int) -> tuple[str, int]:
            (size,) = struct.unpack_from("<Q", m, at)
            return m[at + 8 : at + 8 + size].decode("utf-8", "replace"), at + 8 + size

        def skip(kind: int, at: int) -> int:
            if kind in _SCALARS:
                return at + struct.calcsize(_SCALARS[kind])
            if kind == 8:
                return at + 8 + struct.unpack_from("<Q", m, at)[0]
            if kind == 9:
                inner, count = struct.unpack_from("<IQ", m, at)
                at += 12
                if inner in _SCALARS:
                    return at + count * struct.calcsize(_SCALARS[inner])
                for _ in range(count):
                    at = skip(inner, at)
                return at
            raise CheckpointError(f"{path}: unknown GGUF metadata type {kind}")

        for _ in range(n_kv):
            key, at = string(at)
            (kind,) = struct.unpack_from("<I", m, at)
            if key == "general.alignment":
                (alignment,) = struct.unpack_from("<I", m, at + 4)
            at = skip(kind, at + 4)
        infos = []
        for _ in range(n_tensors):
            name, at = string(at)
            (n_dims,) = struct.unpack_from("<I", m, at)
            shape = struct.unpack_from(f"<{n_dims}Q", m, at + 4)
            kind, offset = struct.unpack_from("<IQ", m, at + 4 + 8 * n_dims)
            at += 4 + 8 * n_dims + 12
            infos.append((name, GGMLQuantizationType(kind), tuple(shape), offset))
    data_start = -(-at // alignment) * alignment
    index = {}
    for name, kind, shape, offset in infos:
        weights, nbytes = GGML_QUANT_SIZES[kind]
        count = int(np.prod(shape)) if shape else 1
        index[name] = TensorEntry(name, kind, shape, data_start + offset, count // weights * nbytes)
    return index


class _DenseSlice:
    """What Weights reads a tensor through (safetensors' slice interface), for a dense tensor."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def __getitem__(self, index):
        return self.tensor[index]


class GGUFWeights(Weights):
    def __init__(
        self,
        model_dir: Path,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        dist: Dist = SINGLE,
        quantizer: Quantizer | None = None,
    ):
        self.model_dir = Path(model_dir)
        self.dtype, self.device, self.dist, self.quantizer = (
            dtype,
            torch.device(device),
            dist,
            quantizer,
        )
        self.path = (self.model_dir / GGUF_LINK).resolve()
        index = read_tensor_index(self.path)  # the header; each tensor is read when asked for
        self.tensors = {hf_tensor_name(t.name): t for t in index.values() if t.name != ROPE_FREQS}
        self.routing = {name: self.path for name in self.tensors}
        config = json.loads((self.model_dir / "config.json").read_text())
        # the (query, KV) head counts, to restore Q and K's row order
        self.heads = (config["num_attention_heads"], config["num_key_value_heads"])
        self._file = open(self.path, "rb")
        self._warned: set[str] = set()

    def _read(self, name: str) -> np.ndarray:
        """The tensor's bytes as [rows, row bytes] uint8 (GGUF lists dims innermost first), rows
        in Hugging Face's order."""
        t = self.tensors[name]
        raw = np.empty(int(t.n_bytes), dtype=np.uint8)
        self._file.seek(int(t.data_offset))
        if self._file.readinto(memoryview(raw)) != raw.nbytes:
            raise CheckpointError(f"{self.path} ends inside tensor {t.name}")
        rows = int(np.prod([int(d) for d in t.shape[1:]])) if len(t.shape) > 1 else 1
        raw = raw.reshape(rows, -1)
        if ".self_attn.q_proj." in name:
            raw = unpermute_rope_rows(raw, self.heads[0])
        elif ".self_attn.k_proj." in name:
            raw = unpermute_rope_rows(raw, self.heads[1])
        return np.ascontiguousarray(raw)

    def _dense(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape))
        raw = self._read(name)
        if t.tensor_type not in DENSE_TYPES and t.tensor_type.name not in self._warned:
            self._warned.add(t.tensor_type.name)
            if not (self.quantizer is None or t.tensor_type.name in LEGACY_BYTES):
                log.warning(
                    "GGUF type %s has no kernel here: its matrices are served dense",
                    t.tensor_type.name,
                )
        if t.tensor_type == GGMLQuantizationType.BF16:
            return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).reshape(shape)
        dense = dequantize(raw.reshape(-1) if len(shape) == 1 else raw, t.tensor_type)
        return torch.from_numpy(np.ascontiguousarray(dense)).reshape(shape)

    def _slice(self, name: str):
        if name not in self.tensors:
            raise CheckpointError(f"tensor {name!r} not found in {self.path}")
        return _DenseSlice(self._dense(name))

    def file_matrix(self, prefix: str) -> QuantizedWeight | BlockMatrix | None:
        """`prefix.weight` in its own quantization, or None where it is dense or has no kernel."""
        name = f"{prefix}.weight"
        t = self.tensors.get(name)
        if t is None or len(t.shape) != 2:
            return None
        k = int(t.shape[0])
        if t.tensor_type in BLOCK_TYPES:
            return BlockMatrix(t.tensor_type, torch.from_numpy(self._read(name)), k)
        if t.tensor_type.name in LEGACY_BYTES:
            return legacy_matrix(t.tensor_type.name, self._read(name))
        return None

    def get_embedding(self, name: str) -> Matrix:
        """This rank's rows of the token embedding, quantized as the file stores it."""
        quantized = self.quantizer is not None and self.file_matrix(name.removesuffix(".weight"))
        if quantized:
            return self.get_matrix(name.removesuffix(".weight"), dim=0)
        return self.get_sharded(name, dim=0)

    def close(self) -> None:
        self._file.close()


def legacy_matrix(kind: str, raw: np.ndarray) -> QuantizedWeight:
    """A Q4_0/Q4_1/Q8_0 matrix [rows, row bytes] as QuantizedWeight (its bytes rearranged)."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, LEGACY_BYTES[kind])  # [rows, K / 32, block bytes]
    scale = torch.from_numpy(np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0])
    if kind == "Q8_0":
        qs = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows, -1)
        return QuantizedWeight("q8", torch.from_numpy(qs), scale, None, 32)
    if kind == "Q4_1":  # w = d * q + m
        low = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0])
        qs = blocks[..., 4:]
    else:  # Q4_0: w = d * (q - 8)
        low = scale * -8.0  # exact: a power of two
        qs = blocks[..., 2:]
    qs = torch.from_numpy(np.ascontiguousarray(qs).reshape(rows, -1))
    return QuantizedWeight("q4", qs, scale, low, 32)
