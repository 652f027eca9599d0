"""Direct unit tests of the router's KV block allocator (router/batching/block_allocator.py).

Covered: block 0 is reserved and never handed out (`total_blocks` excludes it); `blocks_for`
rounds up; slots are `block * block_size + k` in position order, truncated to the token count,
also over non-contiguous blocks; `allocate` returns None when short and then takes nothing;
`free` returns blocks, which are reused low ids first; fewer than 2 blocks is a ValueError.
"""

from __future__ import annotations

import pytest

from router.batching.block_allocator import Allocation, BlockAllocator

BS = 4


def test_block_zero_is_never_handed_out():
    alloc = BlockAllocator(6, BS)
    assert alloc.total_blocks == 5
    assert alloc.free_blocks == 5
    handed = [alloc.allocate(BS) for _ in range(5)]
    assert all(a is not None for a in handed)
    blocks = [b for a in handed for b in a.blocks]
    assert 0 not in blocks
    assert sorted(blocks) == [1, 2, 3, 4, 5]
    assert alloc.free_blocks == 0
    assert alloc.allocate(1) is None


def test_block_zero_never_handed_out_in_one_big_allocation():
    alloc = BlockAllocator(4, BS)
    a = alloc.allocate(3 * BS)
    assert a is not None and a.blocks == (1, 2, 3)
    assert min(a.slots) == BS  # no slot of block 0 (slots 0..BS-1)


@pytest.mark.parametrize(
    "tokens, blocks", [(0, 0), (1, 1), (BS - 1, 1), (BS, 1), (BS + 1, 2), (2 * BS, 2), (9, 3)]
)
def test_blocks_for_rounds_up(tokens, blocks):
    assert BlockAllocator(8, BS).blocks_for(tokens) == blocks


def test_slots_follow_blocks_in_position_order_and_are_truncated():
    alloc = BlockAllocator(10, BS)
    a = alloc.allocate(6)
    assert a == Allocation(blocks=(1, 2), slots=(4, 5, 6, 7, 8, 9))
    assert len(a.slots) == 6


def test_slots_over_non_contiguous_blocks():
    alloc = BlockAllocator(10, BS)
    first = alloc.allocate(BS)  # block 1
    alloc.allocate(BS)  # block 2, kept
    alloc.free(first)
    a = alloc.allocate(BS + 2)
    assert a.blocks == (1, 3)
    assert a.slots == (4, 5, 6, 7, 12, 13)
    for p, slot in enumerate(a.slots):
        assert slot == a.blocks[p // BS] * BS + p % BS


def test_allocate_zero_tokens_takes_nothing():
    alloc = BlockAllocator(3, BS)
    assert alloc.allocate(0) == Allocation((), ())
    assert alloc.free_blocks == 2


def test_allocate_returns_none_when_short_and_takes_nothing():
    alloc = BlockAllocator(4, BS)  # 3 usable blocks
    assert alloc.allocate(BS) is not None
    assert alloc.free_blocks == 2
    assert alloc.allocate(2 * BS + 1) is None  # needs 3
    assert alloc.free_blocks == 2
    a = alloc.allocate(2 * BS)  # exactly what is left
    assert a is not None and a.blocks == (2, 3)
    assert alloc.free_blocks == 0


def test_free_returns_blocks_and_they_are_reused_low_ids_first():
    alloc = BlockAllocator(8, BS)
    a = alloc.allocate(2 * BS)
    b = alloc.allocate(BS)
    assert (a.blocks, b.blocks) == ((1, 2), (3,))
    assert alloc.free_blocks == 4
    alloc.free(a)
    assert alloc.free_blocks == 6
    again = alloc.allocate(2 * BS)
    assert again.blocks == (1, 2)
    alloc.free(b)
    alloc.free(again)
    assert alloc.free_blocks == 7
    everything = alloc.allocate(7 * BS)
    assert sorted(everything.blocks) == list(range(1, 8))


@pytest.mark.parametrize("num_blocks", [0, 1])
def test_fewer_than_two_blocks_is_an_error(num_blocks):
    with pytest.raises(ValueError):
        BlockAllocator(num_blocks, BS)


def test_two_blocks_leave_one_usable():
    alloc = BlockAllocator(2, BS)
    assert alloc.total_blocks == 1
    assert alloc.allocate(BS).blocks == (1,)
    assert alloc.allocate(1) is None
