"""Prefix caching in the router's block allocator and queue (router/batching/block_allocator.py,
router/batching/queue.py).

Covered: nothing is shared with prefix caching off; committed full blocks are found by a later
prompt (`cache_len` in whole blocks, the shared blocks first in the block table, at most all but
one prompt token); partial blocks and different tokens are not shared, and a block is found only
under the same preceding tokens; ref counts (a shared block is freed once both holders let go);
cached blocks count as free and are evicted least recently used first, the tail of a sequence
before its head, with the blocks keyed under them; an allocation never evicts its own hits; a
commit that loses to a block already holding the same prefix indexes nothing more; the queue
counts only uncached tokens against the prefill budget, sets `cache_len`, and bypasses the cache
for prompt logprobs; a random workload leaves every block free or cached.
"""

from __future__ import annotations

import itertools
import random

from router.batching.block_allocator import BlockAllocator
from router.batching.entry import Entry
from router.batching.output import OutputState
from router.batching.queue import Queue
from router.request import SamplingParameters, StoppingParameters, ValidatedRequest

BS = 4
_ids = itertools.count()


def cached_run(alloc: BlockAllocator, prompt: list[int], max_new: int = 1):
    """Allocates for `prompt`, as the batcher would commits it after its first token, and
    returns the allocation (still held)."""
    a = alloc.allocate(len(prompt) + max_new - 1, prompt)
    assert a is not None
    alloc.commit(a, prompt)
    return a


def test_off_by_default_nothing_is_shared():
    alloc = BlockAllocator(16, BS)
    prompt = list(range(12))
    alloc.free(cached_run(alloc, prompt))
    again = alloc.allocate(12, prompt)
    assert again.cache_len == 0 and alloc.cached_blocks == 0


def test_a_committed_prefix_is_found_in_whole_blocks():
    alloc = BlockAllocator(16, BS, prefix_caching=True)
    first = cached_run(alloc, list(range(10)))  # blocks 1,2 full, block 3 partial
    alloc.free(first)
    assert alloc.cached_blocks == 2 and alloc.free_blocks == 15
    second = alloc.allocate(14, list(range(9)) + [99, 98])
    assert second.cache_len == 2 * BS
    assert second.blocks[:2] == first.blocks[:2]
    assert len(second.blocks) == 4 and len(set(second.blocks)) == 4
    for p, slot in enumerate(second.slots):
        assert slot == second.blocks[p // BS] * BS + p % BS


def test_the_last_prompt_token_is_always_computed():
    alloc = BlockAllocator(16, BS, prefix_caching=True)
    prompt = list(range(8))  # exactly two blocks
    alloc.free(cached_run(alloc, prompt))
    assert alloc.allocate(8, prompt).cache_len == BS  # not 8: one token must give logits
    assert alloc.cached_prefix(prompt + [1]) == 2 * BS


def test_blocks_are_keyed_by_the_tokens_before_them():
    alloc = BlockAllocator(16, BS, prefix_caching=True)
    alloc.free(cached_run(alloc, [1, 2, 3, 4, 5, 6, 7, 8, 0]))
    assert alloc.cached_prefix([9, 9, 9, 9, 5, 6, 7, 8, 0]) == 0  # same 2nd block, other 1st
    assert alloc.cached_prefix([1, 2, 3, 4, 5, 6, 7, 9, 0]) == BS
    assert alloc.cached_prefix([1, 2, 3]) == 0


def test_a_shared_block_is_freed_when_its_last_holder_leaves():
    alloc = BlockAllocator(8, BS, prefix_caching=True)
    prompt = list(range(9))
    a = cached_run(alloc, prompt)
    b = alloc.allocate(9, prompt)
    assert b.cache_len == 2 * BS and b.blocks[:2] == a.blocks[:2]
    assert alloc.free_blocks == 7 - 4  # 3 for a, 1 more for b
    alloc.free(a)
    assert alloc.cached_blocks == 0  # b still holds the shared blocks
    alloc.free(b)
    assert alloc.cached_blocks == 2 and alloc.free_blocks == 7


def test_eviction_is_lru_tail_first_and_takes_the_blocks_keyed_under_it():
    alloc = BlockAllocator(7, BS, prefix_caching=True)  # 6 usable
    old = list(range(100, 113))  # 3 full blocks
    new = list(range(200, 209))  # 2 full blocks
    alloc.free(cached_run(alloc, old))
    alloc.free(cached_run(alloc, new))
    assert alloc.cached_blocks == 5 and alloc.free_blocks == 6
    taken = alloc.allocate(2 * BS)  # one free block, then the oldest tail: old's 3rd block
    assert alloc.cached_prefix(old) == 2 * BS and alloc.cached_prefix(new) == 2 * BS
    alloc.free(taken)
    everything = alloc.allocate(6 * BS)
    assert sorted(everything.blocks) == list(range(1, 7))
    assert alloc.cached_blocks == 0 and alloc.cached_prefix(new) == 0


def test_evicting_a_head_block_forgets_its_tail():
    alloc = BlockAllocator(4, BS, prefix_caching=True)  # 3 usable
    prompt = list(range(9))
    first = cached_run(alloc, prompt)
    alloc.free(first)  # 2 cached blocks + 1 free
    alloc._evict(first.blocks[0])  # the head, which LRU order alone never evicts first
    assert alloc.cached_blocks == 0 and alloc.free_blocks == 3
    assert alloc.cached_prefix(prompt) == 0


def test_an_allocation_never_evicts_its_own_hits():
    alloc = BlockAllocator(4, BS, prefix_caching=True)  # 3 usable
    prompt = list(range(9))
    alloc.free(cached_run(alloc, prompt))  # blocks 1, 2 cached, block 3 free
    assert alloc.allocate(4 * BS, prompt) is None  # 2 hits + 2 new > 3
    assert alloc.cached_blocks == 2
    a = alloc.allocate(3 * BS, prompt)
    assert a.cache_len == 2 * BS and a.blocks == (1, 2, 3)


def test_a_commit_that_loses_the_race_indexes_nothing_more():
    alloc = BlockAllocator(16, BS, prefix_caching=True)
    prompt = list(range(13))
    a = alloc.allocate(13, prompt)
    b = alloc.allocate(13, prompt)  # both started before either committed
    alloc.commit(a, prompt)
    alloc.commit(b, prompt)
    alloc.free(b)
    assert alloc.cached_blocks == 0  # b's blocks hold a copy nobody can find: free
    alloc.free(a)
    assert alloc.cached_blocks == 3
    assert alloc.allocate(13, prompt).blocks[:3] == a.blocks[:3]


def test_committing_generated_tokens_extends_the_prefix():
    alloc = BlockAllocator(16, BS, prefix_caching=True)
    prompt = list(range(6))
    a = cached_run(alloc, prompt, max_new=8)
    alloc.commit(a, prompt + [50, 51, 52, 53, 54])  # a chat turn: prompt and answer
    alloc.free(a)
    assert alloc.cached_prefix(prompt + [50, 51, 52, 53, 54, 60]) == 2 * BS


def test_random_workload_leaves_every_block_free_or_cached():
    rng = random.Random(0)
    alloc = BlockAllocator(40, BS, prefix_caching=True)
    system = [rng.randrange(50) for _ in range(10)]
    held = []
    for _ in range(500):
        if held and (rng.random() < 0.5 or alloc.free_blocks < 12):
            a, tokens = held.pop(rng.randrange(len(held)))
            alloc.commit(a, tokens)
            alloc.free(a)
            continue
        prompt = system[: rng.randrange(1, 11)] + [rng.randrange(50) for _ in range(6)]
        a = alloc.allocate(len(prompt) + 4, prompt)
        assert a is not None
        assert len(set(a.blocks)) == len(a.blocks) and 0 not in a.blocks
        assert a.cache_len % BS == 0 and a.cache_len < len(prompt)
        alloc.commit(a, prompt)
        held.append((a, prompt + [rng.randrange(50) for _ in range(3)]))
        holders = [b for a, _ in held for b in a.blocks]
        assert all(alloc._refs[b] == holders.count(b) for b in range(40))
        assert not set(holders) & (set(alloc._free) | set(alloc._cached))
        assert len(set(holders)) + alloc.free_blocks == alloc.total_blocks
    for a, _ in held:
        alloc.free(a)
    assert alloc.free_blocks == alloc.total_blocks
    assert sorted(alloc._free + list(alloc._cached)) == list(range(1, 40))


# ---- the queue ---------------------------------------------------------------------------------


class StubTokenizer:
    def decode(self, ids, skip_special_tokens=False) -> str:
        return "x" * len(ids)

    def is_special(self, token_id) -> bool:
        return False


def entry(prompt: list[int], max_new: int = 1, prompt_logprobs: bool = False) -> Entry:
    req = ValidatedRequest(
        inputs="x" * len(prompt),
        input_ids=tuple(prompt),
        sampling=SamplingParameters(),
        stopping=StoppingParameters(max_new, max_new),
        prefill_logprobs=prompt_logprobs,
    )
    return Entry(next(_ids), req, OutputState(StubTokenizer(), req))


def warm_queue(prompt: list[int]) -> Queue:
    alloc = BlockAllocator(64, BS, prefix_caching=True)
    alloc.free(cached_run(alloc, prompt))
    return Queue(alloc, support_chunking=True)


def test_queue_counts_only_uncached_tokens_against_the_prefill_budget():
    system = list(range(40))  # 10 cached blocks
    q = warm_queue(system + [1])
    for _ in range(3):
        q.append(entry(system + [7, 8]))
    batch = q.next_batch(None, None, prefill_budget=6, token_budget=10_000)
    assert [e.allocation.cache_len for e in batch.entries] == [40, 40, 40]
    assert [e.chunk_len for e in batch.entries] == [None, None, None]
    assert batch.prefill_tokens == 6


def test_queue_cuts_a_partly_cached_prompt_after_its_cached_part():
    system = list(range(16))
    q = warm_queue(system + [1])
    q.append(entry(system + list(range(50, 60))))
    (e,) = q.next_batch(None, None, prefill_budget=4, token_budget=10_000).entries
    assert e.allocation.cache_len == 16 and e.chunk_len == 4


def test_prompt_logprobs_bypass_the_cache():
    system = list(range(16))
    q = warm_queue(system + [1])
    q.append(entry(system + [5], prompt_logprobs=True))
    (e,) = q.next_batch(None, None, prefill_budget=100, token_budget=10_000).entries
    assert e.allocation.cache_len == 0
