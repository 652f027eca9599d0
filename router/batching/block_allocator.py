"""The router owns the shards' KV cache blocks: which block belongs to which request.

Block 0 is reserved (health checks and padding) and never handed out. A request gets all the
blocks it can ever need when it joins a batch (prompt + max_new_tokens - 1 positions: the last
generated token is never fed back) and returns them when it leaves the router; the only code that
frees is `Batcher._remove` (router/batcher.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Allocation:
    blocks: tuple[int, ...]
    slots: tuple[
        int, ...
    ]  # slot of each position: blocks[p // block_size] * block_size + p % block_size


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"need at least 2 KV blocks (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def total_blocks(self) -> int:
        """Blocks requests can use (block 0 excluded)."""
        return self.num_blocks - 1

    def blocks_for(self, tokens: int) -> int:
        return (tokens + self.block_size - 1) // self.block_size

    def allocate(self, tokens: int) -> Allocation | None:
        """Blocks for `tokens` positions, or None when there are not enough free blocks."""
        needed = self.blocks_for(tokens)
        if needed > len(self._free):
            return None
        blocks = tuple(self._free.pop() for _ in range(needed))
        bs = self.block_size
        slots = tuple(b * bs + k for b in blocks for k in range(bs))[:tokens]
        return Allocation(blocks, slots)

    def free(self, allocation: Allocation) -> None:
        self._free.extend(reversed(allocation.blocks))
