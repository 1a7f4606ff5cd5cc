"""The pool of KV blocks: integer ids, ref counts, the free queue and the hash → block map.

Pure bookkeeping: no tensors. A block is either in use (ref count > 0) or in the free queue
(ref count 0). A free block may still hold the KV of a cached prefix: it keeps its hash until
``allocate`` hands it out again, so the free queue doubles as the LRU list of the prefix cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class BlockPool:
    """Fixed number of KV blocks identified by integer ids 0..num_blocks-1, ref-counted.

    The free queue is ordered from least to most recently freed; ``allocate`` takes from its head,
    so cached blocks are evicted least recently used first. It is an OrderedDict because a cached
    block that is touched again must leave the middle of the queue in O(1).
    """

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hash_by_id: dict[int, int] = {}
        self._id_by_hash: dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now: ref count 0, whether empty or holding an unused cached prefix."""
        return len(self._free_ids)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_by_id)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by at least one request."""
        return 1.0 - len(self._free_ids) / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> int | None:
        """The hash the block is cached under, or None if it is not cached."""
        return self._hash_by_id.get(block_id)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` blocks from the head of the free queue, each with ref count 1.

        A cached block taken this way is evicted: its hash is forgotten. Raises ValueError if fewer
        than ``num_blocks`` blocks are free (nothing is taken then).
        """
        if not 0 <= num_blocks <= len(self._free_ids):
            raise ValueError(f"cannot allocate {num_blocks} blocks, {len(self._free_ids)} free")
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self._free_ids.popitem(last=False)
            self._evict(block_id)
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add a reference to each block; a free (cached) block leaves the free queue."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._free_ids[block_id]
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop a reference to each block, in the given order.

        A block whose ref count reaches 0 goes to the tail of the free queue and keeps its hash,
        so it can be reused until evicted. Callers free a request's blocks last block first: its
        deepest (least shareable) blocks then sit nearest the head and are evicted first.
        """
        for block_id in block_ids:
            assert self._ref_counts[block_id] > 0, f"block {block_id} freed more often than held"
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free_ids[block_id] = None

    def lookup(self, block_hash: int) -> int | None:
        """The id of the block cached under ``block_hash``, or None."""
        return self._id_by_hash.get(block_hash)

    def cache(self, block_id: int, block_hash: int) -> None:
        """Register a full, computed block under its hash.

        If another block already holds that hash (two requests computed the same prefix at the
        same time), the existing mapping is kept and this block stays uncached.
        """
        if not self.enable_prefix_caching or block_hash in self._id_by_hash:
            return
        assert self._ref_counts[block_id] > 0, f"caching block {block_id}, which nobody holds"
        # A held block's content never changes, so it cannot be re-registered under a new hash.
        assert block_id not in self._hash_by_id, f"block {block_id} is already cached"
        self._hash_by_id[block_id] = block_hash
        self._id_by_hash[block_hash] = block_id

    def reset_prefix_cache(self) -> int:
        """Forget the hashes of all free blocks; returns how many were forgotten.

        Blocks in use keep their hashes: their KV is live and still valid.
        """
        unused_ids = [block_id for block_id in self._hash_by_id if self._ref_counts[block_id] == 0]
        for block_id in unused_ids:
            self._evict(block_id)
        return len(unused_ids)

    def check_integrity(self) -> None:
        """Assert the pool's invariants; O(num_blocks), meant for tests and debug builds."""
        assert len(self._ref_counts) == self.num_blocks
        assert all(count >= 0 for count in self._ref_counts), "negative ref count"
        free_ids = {block_id for block_id, count in enumerate(self._ref_counts) if count == 0}
        # Same size and same set: the queue has no duplicates and holds exactly the ref-0 blocks,
        # so every id is either free or in use, never both.
        assert len(self._free_ids) == len(free_ids), "free queue out of sync with ref counts"
        assert free_ids == self._free_ids.keys(), "free queue out of sync with ref counts"
        assert len(self._hash_by_id) == len(self._id_by_hash), "hash maps differ in size"
        for block_id, block_hash in self._hash_by_id.items():
            assert self._id_by_hash.get(block_hash) == block_id, f"hash maps disagree on {block_id}"
        if not self.enable_prefix_caching:
            assert not self._hash_by_id, "a block is cached with prefix caching disabled"

    def _evict(self, block_id: int) -> None:
        block_hash = self._hash_by_id.pop(block_id, None)
        if block_hash is not None:
            del self._id_by_hash[block_hash]
