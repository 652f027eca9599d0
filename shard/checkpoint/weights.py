"""Reads a Hugging Face checkpoint's safetensors files, whole or one rank's slice at a time.

Only safetensors are read: pickle checkpoints (`*.bin`, `*.pt`, `*.pth`) can run arbitrary
code when loaded, so a directory that only has those is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from shard.distributed import SINGLE, Dist
from shard.quant.ggml import BlockMatrix
from shard.quant.loaders import Quantizer
from shard.quant.weight import QuantizedWeight

# A linear layer's weight [out, in]: dense or quantized (q4/q8, or a GGUF file's blocks).
Matrix = torch.Tensor | QuantizedWeight | BlockMatrix

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class CheckpointError(ValueError):
    pass


def list_safetensors(model_dir: Path) -> dict[str, Path]:
    """Maps every tensor name to the file that holds it."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(
                f"{model_dir} holds only pickle checkpoints ({', '.join(pickles)}); they are "
                "refused because loading them can execute code. Convert them to safetensors."
            )
        raise CheckpointError(f"no *.safetensors file in {model_dir}")
    names: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            names.update({name: file for name in f.keys()})
    return names


class Weights:
    def __init__(
        self,
        model_dir: Path,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        dist: Dist = SINGLE,
        quantizer: Quantizer | None = None,
    ):
        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.device = torch.device(device)
        self.dist = dist
        self.quantizer = quantizer
        self.routing = list_safetensors(self.model_dir)
        self._handles: dict[Path, object] = {}

    def has(self, name: str) -> bool:
        return name in self.routing

    def _slice(self, name: str):
        if name not in self.routing:
            raise CheckpointError(f"tensor {name!r} not found in {self.model_dir}")
        file = self.routing[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file].get_slice(name)

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor, in the model dtype."""
        return self._cast(self._slice(name)[:])

    def get_sharded(self, name: str, dim: int) -> torch.Tensor:
        """This rank's contiguous part of `dim`, read straight from the file."""
        part = self._slice(name)
        size = part.get_shape()[dim]
        world, rank = self.dist.world_size, self.dist.rank
        if size % world:
            raise CheckpointError(
                f"{name}: dimension {dim} of size {size} cannot be split in {world}"
            )
        block = size // world
        index = [slice(None)] * len(part.get_shape())
        index[dim] = slice(rank * block, (rank + 1) * block)
        return self._cast(part[tuple(index)])

    def get_kv_heads(self, name: str, num_kv_heads: int) -> torch.Tensor:
        """This rank's KV heads of a k/v projection (rows grouped by head, dim 0): an even
        split when there are at least as many KV heads as ranks, otherwise the one head this
        rank's group of query heads reads (replicated over world_size / num_kv_heads ranks)."""
        world, rank = self.dist.world_size, self.dist.rank
        if num_kv_heads >= world:
            return self.get_sharded(name, dim=0)
        part = self._slice(name)
        rows = part.get_shape()[0] // num_kv_heads
        head = rank // (world // num_kv_heads)
        return self._cast(part[head * rows : (head + 1) * rows])

    def get_embedding(self, name: str) -> Matrix:
        """This rank's rows of the token embedding (quantized only where the file is: GGUF)."""
        return self.get_sharded(name, dim=0)

    def get_raw(self, name: str) -> torch.Tensor:
        """The whole tensor as stored (quantized checkpoints' packed integers and scales)."""
        return self._slice(name)[:]

    def get_full(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return self._slice(name)[:].to(dtype)

    def get_matrix(self, prefix: str, dim: int) -> Matrix:
        """This rank's part of the linear weight `prefix.weight`, split along `dim` (0: output
        rows, column-parallel; 1: input columns, row-parallel), quantized if the shard is."""
        quantized = self.quantizer.load(self, prefix) if self.quantizer else None
        if quantized is None:
            return self.get_sharded(f"{prefix}.weight", dim)
        world, rank = self.dist.world_size, self.dist.rank
        size = quantized.shape[dim]
        if size % world:
            raise CheckpointError(
                f"{prefix}: dimension {dim} of size {size} cannot be split in {world}"
            )
        block = size // world
        if dim == 0:
            return quantized.rows(rank * block, (rank + 1) * block)
        return quantized.columns(rank * block, (rank + 1) * block)

    def get_whole_matrix(self, prefix: str) -> Matrix:
        """The whole linear weight `prefix.weight`, quantized if the shard is (a fused
        checkpoint matrix, such as Phi-3's qkv_proj, that the caller splits by rows)."""
        quantized = self.quantizer.load(self, prefix) if self.quantizer else None
        return self.get(f"{prefix}.weight") if quantized is None else quantized

    def finish_matrix(self, matrix: Matrix) -> Matrix:
        """A layer's final weight (fused and sharded); quantized ones may keep a dense copy."""
        if isinstance(matrix, QuantizedWeight) and self.quantizer is not None:
            return self.quantizer.finish(matrix, self.dtype)
        return matrix

    def get_matrix_kv_heads(self, prefix: str, num_kv_heads: int) -> Matrix:
        """get_kv_heads for the linear weight `prefix.weight`, quantized if the shard is."""
        quantized = self.quantizer.load(self, prefix) if self.quantizer else None
        if quantized is None:
            return self.get_kv_heads(f"{prefix}.weight", num_kv_heads)
        world, rank = self.dist.world_size, self.dist.rank
        if num_kv_heads >= world:
            return self.get_matrix(prefix, dim=0)
        rows = quantized.out_features // num_kv_heads
        head = rank // (world // num_kv_heads)
        return quantized.rows(head * rows, (head + 1) * rows)

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=self.dtype)

    def close(self) -> None:
        self._handles.clear()
