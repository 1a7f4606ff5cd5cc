from __future__ import annotations

import pytest

from inferd.llm.kv_cache import BlockPool


def _cached_pool(num_blocks: int) -> BlockPool:
    """A pool whose every block is cached under hash 100 + id and free again, freed in id order."""
    pool = BlockPool(num_blocks)
    block_ids = pool.allocate(num_blocks)
    for block_id in block_ids:
        pool.cache(block_id, 100 + block_id)
    pool.free(block_ids)
    return pool


def test_new_pool_is_all_free() -> None:
    pool = BlockPool(8)
    assert pool.num_blocks == 8
    assert pool.num_free_blocks == 8
    assert pool.usage == 0.0
    pool.check_integrity()


def test_rejects_empty_pool() -> None:
    with pytest.raises(ValueError):
        BlockPool(0)


def test_allocate_takes_distinct_blocks_with_one_reference() -> None:
    pool = BlockPool(8)
    block_ids = pool.allocate(3)
    assert block_ids == [0, 1, 2]  # head of the free queue first
    assert [pool.ref_count(block_id) for block_id in range(8)] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert pool.num_free_blocks == 5
    assert pool.usage == pytest.approx(3 / 8)
    assert pool.allocate(0) == []
    pool.check_integrity()


def test_allocate_too_many_raises_and_takes_nothing() -> None:
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(ValueError):
        pool.allocate(2)
    with pytest.raises(ValueError):
        pool.allocate(-1)
    assert pool.num_free_blocks == 1
    pool.check_integrity()


def test_free_returns_blocks_to_the_tail_of_the_queue() -> None:
    pool = BlockPool(4)
    first = pool.allocate(2)
    pool.free(reversed(first))
    # Blocks 2 and 3 were never used and are ahead of the freed ones; 1 was freed before 0.
    assert pool.allocate(4) == [2, 3, 1, 0]
    pool.check_integrity()


def test_touch_adds_a_reference_and_free_drops_one() -> None:
    pool = BlockPool(4)
    [block_id] = pool.allocate(1)
    pool.touch([block_id])
    assert pool.ref_count(block_id) == 2
    pool.free([block_id])
    assert pool.ref_count(block_id) == 1
    assert pool.num_free_blocks == 3  # still held once
    pool.free([block_id])
    assert pool.ref_count(block_id) == 0
    assert pool.num_free_blocks == 4
    pool.check_integrity()


def test_freeing_an_unheld_block_is_a_bug() -> None:
    pool = BlockPool(4)
    [block_id] = pool.allocate(1)
    pool.free([block_id])
    with pytest.raises(AssertionError):
        pool.free([block_id])


def test_cached_block_survives_free_until_allocated_again() -> None:
    pool = BlockPool(2)
    [block_id] = pool.allocate(1)
    pool.cache(block_id, 1234)
    assert pool.lookup(1234) == block_id
    assert pool.block_hash(block_id) == 1234
    pool.free([block_id])
    assert pool.lookup(1234) == block_id  # free but still holding its KV
    assert pool.num_free_blocks == 2
    pool.allocate(2)  # takes the cached block too: evicted
    assert pool.lookup(1234) is None
    assert pool.block_hash(block_id) is None
    pool.check_integrity()


def test_touching_a_free_cached_block_takes_it_out_of_the_free_queue() -> None:
    pool = _cached_pool(4)
    pool.touch([2])
    assert pool.ref_count(2) == 1
    assert pool.num_free_blocks == 3
    assert 2 not in pool.allocate(3)
    assert pool.lookup(102) == 2  # the touched block was not evicted
    pool.check_integrity()


def test_cached_blocks_are_evicted_least_recently_freed_first() -> None:
    pool = _cached_pool(4)  # free queue: 0, 1, 2, 3
    pool.touch([1])
    pool.free([1])  # used again: now the most recently freed
    assert pool.allocate(1) == [0]
    assert pool.lookup(100) is None
    assert [pool.lookup(100 + block_id) for block_id in (1, 2, 3)] == [1, 2, 3]
    assert pool.allocate(2) == [2, 3]
    assert pool.allocate(1) == [1]
    assert pool.num_cached_blocks == 0
    pool.check_integrity()


def test_cache_keeps_the_first_block_registered_under_a_hash() -> None:
    pool = BlockPool(4)
    first, second = pool.allocate(2)
    pool.cache(first, 7)
    pool.cache(second, 7)  # same prefix computed twice
    assert pool.lookup(7) == first
    assert pool.block_hash(second) is None
    pool.cache(first, 7)  # registering again is harmless
    assert pool.num_cached_blocks == 1
    pool.check_integrity()


def test_cache_is_a_no_op_with_prefix_caching_disabled() -> None:
    pool = BlockPool(4, enable_prefix_caching=False)
    [block_id] = pool.allocate(1)
    pool.cache(block_id, 7)
    assert pool.lookup(7) is None
    assert pool.block_hash(block_id) is None
    pool.check_integrity()


def test_reset_prefix_cache_forgets_only_unused_blocks() -> None:
    pool = _cached_pool(4)
    pool.touch([3])
    assert pool.reset_prefix_cache() == 3
    assert [pool.lookup(100 + block_id) for block_id in range(4)] == [None, None, None, 3]
    assert pool.num_free_blocks == 3
    pool.check_integrity()


def test_check_integrity_catches_a_corrupt_pool() -> None:
    pool = BlockPool(4)
    pool.allocate(1)
    pool._free_ids[0] = None  # an in-use block also in the free queue
    with pytest.raises(AssertionError):
        pool.check_integrity()

    pool = BlockPool(4)
    [block_id] = pool.allocate(1)
    pool.cache(block_id, 9)
    pool._id_by_hash[9] = 3  # the two maps disagree
    with pytest.raises(AssertionError):
        pool.check_integrity()
