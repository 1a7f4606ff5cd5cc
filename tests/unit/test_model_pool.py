"""The model pool's own bookkeeping, on fake engines (no model loads): unloads that outlive the
request that asked for them, keep-alive timers, and loads that plan the same room."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from inferd.api import model_table as mt
from inferd.api.context import RequestContext, enter, leave
from inferd.config import ModelKind, ModelSpec, load_settings
from inferd.memory.plan import ModelNeed

MiB = 2**20


class FakeClient:
    has_failed = False
    is_running = True

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _pool(names: list[str], budget: int, loaded: tuple[str, ...] = (), **settings):
    """Engines of 100 MiB each (an encoder's need), ``loaded`` ones loaded; the budget in bytes."""
    entries = []
    for name in names:
        engine = mt._Engine(
            spec=ModelSpec(source=name),
            path=Path("/models") / name,
            files_kind=ModelKind.EMBEDDING,
            served_kind=ModelKind.EMBEDDING,
            names=[name],
            kinds=[ModelKind.EMBEDDING],
        )
        engine.need = ModelNeed(name, "cpu", "float32", 60 * MiB, 30 * MiB, 10 * MiB)
        if name in loaded:
            engine.client = FakeClient()
            engine.set_state(mt.LOADED)
        entries.append(mt._Entry(name, ModelKind.EMBEDDING, name, engine, 0))
    starts: list[str] = []

    def start(engine, kv_cache_bytes):
        starts.append(engine.name)
        return FakeClient()

    pool = mt.ModelPool(entries, load_settings({"model": ["unused"], **settings}), {"cpu": budget}, start)
    return pool, {e.name: e for e in entries}, starts


async def _lease(pool, entry) -> RequestContext:
    """Take a request's lease on ``entry`` as a route does; release it with _end(context)."""
    context = RequestContext("r", "POST", "/v1/embeddings")
    token = enter(context)
    try:
        await pool.acquire(entry)
    finally:
        leave(token)
    return context


def _end(context: RequestContext) -> None:
    for release in context.on_finish:
        release()


async def test_an_unload_whose_caller_is_cancelled_still_finishes():
    pool, entries, _ = _pool(["a"], 1000 * MiB, loaded=("a",))
    engine, client = entries["a"].engine, entries["a"].engine.client
    request = await _lease(pool, entries["a"])
    unload = asyncio.create_task(pool.unload(entries["a"]))
    await asyncio.sleep(0.01)
    assert engine.state == mt.UNLOADING
    unload.cancel()  # the admin request was cut (its timeout): the unload must go on
    with pytest.raises(asyncio.CancelledError):
        await unload
    _end(request)
    await asyncio.wait_for(engine.settled.wait(), 5)
    assert engine.state == mt.UNLOADED and client.closed


async def test_eviction_waits_for_the_busy_model_outside_the_lock():
    """Loading c needs b's room, and b is busy: c waits for b's request, while a (idle, loaded) can
    still be unloaded by an operator meanwhile (the pool lock is not held across the wait)."""
    pool, entries, starts = _pool(["a", "b", "c"], 250 * MiB, loaded=("a", "b"))
    entries["a"].engine.pinned = True
    request = await _lease(pool, entries["b"])
    load_c = asyncio.create_task(pool.acquire(entries["c"]))
    await asyncio.sleep(0.01)
    assert entries["b"].engine.state == mt.UNLOADING and entries["c"].engine.state == mt.UNLOADED
    entries["a"].engine.pinned = False
    await asyncio.wait_for(pool.unload(entries["a"]), 1)  # not blocked behind c's load
    _end(request)
    await asyncio.wait_for(load_c, 5)
    assert [e.engine.state for e in entries.values()] == [mt.UNLOADED, mt.UNLOADED, mt.LOADED]
    assert starts == ["c"]


async def test_a_stale_keep_alive_timer_does_not_unload_a_model_just_used():
    pool, entries, _ = _pool(["a"], 1000 * MiB, loaded=("a",), keep_alive="50ms")
    engine = entries["a"].engine
    engine.keep_alive = 0.05
    pool.start_timers()
    first = engine.expiry
    async with pool._lock:  # the timer fires while the lock is busy ...
        await asyncio.sleep(0.1)
        _end(await _lease(pool, entries["a"]))  # ... and a request arms a new one meanwhile
        engine.keep_alive = 60
        _end(await _lease(pool, entries["a"]))
    await asyncio.sleep(0.05)
    assert engine.expiry is not first and engine.state == mt.LOADED


async def test_two_loads_never_plan_the_same_room():
    """Budget for two, a pinned: c and d are asked for at once. The second load must not plan the
    room the first is loading into: it waits for c to load, then evicts it (c's caller held no lease)."""
    pool, entries, starts = _pool(["a", "c", "d"], 220 * MiB, loaded=("a",))
    entries["a"].engine.pinned = True
    await asyncio.gather(pool.acquire(entries["c"]), pool.acquire(entries["d"]))
    assert starts == ["c", "d"]
    assert [e.engine.state for e in entries.values()] == [mt.LOADED, mt.UNLOADED, mt.LOADED]


async def test_keep_alive_zero_does_not_unload_a_model_before_its_request_starts():
    """keep_alive 0 unloads once idle: the request that loads the model must still get to use it
    (it used to be unloaded as its load ended, the request loading it again, forever)."""
    pool, entries, starts = _pool(["a"], 1000 * MiB)
    entries["a"].engine.keep_alive = 0
    for _ in range(2):
        request = await asyncio.wait_for(_lease(pool, entries["a"]), 2)
        assert entries["a"].engine.state == mt.LOADED
        _end(request)
        await asyncio.wait_for(_settled_unloaded(entries["a"].engine), 2)
    assert starts == ["a", "a"]


async def _settled_unloaded(engine) -> None:
    while engine.state != mt.UNLOADED:
        await asyncio.sleep(0.005)
