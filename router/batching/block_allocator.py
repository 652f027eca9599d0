"""The router owns the shards' KV cache blocks: which block belongs to which request.

Block 0 is reserved (health checks and padding) and never handed out. A request gets all the
blocks it can ever need when it joins a batch (prompt + max_new_tokens - 1 positions: the last
generated token is never fed back) and returns them when it leaves the router; the only code that
frees is `Batcher._remove` (router/batching/batcher.py).

Prefix caching (TGI v3's `PREFIX_CACHING`, vLLM's automatic prefix caching): a full block whose
K/V the shards have written is *indexed* by the tokens it holds and the block before it, so its
key names one exact token prefix. A later request whose prompt starts with those tokens gets the
same blocks first in its block table and `cache_len` = their tokens: the shards skip that part of
the prefill. Blocks are reference-counted, and each block is in exactly one state:

    free     on the free list
    used     held by one or more requests (ref > 0), indexed or not
    cached   indexed, held by nobody: it still counts as free, and when the free list runs out
             the least recently used cached block is evicted (with the blocks indexed under it,
             which nobody can reach any more)

Keys hold the token ids themselves, not a hash of them, so two different prefixes can never
share a block (vLLM's CVE-2025-25183 came from colliding hashes).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

ROOT = 0  # the parent of a prompt's first block; block 0 is never indexed, so it names no block

BlockKey = tuple[int, tuple[int, ...]]  # (previous block or ROOT, the block's token ids)


@dataclass(frozen=True)
class Allocation:
    blocks: tuple[int, ...]
    slots: tuple[
        int, ...
    ]  # slot of each position: blocks[p // block_size] * block_size + p % block_size
    cache_len: int = 0  # prompt tokens whose K/V the first blocks already hold


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        if num_blocks < 2:
            raise ValueError(f"need at least 2 KV blocks (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks
        self._index: dict[BlockKey, int] = {}  # key -> block holding those tokens' K/V
        self._key_of: dict[int, BlockKey] = {}  # indexed block -> its key
        self._children: dict[int, set[int]] = {}  # block -> indexed blocks keyed under it
        self._cached: OrderedDict[int, None] = OrderedDict()  # ref-0 indexed blocks, LRU first

    @property
    def free_blocks(self) -> int:
        """Blocks no request holds: free or cached."""
        return len(self._free) + len(self._cached)

    @property
    def cached_blocks(self) -> int:
        """Blocks no request holds that keep K/V a later prompt may reuse."""
        return len(self._cached)

    @property
    def total_blocks(self) -> int:
        """Blocks requests can use (block 0 excluded)."""
        return self.num_blocks - 1

    def blocks_for(self, tokens: int) -> int:
        return (tokens + self.block_size - 1) // self.block_size

    # ---- lookup and allocation ---------------------------------------------------------------

    def cached_prefix(self, prompt: Sequence[int] | None) -> int:
        """Tokens at the start of `prompt` whose K/V cached blocks hold (at most all but one
        prompt token: the last one must be computed to give the next token's logits)."""
        return len(self._lookup(prompt)) * self.block_size

    def allocate(self, tokens: int, prompt: Sequence[int] | None = None) -> Allocation | None:
        """Blocks for `tokens` positions, or None when there are not enough free blocks. With
        `prompt` (and prefix caching on) the blocks already holding its start come first."""
        hits = self._lookup(prompt)
        needed = self.blocks_for(tokens) - len(hits)
        pinned = sum(1 for b in hits if b in self._cached)  # cached now, used once pinned
        if needed > self.free_blocks - pinned:
            return None
        for block in hits:
            self._hold(block)
        blocks = (*hits, *(self._take() for _ in range(max(needed, 0))))
        for block in blocks[len(hits) :]:
            self._refs[block] = 1
        bs = self.block_size
        slots = tuple(b * bs + k for b in blocks for k in range(bs))[:tokens]
        return Allocation(blocks, slots, cache_len=len(hits) * bs)

    def free(self, allocation: Allocation) -> None:
        """Gives the blocks back; indexed ones stay cached, the tail of the sequence first in
        line for eviction."""
        for block in reversed(allocation.blocks):
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._key_of:
                self._cached[block] = None
            else:
                self._free.append(block)

    def commit(self, allocation: Allocation, tokens: Sequence[int]) -> None:
        """The shards have written the K/V of `tokens` (positions 0..len-1) into the
        allocation's blocks: index its full blocks so that later prompts can reuse them."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        parent = ROOT
        for i, block in enumerate(allocation.blocks[: len(tokens) // bs]):
            key = (parent, tuple(tokens[i * bs : (i + 1) * bs]))
            if self._key_of.get(block) != key:
                if key in self._index or block in self._key_of:
                    return  # another block already holds this prefix: it stays the one indexed
                self._index[key] = block
                self._key_of[block] = key
                self._children.setdefault(parent, set()).add(block)
            parent = block

    # ---- internals ---------------------------------------------------------------------------

    def _lookup(self, prompt: Sequence[int] | None) -> list[int]:
        """The indexed blocks that hold the start of `prompt`, in order."""
        if not self.prefix_caching or not prompt:
            return []
        bs = self.block_size
        hits: list[int] = []
        parent = ROOT
        for i in range((len(prompt) - 1) // bs):
            block = self._index.get((parent, tuple(prompt[i * bs : (i + 1) * bs])))
            if block is None:
                break
            hits.append(block)
            parent = block
        return hits

    def _hold(self, block: int) -> None:
        self._refs[block] += 1
        self._cached.pop(block, None)

    def _take(self) -> int:
        """A block for new K/V: a free one, else the least recently used cached one."""
        if not self._free:
            self._evict(next(iter(self._cached)))
        return self._free.pop()

    def _evict(self, block: int) -> None:
        """Forgets the block's key and, recursively, every block indexed under it. A block
        nobody holds returns to the free list (a held one cannot occur: a request that holds a
        block holds every block before it)."""
        key = self._key_of.pop(block)
        del self._index[key]
        self._children.get(key[0], set()).discard(block)
        for child in self._children.pop(block, set()):
            self._evict(child)
        if self._refs[block] == 0:
            del self._cached[block]
            self._free.append(block)
