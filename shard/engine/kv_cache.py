"""The paged KV cache: for each layer, one K and one V tensor of fixed-size blocks.

Shapes: key/value [num_blocks, block_size, num_kv_heads, head_dim]. The router owns which
blocks belong to which request; the shard only writes K/V at the slots it is given and reads
them back through block tables. Block 0 is reserved (health checks, padding) and never
handed to a request.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerKV:
    key: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    value: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Stores the new tokens' K/V. k, v: [T, num_kv_heads, head_dim]; slots: [T]."""
        num_kv_heads, head_dim = self.key.shape[2], self.key.shape[3]
        self.key.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k.to(self.key.dtype))
        self.value.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v.to(self.value.dtype))


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.layers = [
            LayerKV(
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(num_layers)
        ]

    def __getitem__(self, layer: int) -> LayerKV:
        return self.layers[layer]

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """K and V, every layer, for one block."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize
