from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from inferd.llm.kv_cache import CachedPrefix, KVCacheManager, hash_block, hash_full_blocks

BLOCK_SIZE = 4


def _prefill(
    manager: KVCacheManager, request_id: str, token_ids: list[int], cache_salt: str | None = None
) -> CachedPrefix:
    """Admit a request, compute its whole prompt in one step and commit it, as the engine would."""
    cached = manager.find_cached_prefix(token_ids, cache_salt)
    num_new_tokens = len(token_ids) - cached.num_tokens
    table = manager.allocate(request_id, token_ids, cached.num_tokens, num_new_tokens, cached)
    assert table is not None
    manager.commit(request_id, token_ids, len(token_ids), cache_salt)
    return cached


def _snapshot(manager: KVCacheManager) -> tuple:
    pool = manager.pool
    return (
        pool.num_free_blocks,
        [pool.ref_count(block_id) for block_id in range(pool.num_blocks)],
        [pool.block_hash(block_id) for block_id in range(pool.num_blocks)],
        dict(manager._block_tables),
        manager.num_prefix_queries,
        manager.num_prefix_hits,
    )


# Hashing


def test_hash_block_is_deterministic_and_chained() -> None:
    first = hash_block(None, [1, 2, 3, 4])
    assert first == hash_block(None, (1, 2, 3, 4))
    second = hash_block(first, [5, 6, 7, 8])
    assert second != hash_block(None, [5, 6, 7, 8])  # same tokens, different prefix
    assert second != hash_block(hash_block(None, [1, 2, 3, 5]), [5, 6, 7, 8])
    assert hash_block(None, [1, 2, 3, 4], extra="lora-a") != first
    assert hash_block(None, [1, 2, 3, 4], extra="lora-a") != hash_block(None, [1, 2, 3, 4], extra="lora-b")


def test_hash_full_blocks_skips_the_partial_block_and_can_resume() -> None:
    token_ids = list(range(11))
    hashes = hash_full_blocks(token_ids, BLOCK_SIZE)
    assert len(hashes) == 2
    assert hashes[0] == hash_block(None, token_ids[:4])
    assert hashes[1] == hash_block(hashes[0], token_ids[4:8])
    longer = [*token_ids, 11]
    assert (
        hash_full_blocks(longer, BLOCK_SIZE, start_block=2, parent_hash=hashes[1])
        == (hash_full_blocks(longer, BLOCK_SIZE)[2:])
    )


# Allocation


def test_allocate_covers_the_tokens_and_grows_at_block_boundaries() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    token_ids = list(range(6))
    table = manager.allocate("a", token_ids, 0, 6)
    assert table is not None and len(table) == 2
    assert manager.num_free_blocks == 6
    token_ids += [6, 7]
    assert manager.allocate("a", token_ids, 6, 1) == table  # token 7 still fits in block 1
    assert manager.allocate("a", token_ids, 7, 1) == table
    token_ids.append(8)
    grown = manager.allocate("a", token_ids, 8, 1)
    assert grown is not None and len(grown) == 3 and grown[:2] == table[:2]
    assert manager.block_table("a") == grown
    assert manager.usage == pytest.approx(3 / 8)
    manager.check_integrity()


def test_free_releases_every_block_and_ignores_unknown_requests() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    manager.allocate("a", list(range(10)), 0, 10)
    manager.free("a")
    assert manager.num_free_blocks == 8
    manager.free("a")
    manager.free("never-seen")
    assert manager.num_free_blocks == 8
    with pytest.raises(KeyError):
        manager.block_table("a")
    manager.check_integrity()


def test_allocate_out_of_blocks_returns_none_and_changes_nothing() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    manager.allocate("a", list(range(12)), 0, 12)
    before = _snapshot(manager)
    assert manager.allocate("b", list(range(8)), 0, 8) is None  # new request
    assert manager.allocate("a", list(range(20)), 12, 8) is None  # growing request
    assert _snapshot(manager) == before
    with pytest.raises(KeyError):
        manager.block_table("b")
    manager.check_integrity()


def test_allocate_counts_revived_cached_blocks_against_the_free_blocks() -> None:
    manager = KVCacheManager(num_blocks=5, block_size=BLOCK_SIZE)
    prompt = list(range(9))
    _prefill(manager, "a", prompt)  # blocks: 2 full and cached, 1 partial
    manager.free("a")
    manager.allocate("other", [99], 0, 1)
    assert manager.num_free_blocks == 4
    longer = [*prompt[:8], *range(100, 109)]  # 17 tokens: 2 cached blocks + 3 new
    cached = manager.find_cached_prefix(longer)
    assert cached.num_tokens == 8
    before = _snapshot(manager)
    # 3 new blocks alone would fit in 4 free ones, but reviving the 2 cached blocks uses 2 of them.
    assert manager.allocate("b", longer, 8, 9, cached) is None
    assert _snapshot(manager) == before
    manager.check_integrity()


def test_can_fit() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    assert manager.can_fit(16)
    assert not manager.can_fit(17)
    with pytest.raises(ValueError):
        KVCacheManager(num_blocks=4, block_size=0)


# Prefix caching


def test_second_request_reuses_the_first_requests_blocks() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    prompt = list(range(10))
    assert _prefill(manager, "a", prompt).num_tokens == 0
    table_a = manager.block_table("a")
    cached = manager.find_cached_prefix(prompt)
    assert cached.block_ids == table_a[:2]
    assert cached.num_tokens == 8
    table_b = manager.allocate("b", prompt, 8, 2, cached)
    assert table_b is not None
    assert table_b[:2] == table_a[:2]
    assert table_b[2] != table_a[2]
    assert [manager.pool.ref_count(block_id) for block_id in table_a[:2]] == [2, 2]
    assert manager.num_prefix_queries == 20
    assert manager.num_prefix_hits == 8
    manager.check_integrity()

    manager.free("a")  # b still holds the shared blocks
    assert [manager.pool.ref_count(block_id) for block_id in table_b] == [1, 1, 1]
    assert manager.num_free_blocks == 13
    manager.check_integrity()


def test_blocks_are_shared_only_between_requests_with_the_same_salt() -> None:
    manager = KVCacheManager(num_blocks=32, block_size=BLOCK_SIZE)
    prompt = list(range(13))  # three full blocks
    assert _prefill(manager, "a", prompt, cache_salt="tenant-a").num_tokens == 0
    assert manager.find_cached_prefix(prompt, "tenant-a").block_ids == manager.block_table("a")[:3]
    # Neither another salt nor no salt finds any block, the first or a later one.
    assert manager.find_cached_prefix(prompt, "tenant-b").num_tokens == 0
    assert manager.find_cached_prefix(prompt).num_tokens == 0
    assert _prefill(manager, "b", prompt, cache_salt="tenant-b").num_tokens == 0
    assert _prefill(manager, "c", prompt).num_tokens == 0
    assert _prefill(manager, "d", prompt).num_tokens == 12  # no salt shares with no salt
    assert _prefill(manager, "e", prompt, cache_salt="tenant-a").num_tokens == 12
    tables = {r: manager.block_table(r)[:3] for r in "abcde"}
    assert tables["e"] == tables["a"] and tables["d"] == tables["c"]
    assert len({block for r in "abc" for block in tables[r]}) == 9
    manager.check_integrity()


def test_find_cached_prefix_changes_nothing() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    _prefill(manager, "a", list(range(10)))
    manager.free("a")
    before = _snapshot(manager)
    assert manager.find_cached_prefix(list(range(10))).num_tokens == 8
    assert _snapshot(manager) == before


def test_partial_last_block_is_never_cached() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    prompt = list(range(10))
    _prefill(manager, "a", prompt)
    table = manager.block_table("a")
    assert manager.pool.block_hash(table[1]) is not None
    assert manager.pool.block_hash(table[2]) is None
    # Growing the request to fill the block, then computing it, caches it.
    token_ids = [*prompt, 10, 11]
    manager.allocate("a", token_ids, 10, 2)
    manager.commit("a", token_ids, 11)
    assert manager.pool.block_hash(table[2]) is None  # full but its last token not computed yet
    manager.commit("a", token_ids, 12)
    assert manager.pool.block_hash(table[2]) == hash_full_blocks(token_ids, BLOCK_SIZE)[2]
    manager.check_integrity()


def test_exact_block_multiple_leaves_one_block_to_compute() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    prompt = list(range(8))
    _prefill(manager, "a", prompt)
    assert all(manager.pool.block_hash(block_id) is not None for block_id in manager.block_table("a"))
    cached = manager.find_cached_prefix(prompt)
    assert cached.block_ids == manager.block_table("a")[:1]
    assert cached.num_tokens == 4
    table = manager.allocate("b", prompt, 4, 4, cached)
    assert table is not None and len(table) == 2
    assert table[1] != manager.block_table("a")[1]  # the last block is computed afresh
    manager.check_integrity()


def test_freed_prefix_is_reused_until_evicted_by_pressure() -> None:
    manager = KVCacheManager(num_blocks=6, block_size=BLOCK_SIZE)
    prompt = list(range(10))
    _prefill(manager, "a", prompt)
    table_a = list(manager.block_table("a"))
    manager.free("a")
    assert manager.num_free_blocks == 6

    cached = _prefill(manager, "b", prompt)  # a's blocks have ref count 0 but are still cached
    assert cached.block_ids == table_a[:2]
    assert manager.num_free_blocks == 3
    manager.free("b")

    assert manager.allocate("hog", list(range(50, 74)), 0, 24) is not None  # every block
    manager.free("hog")
    assert manager.find_cached_prefix(prompt).num_tokens == 0
    manager.check_integrity()


def test_a_freed_requests_last_blocks_are_evicted_first() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    prompt = list(range(13))  # 3 full blocks + 1 partial
    _prefill(manager, "a", prompt)
    manager.free("a")
    manager.allocate("x", [99], 0, 1)  # takes a's partial block
    assert manager.find_cached_prefix(prompt).num_tokens == 12
    manager.allocate("y", [98], 0, 1)  # takes a's third block
    assert manager.find_cached_prefix(prompt).num_tokens == 8
    manager.check_integrity()


def test_prefix_computed_twice_stays_cached_once_and_lookup_stops_at_a_gap() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    prompt_a = list(range(9))
    prompt_b = [*prompt_a[:8], 50, 51, 52, 53, 54]
    # Both admitted before either committed: b computes a's first two blocks again.
    assert manager.allocate("a", prompt_a, 0, 9, manager.find_cached_prefix(prompt_a)) is not None
    assert manager.allocate("b", prompt_b, 0, 13, manager.find_cached_prefix(prompt_b)) is not None
    manager.commit("a", prompt_a, 9)
    manager.commit("b", prompt_b, 13)
    table_b = manager.block_table("b")
    assert [manager.pool.block_hash(block_id) is not None for block_id in table_b] == [
        False,
        False,
        True,
        False,
    ]
    manager.free("a")
    manager.allocate("hog", list(range(60, 76)), 0, 16)  # evicts a's blocks, the cached copies
    # b's third block is still cached, but the prefix it continues is gone from the cache.
    assert manager.find_cached_prefix(prompt_b).num_tokens == 0
    manager.check_integrity()


def test_stale_cached_prefix_is_caught() -> None:
    manager = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    prompt = list(range(9))
    _prefill(manager, "a", prompt)
    manager.free("a")
    cached = manager.find_cached_prefix(prompt)
    manager.allocate("hog", list(range(50, 62)), 0, 12)  # evicts the cached blocks
    manager.free("hog")
    with pytest.raises(AssertionError):
        manager.allocate("b", prompt, 8, 1, cached)


def test_reset_prefix_cache_forgets_unused_blocks() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    _prefill(manager, "a", list(range(10)))
    _prefill(manager, "b", list(range(100, 110)))
    manager.free("a")
    assert manager.reset_prefix_cache() == 2
    assert manager.find_cached_prefix(list(range(10))).num_tokens == 0
    assert manager.find_cached_prefix(list(range(100, 110))).num_tokens == 8
    manager.check_integrity()


def test_prefix_caching_disabled() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    prompt = list(range(10))
    _prefill(manager, "a", prompt)
    assert manager.pool.num_cached_blocks == 0
    assert manager.find_cached_prefix(prompt) == CachedPrefix([], 0)
    assert manager.num_prefix_queries == 0
    manager.check_integrity()


# Randomized property test


@dataclass(slots=True)
class _Request:
    token_ids: list[int]
    num_computed_tokens: int = 0


class _Simulation:
    """Drives a manager like an engine would, and mirrors the KV each block holds."""

    def __init__(self, rng: random.Random, enable_prefix_caching: bool) -> None:
        self.rng = rng
        self.manager = KVCacheManager(24, BLOCK_SIZE, enable_prefix_caching)
        self.requests: dict[str, _Request] = {}
        self.kv: dict[int, list[int | None]] = {}  # block id -> the token id held in each slot
        self.prefixes = [[rng.randrange(50) for _ in range(length)] for length in (4, 5, 8, 11)]
        self.num_added = self.num_refused = self.num_shared = 0

    def add(self, request_id: str) -> None:
        suffix = [self.rng.randrange(50) for _ in range(self.rng.randrange(3))]
        token_ids = [*self.rng.choice(self.prefixes), *suffix]
        cached = self.manager.find_cached_prefix(token_ids)
        assert cached.num_tokens < len(token_ids)
        for index, block_id in enumerate(cached.block_ids):
            # The point of it all: a reused block holds exactly the KV of this prompt's tokens.
            assert self.kv[block_id] == token_ids[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE]
        request = _Request(token_ids, cached.num_tokens)
        if self.run_step(request_id, request, cached):
            self.requests[request_id] = request
            self.num_added += 1

    def advance(self, request_id: str) -> None:
        request = self.requests[request_id]
        if request.num_computed_tokens == len(request.token_ids):
            request.token_ids.append(self.rng.randrange(50))  # the token the last step sampled
        if not self.run_step(request_id, request, None):
            self.free(request_id)  # preempted, to be recomputed later

    def free(self, request_id: str) -> None:
        self.manager.free(request_id)
        del self.requests[request_id]

    def run_step(self, request_id: str, request: _Request, cached: CachedPrefix | None) -> bool:
        num_new_tokens = self.rng.randint(1, len(request.token_ids) - request.num_computed_tokens)
        table = self.manager.allocate(
            request_id, request.token_ids, request.num_computed_tokens, num_new_tokens, cached
        )
        if table is None:
            self.num_refused += 1
            return False
        start = request.num_computed_tokens
        for position in range(start, start + num_new_tokens):
            block_id = table[position // BLOCK_SIZE]
            assert self.manager.pool.ref_count(block_id) == 1, "writing into a shared block"
            self.kv.setdefault(block_id, [None] * BLOCK_SIZE)[position % BLOCK_SIZE] = request.token_ids[
                position
            ]
        request.num_computed_tokens += num_new_tokens
        self.manager.commit(request_id, request.token_ids, request.num_computed_tokens)
        return True

    def check_tables(self) -> None:
        holders: dict[int, list[tuple[str, int]]] = {}
        for request_id, request in self.requests.items():
            table = self.manager.block_table(request_id)
            assert len(table) * BLOCK_SIZE >= request.num_computed_tokens
            for index, block_id in enumerate(table):
                holders.setdefault(block_id, []).append((request_id, index))
        for block_id, block_holders in holders.items():
            if len(block_holders) == 1:
                continue
            # Only a cached prefix block may be shared, at the same position, by requests whose
            # tokens agree up to its end.
            self.num_shared += 1
            assert self.manager.pool.block_hash(block_id) is not None
            (first_id, index), *others = block_holders
            end = (index + 1) * BLOCK_SIZE
            for other_id, other_index in others:
                assert other_index == index
                assert self.requests[other_id].token_ids[:end] == self.requests[first_id].token_ids[:end]


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_random_operations_keep_the_invariants(enable_prefix_caching: bool) -> None:
    sim = _Simulation(random.Random(20240601), enable_prefix_caching)
    for step in range(400):
        choice = sim.rng.random()
        if choice < 0.3 or not sim.requests:
            sim.add(f"r{step}")
        else:
            request_id = sim.rng.choice(sorted(sim.requests))
            too_long = len(sim.requests[request_id].token_ids) >= 24
            if choice < 0.85 and not too_long:
                sim.advance(request_id)
            else:
                sim.free(request_id)
        sim.manager.check_integrity()
        sim.check_tables()
    # The run exercised what it claims to: admissions, pressure, and (when enabled) sharing.
    assert sim.num_added > 50 and sim.num_refused > 0
    assert (sim.num_shared > 0) == enable_prefix_caching
    assert (sim.manager.num_prefix_hits > 0) == enable_prefix_caching
