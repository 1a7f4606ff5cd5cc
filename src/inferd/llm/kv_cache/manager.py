"""Per-request block tables over a BlockPool, with automatic prefix caching.

A request's block table maps its token positions to KV blocks: token ``i`` lives in block
``table[i // block_size]`` at slot ``i % block_size``. Full, computed blocks are registered in the
pool under their chained hash (``commit``), so a later request with the same prefix starts from
them (``find_cached_prefix`` then ``allocate(..., cached=...)``) instead of recomputing them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from inferd.llm.kv_cache.block_pool import BlockPool
from inferd.llm.kv_cache.prefix_cache import hash_block


@dataclass(frozen=True, slots=True)
class CachedPrefix:
    """Full blocks of a prompt whose KV is already in the pool, as found by ``find_cached_prefix``.

    ``block_hashes`` lets ``allocate`` check the blocks were not evicted since the lookup and
    spares ``commit`` from hashing them again.
    """

    block_ids: list[int]
    num_tokens: int  # len(block_ids) * block_size
    block_hashes: list[int] = field(default_factory=list)


_NO_CACHED_PREFIX = CachedPrefix(block_ids=[], num_tokens=0)


class KVCacheManager:
    """Per-request block tables over a BlockPool, with automatic prefix caching.

    The scheduler owns it. For each request: ``find_cached_prefix`` once when admitting it,
    ``allocate`` before every step that computes tokens, ``commit`` after it, ``free`` when the
    request finishes, is aborted or is preempted.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self._block_tables: dict[str, list[int]] = {}
        # Hashes of each request's leading full, committed blocks; the last one chains the next.
        self._block_hashes: dict[str, list[int]] = {}
        self.num_prefix_queries = 0  # prompt tokens of admitted requests
        self.num_prefix_hits = 0  # of those, tokens served from the prefix cache

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def can_fit(self, num_tokens: int) -> bool:
        """Whether a request of ``num_tokens`` tokens could ever fit, with the whole pool to itself."""
        return self._num_blocks_for(num_tokens) <= self.pool.num_blocks

    def find_cached_prefix(self, token_ids: Sequence[int], cache_salt: str | None = None) -> CachedPrefix:
        """The longest run of leading full blocks of ``token_ids`` that is cached under ``cache_salt``.

        It never covers all of ``token_ids``: at least one token is left to compute, because the
        step that computes it produces the logits of the next token. Changes no state, so a
        scheduler may call it again for a request it could not admit last step.
        """
        if not self.enable_prefix_caching:
            return _NO_CACHED_PREFIX
        max_num_blocks = (len(token_ids) - 1) // self.block_size
        block_ids: list[int] = []
        block_hashes: list[int] = []
        parent_hash = None
        for index in range(max_num_blocks):
            start = index * self.block_size
            parent_hash = _hash_block(parent_hash, token_ids[start : start + self.block_size], cache_salt)
            block_id = self.pool.lookup(parent_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
            block_hashes.append(parent_hash)
        return CachedPrefix(block_ids, len(block_ids) * self.block_size, block_hashes)

    def allocate(
        self,
        request_id: str,
        token_ids: Sequence[int],
        num_computed_tokens: int,
        num_new_tokens: int,
        cached: CachedPrefix | None = None,
    ) -> list[int] | None:
        """Grow the request's block table to cover ``num_computed_tokens + num_new_tokens`` tokens.

        On the request's first call, ``cached`` (from ``find_cached_prefix`` in the same step) may
        be given: its blocks become the head of the table and ``num_computed_tokens`` already
        counts them. Returns the whole block table (live; read it, never mutate it), or None, with
        no state changed at all, if the pool lacks free blocks.
        """
        assert num_computed_tokens >= 0 and num_new_tokens >= 0, (num_computed_tokens, num_new_tokens)
        table = self._block_tables.get(request_id)
        if table is not None and cached is None and len(table) * self.block_size >= num_computed_tokens + num_new_tokens:
            return table  # a decode within its last block (most steps): nothing to take or check
        cached = cached or _NO_CACHED_PREFIX
        assert table is None or not cached.block_ids, "a cached prefix is only given on the first call"
        assert cached.num_tokens <= num_computed_tokens, "num_computed_tokens must count the cached prefix"
        self._check_still_cached(cached)
        num_held_blocks = len(table) if table is not None else len(cached.block_ids)
        num_new_blocks = max(0, self._num_blocks_for(num_computed_tokens + num_new_tokens) - num_held_blocks)
        # A cached block nobody holds sits in the free queue; touching it takes it out of there.
        num_revived_blocks = sum(1 for block_id in cached.block_ids if self.pool.ref_count(block_id) == 0)
        if num_new_blocks + num_revived_blocks > self.pool.num_free_blocks:
            return None
        if table is None:
            table = self._start_table(request_id, token_ids, cached)
        table.extend(self.pool.allocate(num_new_blocks))
        return table

    def commit(
        self,
        request_id: str,
        token_ids: Sequence[int],
        num_computed_tokens: int,
        cache_salt: str | None = None,
    ) -> None:
        """Register every block of the request that is now full and computed, in the prefix cache.

        Called after a step computed the request's tokens up to ``num_computed_tokens``, with the
        salt its prefix was looked up under. Each block is hashed once: the request keeps the hashes
        it has already computed.
        """
        if not self.enable_prefix_caching:
            return
        table = self._block_tables[request_id]
        block_hashes = self._block_hashes[request_id]
        assert num_computed_tokens <= len(token_ids), (num_computed_tokens, len(token_ids))
        assert num_computed_tokens <= len(table) * self.block_size, "tokens computed past the block table"
        parent_hash = block_hashes[-1] if block_hashes else None
        for index in range(len(block_hashes), num_computed_tokens // self.block_size):
            start = index * self.block_size
            parent_hash = _hash_block(parent_hash, token_ids[start : start + self.block_size], cache_salt)
            self.pool.cache(table[index], parent_hash)
            block_hashes.append(parent_hash)

    def block_table(self, request_id: str) -> list[int]:
        """The request's block table (live; read it, never mutate it). KeyError if it has none."""
        return self._block_tables[request_id]

    def free(self, request_id: str) -> None:
        """Release all of the request's blocks; a no-op for a request that holds none."""
        table = self._block_tables.pop(request_id, None)
        self._block_hashes.pop(request_id, None)
        if table is not None:
            # Last block first, so the request's deepest blocks are the first to be evicted.
            self.pool.free(reversed(table))

    def reset_prefix_cache(self) -> int:
        """Forget the hashes of all blocks no request holds; returns how many were forgotten."""
        return self.pool.reset_prefix_cache()

    def check_integrity(self) -> None:
        """Assert the pool's invariants and that the live tables account for every reference."""
        self.pool.check_integrity()
        num_refs: dict[int, int] = {}
        for table in self._block_tables.values():
            for block_id in table:
                num_refs[block_id] = num_refs.get(block_id, 0) + 1
        for block_id in range(self.pool.num_blocks):
            assert self.pool.ref_count(block_id) == num_refs.get(block_id, 0), f"block {block_id} leaked"
        for request_id, block_hashes in self._block_hashes.items():
            assert len(block_hashes) <= len(self._block_tables[request_id]), request_id

    def _start_table(self, request_id: str, token_ids: Sequence[int], cached: CachedPrefix) -> list[int]:
        self.pool.touch(cached.block_ids)
        self._block_hashes[request_id] = list(cached.block_hashes)
        if self.enable_prefix_caching:
            self.num_prefix_queries += len(token_ids)
            self.num_prefix_hits += cached.num_tokens
        table = self._block_tables[request_id] = list(cached.block_ids)
        return table

    def _check_still_cached(self, cached: CachedPrefix) -> None:
        # Another request's allocation between find_cached_prefix and allocate may have evicted
        # (and reused) a block of the prefix; touching it then would share live KV by mistake.
        assert len(cached.block_hashes) == len(cached.block_ids), "CachedPrefix without its hashes"
        assert cached.num_tokens == len(cached.block_ids) * self.block_size, cached.num_tokens
        for block_id, block_hash in zip(cached.block_ids, cached.block_hashes):
            assert self.pool.lookup(block_hash) == block_id, f"cached block {block_id} was evicted"

    def _num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


def _hash_block(parent_hash: int | None, token_ids: Sequence[int], cache_salt: str | None) -> int:
    # The salt goes into the first block's hash only: every later hash chains from it, so requests
    # with different salts share no block, and requests with the same salt share them all.
    return hash_block(parent_hash, token_ids, cache_salt if parent_hash is None else None)
