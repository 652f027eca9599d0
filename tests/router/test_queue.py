"""Direct unit tests of the router's queue (router/batching/queue.py), after TGI's
backends/v3/src/queue.rs tests.

Covered: `append` (queues and notifies; an entry needing more blocks than the cache has fails
at once with an ErrorEvent and is not queued); `next_batch` on an empty queue and with
`max_size == 0` or a non-positive prefill/token budget (None, nothing popped); FIFO order;
`max_size` (the rest stays queued, in order); `min_size` (not reached: None, nothing popped or
allocated); the prefill budget with and without chunking (the last entry is cut to what is left
of the budget, or waits); the token budget; free-block exhaustion (later entries are not
allocated and do not jump the queue); each taken entry's allocation covers prompt +
max_new_tokens - 1 positions; cancelled entries are dropped by `next_batch` and
`drain_cancelled` and counted in `dropped`.
"""

from __future__ import annotations

import itertools

import pytest

from router.batching.block_allocator import BlockAllocator
from router.batching.entry import Entry
from router.batching.events import ErrorEvent
from router.batching.output import OutputState
from router.batching.queue import Queue
from router.errors import GenerationError
from router.request import SamplingParameters, StoppingParameters, ValidatedRequest

BS = 4  # block size
BIG = 10_000  # a budget that never binds

_ids = itertools.count()


class StubTokenizer:
    """All OutputState needs: decode (the detokenizer decodes the prompt's last ids)."""

    def decode(self, ids, skip_special_tokens=False) -> str:
        return "x" * len(ids)

    def is_special(self, token_id) -> bool:
        return False


def entry(prompt: int, max_new: int = 1) -> Entry:
    """An entry needing `prompt + max_new - 1` KV positions (`prompt` with the default)."""
    req = ValidatedRequest(
        inputs="x" * prompt,
        input_ids=tuple(range(100, 100 + prompt)),
        sampling=SamplingParameters(),
        stopping=StoppingParameters(max_new, max_new),
    )
    return Entry(next(_ids), req, OutputState(StubTokenizer(), req))


def queue(num_blocks: int = 64, chunking: bool = False) -> Queue:
    return Queue(BlockAllocator(num_blocks, BS), support_chunking=chunking)


def filled(*entries: Entry, num_blocks: int = 64, chunking: bool = False) -> Queue:
    q = queue(num_blocks, chunking)
    for e in entries:
        q.append(e)
    return q


def ids(entries) -> list[int]:
    return [e.id for e in entries]


# append


def test_append_queues_and_notifies():
    q = queue()
    assert len(q) == 0 and not q.notify.is_set()
    e = entry(4)
    q.append(e)
    assert len(q) == 1
    assert q.notify.is_set()
    assert e.events.empty()
    assert e.allocation is None  # blocks come with next_batch only


def test_append_rejects_entry_that_can_never_fit():
    q = queue(num_blocks=3)  # 2 usable blocks: 8 positions
    e = entry(5, max_new=5)  # 9 positions: 3 blocks
    q.append(e)
    assert len(q) == 0
    assert not q.notify.is_set()
    event = e.events.get_nowait()
    assert isinstance(event, ErrorEvent)
    assert isinstance(event.error, GenerationError)
    assert "3" in str(event.error) and "2" in str(event.error)
    assert q.allocator.free_blocks == 2


def test_append_accepts_entry_needing_every_block():
    q = queue(num_blocks=3)
    e = entry(4, max_new=5)  # 8 positions: exactly 2 blocks
    q.append(e)
    assert len(q) == 1 and e.events.empty()
    batch = q.next_batch(None, None, BIG, BIG)
    assert ids(batch.entries) == [e.id]
    assert q.allocator.free_blocks == 0


# next_batch: trivial cases


def test_next_batch_empty():
    q = queue()
    assert q.next_batch(None, None, BIG, BIG) is None
    assert q.next_batch(1, 10, BIG, BIG) is None


@pytest.mark.parametrize(
    "max_size, prefill_budget, token_budget",
    [(0, BIG, BIG), (None, 0, BIG), (None, -1, BIG), (None, BIG, 0), (None, BIG, -5)],
)
def test_next_batch_none_without_budget(max_size, prefill_budget, token_budget):
    q = filled(entry(4), entry(4))
    free = q.allocator.free_blocks
    assert q.next_batch(None, max_size, prefill_budget, token_budget) is None
    assert len(q) == 2
    assert q.allocator.free_blocks == free


# next_batch: order and size


def test_next_batch_keeps_fifo_order():
    es = [entry(n) for n in (3, 1, 4, 1, 5)]
    q = filled(*es)
    batch = q.next_batch(None, None, BIG, BIG)
    assert ids(batch.entries) == ids(es)
    assert batch.prefill_tokens == 14
    assert len(q) == 0


def test_next_batch_max_size_caps_and_rest_stays_in_order():
    es = [entry(4) for _ in range(5)]
    q = filled(*es)
    batch = q.next_batch(None, 2, BIG, BIG)
    assert ids(batch.entries) == ids(es[:2])
    assert len(q) == 3
    rest = q.next_batch(None, None, BIG, BIG)
    assert ids(rest.entries) == ids(es[2:])
    assert all(e.allocation is not None for e in es)


def test_next_batch_min_size_not_reached_pops_and_allocates_nothing():
    es = [entry(4), entry(4)]
    q = filled(*es)
    free = q.allocator.free_blocks
    assert q.next_batch(3, None, BIG, BIG) is None
    assert len(q) == 2
    assert q.allocator.free_blocks == free
    assert all(e.allocation is None for e in es)
    batch = q.next_batch(2, None, BIG, BIG)
    assert ids(batch.entries) == ids(es)


def test_next_batch_min_size_counts_what_fits_not_what_is_queued():
    es = [entry(4) for _ in range(3)]
    q = filled(*es)
    assert q.next_batch(2, None, 4, BIG) is None  # only one fits the prefill budget
    assert len(q) == 3
    assert all(e.allocation is None for e in es)


# next_batch: prefill budget and chunking


def test_prefill_budget_without_chunking_last_entry_waits():
    es = [entry(4) for _ in range(3)]
    q = filled(*es)
    batch = q.next_batch(None, None, 10, BIG)
    assert ids(batch.entries) == ids(es[:2])
    assert batch.prefill_tokens == 8
    assert all(e.chunk_len is None for e in batch.entries)
    assert len(q) == 1 and es[2].allocation is None


def test_prefill_budget_with_chunking_cuts_last_entry():
    es = [entry(4) for _ in range(4)]
    q = filled(*es, chunking=True)
    batch = q.next_batch(None, None, 10, BIG)
    assert ids(batch.entries) == ids(es[:3])
    assert [e.chunk_len for e in batch.entries] == [None, None, 2]
    assert batch.prefill_tokens == 10
    assert len(q) == 1 and es[3].allocation is None


def test_chunking_budget_used_up_exactly_takes_no_empty_chunk():
    es = [entry(4) for _ in range(3)]
    q = filled(*es, chunking=True)
    batch = q.next_batch(None, None, 8, BIG)
    assert ids(batch.entries) == ids(es[:2])
    assert [e.chunk_len for e in batch.entries] == [None, None]
    assert len(q) == 1


def test_head_longer_than_prefill_budget():
    q = filled(entry(20))
    assert q.next_batch(None, None, 8, BIG) is None
    assert len(q) == 1

    e = entry(20)
    q = filled(e, chunking=True)
    batch = q.next_batch(None, None, 8, BIG)
    assert ids(batch.entries) == [e.id]
    assert e.chunk_len == 8 and batch.prefill_tokens == 8


def test_chunked_entry_gets_blocks_for_its_whole_request():
    e = entry(20, max_new=5)
    q = filled(e, chunking=True)
    q.next_batch(None, None, 8, BIG)
    assert e.chunk_len == 8
    assert len(e.allocation.slots) == 24
    assert len(e.allocation.blocks) == 6


# next_batch: token budget and blocks


def test_token_budget_stops_the_batch():
    es = [entry(4, max_new=5) for _ in range(3)]  # 8 positions each
    q = filled(*es)
    batch = q.next_batch(None, None, BIG, 20)
    assert ids(batch.entries) == ids(es[:2])
    assert len(q) == 1 and es[2].allocation is None


def test_token_budget_counts_max_new_tokens_not_just_prompt():
    q = filled(entry(2, max_new=9))  # prompt 2, but 10 positions
    assert q.next_batch(None, None, BIG, 9) is None
    assert q.next_batch(None, None, BIG, 10) is not None


def test_free_block_exhaustion_stops_the_batch():
    es = [entry(8) for _ in range(3)]  # 2 blocks each
    q = filled(*es, num_blocks=6)  # 5 usable blocks
    batch = q.next_batch(None, None, BIG, BIG)
    assert ids(batch.entries) == ids(es[:2])
    assert q.allocator.free_blocks == 5 - 4
    assert es[2].allocation is None
    assert len(q) == 1


def test_blocked_head_is_not_overtaken():
    big, small = entry(12), entry(4)  # 3 blocks, 1 block
    q = filled(big, small, num_blocks=5)  # 4 usable
    held = q.allocator.allocate(2 * BS)  # a running request holds 2 blocks
    assert q.next_batch(None, None, BIG, BIG) is None
    assert len(q) == 2 and q.allocator.free_blocks == 2
    q.allocator.free(held)
    batch = q.next_batch(None, None, BIG, BIG)
    assert ids(batch.entries) == [big.id, small.id]
    assert q.allocator.free_blocks == 0


def test_each_entry_gets_prompt_plus_max_new_minus_one_positions():
    es = [entry(5, max_new=4), entry(1, max_new=1), entry(3, max_new=10)]
    q = filled(*es)
    q.next_batch(None, None, BIG, BIG)
    for e, positions in zip(es, [8, 1, 12]):
        assert len(e.allocation.slots) == positions
        assert len(e.allocation.blocks) == -(-positions // BS)
        assert 0 not in e.allocation.blocks
    blocks = [b for e in es for b in e.allocation.blocks]
    assert len(blocks) == len(set(blocks))  # no block shared
    assert q.allocator.free_blocks == 63 - len(blocks)


# cancellation


def test_next_batch_drops_cancelled_entries():
    es = [entry(4) for _ in range(3)]
    q = filled(*es)
    es[1].cancelled = True
    batch = q.next_batch(None, None, BIG, BIG)
    assert ids(batch.entries) == [es[0].id, es[2].id]
    assert es[1].allocation is None
    assert q.dropped == 1
    assert len(q) == 0


def test_next_batch_drops_cancelled_even_without_budget():
    es = [entry(4), entry(4)]
    q = filled(*es)
    es[0].cancelled = True
    assert q.next_batch(None, None, 0, BIG) is None
    assert q.dropped == 1 and len(q) == 1


def test_drain_cancelled_returns_and_counts_them():
    es = [entry(4) for _ in range(4)]
    q = filled(*es)
    assert q.drain_cancelled() == [] and q.dropped == 0
    es[0].cancelled = es[3].cancelled = True
    gone = q.drain_cancelled()
    assert ids(gone) == [es[0].id, es[3].id]
    assert q.dropped == 2 and len(q) == 2
    assert q.drain_cancelled() == [] and q.dropped == 2
    batch = q.next_batch(None, None, BIG, BIG)
    assert ids(batch.entries) == [es[1].id, es[2].id]
