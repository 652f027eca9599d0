"""A GGML block-quantized matrix, held as the GGUF file's own bytes, and its reference.

Q4_0, Q4_1 and Q8_0 matrices become QuantizedWeight (shard/quant/weight.py: the same bytes,
split into nibbles and scales), whose kernels the compiled decoder calls. Every other type that
ggml_kernels.c reads (Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) stays a BlockMatrix: each row
is its blocks, exactly as llama.cpp wrote them, multiplied without ever being made dense.

The reference is gguf-py's own dequantizer (`gguf.quants.dequantize`), which is llama.cpp's
numpy port; the C kernels are tested against it for every type.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

# The types the kernels of ggml_kernels.c read from their blocks.
BLOCK_TYPES = frozenset(
    GGMLQuantizationType[name] for name in ("Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
)


@dataclass(frozen=True)
class BlockMatrix:
    ggml_type: GGMLQuantizationType
    blocks: torch.Tensor  # [N, K / block_weights * block_bytes] uint8: each row's blocks
    in_features: int  # K

    def __post_init__(self):
        if self.ggml_type not in BLOCK_TYPES:
            raise ValueError(f"GGML type {self.ggml_type.name} has no block kernel")
        weights, nbytes = GGML_QUANT_SIZES[self.ggml_type]
        if (
            self.in_features % weights
            or self.blocks.shape[1] != self.in_features // weights * nbytes
        ):
            raise ValueError(
                f"{self.ggml_type.name} rows of {self.in_features} weights are not "
                f"{self.blocks.shape[1]} bytes"
            )

    @property
    def out_features(self) -> int:  # N
        return self.blocks.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def block_weights(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][0]

    def nbytes(self) -> int:
        return self.blocks.nbytes

    def rows(self, start: int, end: int) -> "BlockMatrix":
        """Output rows [start, end): a column-parallel shard."""
        return BlockMatrix(self.ggml_type, self.blocks[start:end].contiguous(), self.in_features)

    def columns(self, start: int, end: int) -> "BlockMatrix":
        """Input columns [start, end): a row-parallel shard; bounds must fall on blocks."""
        weights, nbytes = GGML_QUANT_SIZES[self.ggml_type]
        if start % weights or end % weights:
            raise ValueError(
                f"columns [{start}, {end}) do not fall on {self.ggml_type.name} blocks of {weights}"
            )
        part = self.blocks[:, start // weights * nbytes : end // weights * nbytes]
        return BlockMatrix(self.ggml_type, part.contiguous(), end - start)

    def select_rows(self, index: torch.Tensor) -> "BlockMatrix":
        return BlockMatrix(self.ggml_type, self.blocks[index], self.in_features)

    @staticmethod
    def cat_rows(parts: list["BlockMatrix"]) -> "BlockMatrix":
        first = parts[0]
        if any(p.ggml_type != first.ggml_type or p.in_features != first.in_features for p in parts):
            raise ValueError("cannot fuse matrices of different GGML types")
        return BlockMatrix(first.ggml_type, torch.cat([p.blocks for p in parts]), first.in_features)


def dequantize_blocks(w: BlockMatrix, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference: the dense [N, K] matrix, by gguf-py's dequantizer."""
    dense = gguf_dequantize(w.blocks.numpy(), w.ggml_type)  # [N, K] float32
    return torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)).to(dtype)
