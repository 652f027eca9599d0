"""The FIFO of entries waiting to run, and `next_batch`: which of them join the next
Prefill under the token, block and size budgets (TGI v3's rules).

With chunked prefill (the shards' `support_chunking`), the last entry that overflows the
prefill budget still joins with `chunk_len` = what is left of the budget; without it, the
entry waits for the next batch. With prefix caching, the prompt tokens already in cached blocks
(`cache_len`) cost no prefill budget; requests that want prompt logprobs (TGI's
`decoder_input_details`) never read the cache, since the skipped positions would have none.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

from router.batching.block_allocator import BlockAllocator
from router.batching.entry import Entry
from router.batching.events import ErrorEvent
from router.batching.hooks import Hooks
from router.errors import GenerationError

log = logging.getLogger(__name__)


@dataclass
class NextBatch:
    entries: list[Entry]
    prefill_tokens: int


class Queue:
    def __init__(self, allocator: BlockAllocator, support_chunking: bool):
        self.allocator = allocator
        self.support_chunking = support_chunking
        self._entries: deque[Entry] = deque()
        self.notify = asyncio.Event()
        self.dropped = 0  # entries whose client left while they waited
        self.metrics: Hooks = Hooks()  # router.metrics.Metrics once watched

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, entry: Entry) -> None:
        """Queues the entry; one that could never get its blocks fails now instead of
        blocking the head of the queue forever."""
        needed = self.allocator.blocks_for(self._tokens(entry))
        if needed > self.allocator.total_blocks:
            message = (
                f"the request needs {needed} KV cache blocks and the cache has "
                f"{self.allocator.total_blocks}"
            )
            entry.send(ErrorEvent(GenerationError(message)))
            return
        self._entries.append(entry)
        self.notify.set()

    def next_batch(
        self, min_size: int | None, max_size: int | None, prefill_budget: int, token_budget: int
    ) -> NextBatch | None:
        """Pops the entries of the next batch and gives them their blocks. Entries are planned
        first and allocated only if the batch happens, so nothing is ever given back here."""
        self.drain_cancelled()
        if not self._entries or max_size == 0 or prefill_budget <= 0 or token_budget <= 0:
            return None
        plan = self._plan(max_size, prefill_budget, token_budget)
        if not plan or (min_size and len(plan) < min_size):
            return None
        chosen = []
        for entry, take in plan:
            self._entries.popleft()
            entry.allocation = self.allocator.allocate(self._tokens(entry), _cache_key(entry))
            # An earlier entry of this batch may have evicted blocks the plan counted as cached:
            # the entry then prefills `take` tokens now and the rest in the next steps.
            if entry.allocation.cache_len:
                self.metrics.prefix_cache_hit(entry.allocation.cache_len)
            rest = entry.request.input_length - entry.allocation.cache_len
            entry.chunk_len = take if self.support_chunking and take < rest else None
            chosen.append(entry)
        self.metrics.batch_next(len(chosen))
        return NextBatch(chosen, sum(take for _, take in plan))

    @staticmethod
    def _tokens(entry: Entry) -> int:
        """KV positions the entry may fill: its prompt and every generated token but the last."""
        return entry.request.input_length + entry.request.stopping.max_new_tokens - 1

    def _plan(
        self, max_size: int | None, prefill_budget: int, token_budget: int
    ) -> list[tuple[Entry, int]]:
        """(entry, prompt tokens prefilled now) for the head of the queue, in order."""
        plan: list[tuple[Entry, int]] = []
        free_blocks = self.allocator.free_blocks
        prefill = tokens = 0
        for entry in self._entries:
            if max_size is not None and len(plan) >= max_size:
                break
            prompt = entry.request.input_length - self.allocator.cached_prefix(_cache_key(entry))
            take = min(prompt, prefill_budget - prefill)
            if take < prompt and (not self.support_chunking or take <= 0):
                break
            needed = self.allocator.blocks_for(self._tokens(entry))
            if needed > free_blocks or tokens + self._tokens(entry) > token_budget:
                break
            free_blocks -= needed
            prefill += take
            tokens += self._tokens(entry)
            plan.append((entry, take))
            if take < prompt:
                break  # the prefill budget is used up
        return plan

    def drain_cancelled(self) -> list[Entry]:
        """Removes entries whose client left while waiting."""
        gone = [e for e in self._entries if e.cancelled]
        if gone:
            self._entries = deque(e for e in self._entries if not e.cancelled)
            self.dropped += len(gone)
            self.metrics.dropped(len(gone))
        return gone


def _cache_key(entry: Entry) -> tuple[int, ...] | None:
    """The prompt to look up in the prefix cache; None for requests that want prompt logprobs."""
    return None if entry.request.prefill_logprobs else entry.request.input_ids
