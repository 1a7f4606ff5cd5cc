"""The served models: names → (kind, engine client), loaded at start or on their first request.

Every servable model has an entry; entries that serve the same weights in the same configuration
share one ``_Engine``, the unit that loads, unloads and counts against the memory budget. The
``ModelPool`` keeps the loaded engines within the budget the memory planner splits: a request for
an engine that is not loaded waits while it loads, and the least recently used unpinned engines
are unloaded first when the plan needs their room. An unload waits for the requests using the
engine (each request holds a lease on its engine until its response ends) unless forced.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from inferd.api.context import current_context
from inferd.api.llm_rerank import LLMRerankClient, start_llm_reranker
from inferd.config import ModelKind, ModelSpec, ServerSettings
from inferd.encoder.client import EncoderClient
from inferd.errors import (
    EngineUnavailableError,
    InsufficientMemoryError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    ModelTooLargeError,
    PermissionDeniedError,
    UnsupportedTaskError,
)
from inferd.hub.resolve import detect_kind, is_causal_lm, resolve_model
from inferd.llm.client import LLMClient
from inferd.memory.plan import MemoryPlan, ModelNeed, describe, gib, plan_device
from inferd.memory.profile import free_memory
from inferd.memory.server import check_plans, kv_policy, model_need, plan_server
from inferd.protocol.models import ModelCard

log = logging.getLogger("inferd.models")

_ROUTE_NAMES = {ModelKind.EMBEDDING: "embeddings", ModelKind.RERANK: "rerank", ModelKind.CHAT: "chat"}

UNLOADED, LOADING, LOADED, UNLOADING = "unloaded", "loading", "loaded", "unloading"

Client = EncoderClient | LLMClient | LLMRerankClient
LLM_CLIENTS = (LLMClient, LLMRerankClient)  # on the LLM engine
# A failed load fails again at once for this long: requests do not each repeat it (and its evictions).
RETRY_FAILED_LOAD_S = 30.0
UNCHANGED = object()  # a request that says nothing about keep-alive leaves the model's as it is


@dataclass(frozen=True, slots=True)
class ServedModel:
    """A loaded model as a request sees it: its name, kind and engine client."""

    name: str
    kind: ModelKind
    source: str
    path: Path
    client: Client
    created: int

    def card(self) -> ModelCard:
        if self.kind is ModelKind.CHAT:
            return ModelCard(
                id=self.name,
                created=self.created,
                kind=self.kind.value,
                max_model_len=self.client.max_model_len,
                ready=self.client.is_running,
                **_llm_precision(self.client.engine.config),
            )
        info = self.client.info
        llm = self.client.llm if isinstance(self.client, LLMRerankClient) else None  # on the LLM engine
        return ModelCard(
            id=self.name,
            created=self.created,
            kind=self.kind.value,
            max_input_tokens=info.max_input_tokens,
            dimensions=info.dimensions if self.kind is ModelKind.EMBEDDING else None,
            rerank_method=info.scoring if self.kind is ModelKind.RERANK else None,
            ready=self.client.is_running,
            **(_llm_precision(llm.engine.config) if llm is not None else {}),
        )


def _llm_precision(config) -> dict[str, str]:
    """An LLM engine's precision as served (the server's own int8 choices resolved at load)."""
    return {"dtype": config.dtype, "quantization": config.quantization, "kv_cache_dtype": config.cache_dtype}


@dataclass(eq=False)
class _Engine:
    """One set of weights in one configuration: what loads, unloads and counts against the budget."""

    spec: ModelSpec  # the first entry's: how to load it
    path: Path
    files_kind: ModelKind  # what the weights are (chat: a causal LM, run by the LLM engine)
    served_kind: ModelKind  # what they serve (a causal LM may serve rerank)
    names: list[str] = field(default_factory=list)
    kinds: list[ModelKind] = field(default_factory=list)  # each entry's, as it is served
    need: ModelNeed | None = None
    client: Client | None = None
    state: str = UNLOADED
    kv_cache_bytes: int = 0
    pinned: bool = False
    keep_alive: float | None = None  # seconds idle before unloading; None: no expiry
    expires_at: float | None = None  # wall-clock time, while idle with a keep-alive
    last_used: float = 0.0
    in_flight: int = 0
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # set while loaded or unloaded
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while no request uses it
    expiry: asyncio.TimerHandle | None = None
    load_task: asyncio.Task | None = None
    load_error: str | None = None  # why the last load failed (cleared by a load that works)
    failed_at: float = 0.0

    def __post_init__(self) -> None:
        self.settled.set()
        self.idle.set()

    @property
    def name(self) -> str:
        return ", ".join(self.names)

    @property
    def resident_bytes(self) -> int:
        if self.state == UNLOADED or self.need is None:
            return 0
        return self.need.fixed_bytes + self.kv_cache_bytes

    def resident_need(self) -> ModelNeed:
        """This loaded engine in a plan: fixed bytes, its KV cache included and no longer shared out."""
        assert self.need is not None
        return replace(
            self.need,
            activation_bytes=self.need.activation_bytes + self.kv_cache_bytes,
            kv_bytes_per_token=0,
            load_peak_bytes=0,
        )

    def set_state(self, state: str) -> None:
        self.state = state
        if state in (LOADED, UNLOADED):
            self.settled.set()
        else:
            self.settled.clear()


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    kind: ModelKind
    source: str
    engine: _Engine
    created: int

    def served(self) -> ServedModel:
        assert self.engine.client is not None
        return ServedModel(
            self.name, self.kind, self.source, self.engine.path, self.engine.client, self.created
        )

    def card(self) -> ModelCard:
        if self.engine.state == LOADED:
            card = self.served().card()
        else:
            card = ModelCard(id=self.name, created=self.created, kind=self.kind.value, ready=False)
        card.state = self.engine.state
        return card

    def status(self) -> dict:
        engine = self.engine
        return {
            "id": self.name,
            "kind": self.kind.value,
            "state": engine.state,
            "pinned": engine.pinned,
            "resident_bytes": engine.resident_bytes,
            "expires_at": engine.expires_at,
            "keep_alive": engine.keep_alive,
            "in_flight": engine.in_flight,
            "source": self.source,
        }


class PoolListener:
    """What the pool tells the metrics: engines starting and stopping (plain methods, no Prometheus)."""

    def on_loaded(self, names: list[str], client: Client, seconds: float, resident_bytes: int) -> None: ...

    def on_unloaded(self, names: list[str], reason: str) -> None: ...


class ModelPool:
    """The servable models and the engines loaded for them, within one memory budget per device."""

    def __init__(
        self,
        entries: list[_Entry],
        settings: ServerSettings,
        budgets: dict[str, int],
        starter: Callable[[_Engine, int | None], Client],
        engine_index: dict[tuple, _Engine] | None = None,
    ) -> None:
        self.entries = {e.name: e for e in entries}
        self._engine_index = engine_index if engine_index is not None else {}
        self._settings = settings
        self._policy = kv_policy(settings)
        self._budgets = budgets
        self._start = starter
        self._lock = asyncio.Lock()  # one load or unload at a time
        self._tasks: set[asyncio.Task] = set()  # unloads and expiries in flight
        self._keep_alive = settings.keep_alive_seconds()
        self.listener = PoolListener()
        for engine in self.engines():
            engine.keep_alive = self._keep_alive
            engine.pinned = any(name in settings.pin for name in engine.names)

    def engines(self) -> list[_Engine]:
        return list({id(e.engine): e.engine for e in self.entries.values()}.values())

    def loaded(self) -> list[_Engine]:
        """The engines that hold (or are taking) memory."""
        return [e for e in self.engines() if e.state != UNLOADED]

    # -- requests ---------------------------------------------------------------------------

    async def acquire(self, entry: _Entry, keep_alive: float | object | None = UNCHANGED) -> ServedModel:
        """The entry's model, loaded; the current request holds a lease on it until it ends."""
        engine = entry.engine
        while True:
            if engine.state == LOADED:
                if engine.client is not None and engine.client.has_failed:
                    raise EngineUnavailableError(f"the engine of {entry.name} has failed; restart the server")
                break
            if engine.state == UNLOADED:
                await self._loaded(engine)
            else:
                await engine.settled.wait()
        if keep_alive is not UNCHANGED:
            engine.keep_alive = keep_alive  # type: ignore[assignment]
        self._lease(engine)
        return entry.served()

    def _lease(self, engine: _Engine) -> None:
        context = current_context()
        engine.last_used = time.monotonic()
        self._cancel_expiry(engine)
        if context is None:  # outside an HTTP request (tests, start-up): nothing to release
            self._arm_expiry(engine)
            return
        engine.in_flight += 1
        engine.idle.clear()
        context.on_finish.append(lambda: self._release(engine))

    def _release(self, engine: _Engine) -> None:
        engine.in_flight -= 1
        engine.last_used = time.monotonic()
        if engine.in_flight == 0:
            engine.idle.set()
            self._arm_expiry(engine)

    def _arm_expiry(self, engine: _Engine) -> None:
        if engine.keep_alive is None or engine.pinned or engine.state != LOADED or engine.in_flight:
            return
        engine.expires_at = time.time() + engine.keep_alive
        loop = asyncio.get_running_loop()

        def fire() -> None:
            # Kept until it ends: the loop holds only weak references to tasks.
            task = loop.create_task(self._expire(engine, handle))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        handle = engine.expiry = loop.call_later(engine.keep_alive, fire)

    def _cancel_expiry(self, engine: _Engine) -> None:
        if engine.expiry is not None:
            engine.expiry.cancel()
            engine.expiry = None
        engine.expires_at = None

    async def _expire(self, engine: _Engine, handle: asyncio.TimerHandle) -> None:
        async with self._lock:
            expired = engine.state == LOADED and not engine.in_flight and not engine.pinned
            if not (expired and engine.expiry is handle):  # a newer timer (or none) replaced it
                return
            self._begin_unload(engine)
        await self._unloaded(engine, reason="expired")

    # -- admin ------------------------------------------------------------------------------

    async def load(
        self, entry: _Entry, *, pin: bool | None = None, keep_alive: float | object | None = UNCHANGED
    ):
        engine = entry.engine
        engine.load_error = None  # an operator's load retries a failed one at once
        while engine.state != LOADED:
            if engine.state == UNLOADED:
                await self._loaded(engine)
            else:
                await engine.settled.wait()
        if pin is not None:
            self.pin(entry, pin)
        if keep_alive is not UNCHANGED:
            engine.keep_alive = keep_alive  # type: ignore[assignment]
        engine.last_used = time.monotonic()
        self._cancel_expiry(engine)
        self._arm_expiry(engine)

    async def unload(self, entry: _Entry, *, force: bool = False, wait: bool = True) -> None:
        """Unload the model once its requests end (``force``: end them now). A model still loading is
        unloaded when it has loaded; one being unloaded is waited for. ``wait=False`` returns once no
        new request can start on it (Ollama's keep_alive 0: the unload goes on in the background)."""
        engine = entry.engine
        while True:
            async with self._lock:
                if engine.state == UNLOADED:
                    return
                if engine.state == LOADED:
                    self._begin_unload(engine, force=force)
                    break
                if engine.state == UNLOADING and force:  # a graceful unload under way: end its requests
                    self._fail_requests(engine)
            await engine.settled.wait()
        # Outside the lock: other models load meanwhile, those that need this one's room wait for it.
        task = self._unload_task(engine, reason="unloaded")
        if wait:
            await asyncio.shield(task)

    async def _unloaded(self, engine: _Engine, *, reason: str) -> None:
        await asyncio.shield(self._unload_task(engine, reason=reason))

    def _unload_task(self, engine: _Engine, *, reason: str) -> asyncio.Task:
        """Finish an unload begun under the lock in a task of its own: a caller cut meanwhile (its
        request timed out) must not leave the engine half-unloaded, blocking every request for it."""
        task = asyncio.get_running_loop().create_task(self._finish_unload(engine, reason=reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def add_registered(self, name: str) -> None:
        """A model registered while the server runs (Ollama's /api/pull) becomes servable by name."""
        if name in self.entries or not self._settings.serve_registered:
            return
        from inferd.hub.registry import ModelRegistry

        item = ModelRegistry(self._settings.cache_dir).get(name)
        if item is None:
            return
        spec = ModelSpec(source=item.name, kind=ModelKind(item.kind) if item.kind else None)
        entry = _entry(spec, self._settings, self._engine_index)
        if entry.engine.names == [name]:  # a new engine: the server's defaults
            entry.engine.keep_alive = self._keep_alive
        self.entries[name] = entry

    def remove(self, name: str) -> None:
        """Forget a servable model that is not loaded (its files are being deleted)."""
        entry = self.entries.get(name)
        if entry is None:
            return
        if entry.engine.state != UNLOADED:
            raise InvalidRequestError(f"the model {name!r} is loaded; unload it first", param="model")
        del self.entries[name]
        entry.engine.names.remove(name)

    def pin(self, entry: _Entry, pinned: bool) -> None:
        engine = entry.engine
        engine.pinned = pinned
        self._cancel_expiry(engine)
        self._arm_expiry(engine)

    # -- loading and unloading --------------------------------------------------------------

    async def _loaded(self, engine: _Engine) -> None:
        """Load the engine in a task of its own that every request for it awaits: a request that is
        cancelled meanwhile (its client left) leaves the load to finish for the others, rather than
        abandoning a half-started engine."""
        task = engine.load_task
        if task is None or task.done():
            task = engine.load_task = asyncio.get_running_loop().create_task(self._load(engine))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # Nobody may take a lease on what loads: its keep-alive must still run. (Not armed when
            # the load ends, or a keep-alive of 0 would unload it before its own request could start.)
            task.add_done_callback(
                lambda done: done.cancelled() or done.exception() or self._arm_expiry(engine)
            )
            raise

    async def _load(self, engine: _Engine) -> None:
        """Plan under the lock; wait for the evictions and start the engine outside it, so that other
        models keep loading, unloading and expiring meanwhile. A loading engine counts at its planned
        size from the moment it is planned, so two loads never plan the same room."""
        while True:
            async with self._lock:
                if engine.state != UNLOADED:
                    return  # another request loaded it meanwhile
                self._check_failed(engine)
                if engine.need is None:
                    engine.need = await self._read_need(engine)
                plan, victims, settling = self._make_room(engine)
                if not victims and not settling:
                    kv = plan.kv_cache_bytes if engine.need.is_llm else None
                    engine.kv_cache_bytes = kv or 0
                    engine.set_state(LOADING)
                    break
                for victim in victims:
                    self._begin_unload(victim)
            # Every eviction at once (each waits for its own requests), and loads or unloads under way
            # whose room is needed; then plan again.
            await asyncio.gather(
                *(self._unloaded(victim, reason="evicted") for victim in victims),
                *(other.settled.wait() for other in settling),
            )
        started = time.monotonic()
        try:
            client = await asyncio.to_thread(self._start_engine, engine, kv)
        except BaseException as exc:
            engine.kv_cache_bytes = 0
            engine.set_state(UNLOADED)
            if isinstance(exc, Exception) and not isinstance(exc, ModelLoadError):
                log.exception("loading %s failed", engine.name)
                exc = ModelLoadError(f"loading the model {engine.name} failed: {exc}")
            if isinstance(exc, ModelLoadError):
                engine.load_error, engine.failed_at = exc.message, time.monotonic()
            raise exc from None
        engine.client = client
        engine.load_error = None
        engine.set_state(LOADED)
        seconds = time.monotonic() - started
        log.info("loaded %s in %.1fs (%s)", engine.name, seconds, gib(engine.resident_bytes))
        self.listener.on_loaded(engine.names, client, seconds, engine.resident_bytes)
        engine.last_used = time.monotonic()

    async def _read_need(self, engine: _Engine) -> ModelNeed:
        """What the model needs, from its files; files that cannot be read fail the load like a start."""
        try:
            return await asyncio.to_thread(model_need, engine.spec, self._settings, engine.path)
        except Exception as exc:  # noqa: BLE001 - whatever the files hold, it is this model's failure
            message = exc.message if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
            error = ModelLoadError(
                f"loading the model {engine.name} failed: its files cannot be read ({message})"
            )
            engine.load_error, engine.failed_at = error.message, time.monotonic()
            raise error from None

    def _check_failed(self, engine: _Engine) -> None:
        """A model whose load just failed fails again at once for a while, rather than every request
        repeating the load (and the evictions before it)."""
        if engine.load_error is None:
            return
        ago = time.monotonic() - engine.failed_at
        if ago < RETRY_FAILED_LOAD_S:
            raise ModelLoadError(
                f"{engine.load_error} ({ago:.0f}s ago; retried after {RETRY_FAILED_LOAD_S:.0f}s, or now with "
                "POST /admin/models/load)"
            )

    def _start_engine(self, engine: _Engine, kv_cache_bytes: int | None) -> Client:
        try:
            return self._start(engine, kv_cache_bytes)
        finally:
            _refreeze()

    def _make_room(self, engine: _Engine) -> tuple[MemoryPlan, list[_Engine], list[_Engine]]:
        """The plan with ``engine`` loaded, the engines to unload first (least recently used), and
        the engines loading or unloading now whose outcome is needed first (then the caller asks
        again)."""
        need = engine.need
        assert need is not None
        budget = self._budget(need.device)
        alone = plan_device([need], budget, self._policy, need.device)
        if not alone.fits:
            raise ModelTooLargeError(
                f"the model {engine.name} can never be loaded within the memory budget, even with every "
                f"other model unloaded:\n" + "\n".join([*alone.problems, *describe((alone,))]),
                param="model",
            )
        resident = [e for e in self.loaded() if e is not engine]
        victims: list[_Engine] = []
        limit = self._settings.max_loaded_models
        while True:
            kept = [e for e in resident if e not in victims]
            on_device = [
                e.resident_need() for e in kept if e.need is not None and e.need.device == need.device
            ]
            plan = plan_device([*on_device, need], budget, self._policy, need.device)
            if plan.fits and (not limit or len(kept) < limit):
                return plan, victims, []
            # Idle engines first, then the least recently used.
            # Only a model on the same device frees room for this one (any model, for the count).
            same_device = not plan.fits
            candidates = sorted(
                (
                    e
                    for e in kept
                    if not e.pinned
                    and e.state == LOADED
                    and not (same_device and e.need is not None and e.need.device != need.device)
                ),
                key=lambda e: (e.in_flight > 0, e.last_used),
            )
            settling = [e for e in kept if e.state in (LOADING, UNLOADING)]
            if not candidates and settling:
                return plan, victims, settling
            if not candidates:
                held = (
                    ", ".join(f"{e.name} ({gib(e.resident_bytes)}, pinned)" for e in kept if e.pinned)
                    or "none"
                )
                reason = (
                    f"--max-loaded-models {limit} are loaded"
                    if plan.fits
                    else f"it needs {gib(need.fixed_bytes)} before any KV cache, the budget on "
                    f"{need.device} is {gib(budget)}"
                )
                raise InsufficientMemoryError(
                    f"the model {engine.name} cannot be loaded now: {reason}, and the loaded models that "
                    f"cannot be unloaded hold the rest: {held}; unpin or unload one (POST /admin/models/unload)",
                    param="model",
                )
            victims.append(candidates[0])

    def _budget(self, device: str) -> int:
        if device not in self._budgets:
            resident = sum(e.resident_bytes for e in self.loaded() if e.need and e.need.device == device)
            self._budgets[device] = self._settings.memory_budget or free_memory(device) + resident
        return self._budgets[device]

    def _begin_unload(self, engine: _Engine, *, force: bool = False) -> None:
        """Stop new requests from starting on a loaded engine (under the lock); with ``force`` end
        the requests in flight too."""
        self._cancel_expiry(engine)
        engine.set_state(UNLOADING)
        if force:
            self._fail_requests(engine)

    def _fail_requests(self, engine: _Engine) -> None:
        """End an unloading engine's requests now (LLM streams; encoder batches are short and finish)."""
        if isinstance(engine.client, LLM_CLIENTS):
            engine.client.fail_all(EngineUnavailableError(f"the model {engine.name} was unloaded"))

    async def _finish_unload(self, engine: _Engine, *, reason: str) -> None:
        """Wait for the engine's requests to end, then free it; it ends unloaded whatever happens."""
        try:
            await engine.idle.wait()
            client, engine.client = engine.client, None
            if client is not None:
                await asyncio.to_thread(_close, client)
        finally:
            engine.client = None
            engine.kv_cache_bytes = 0
            engine.set_state(UNLOADED)
        log.info("unloaded %s (%s)", engine.name, reason)
        self.listener.on_unloaded(engine.names, reason)

    def start_timers(self) -> None:
        """Arm the keep-alive of the models loaded at start (on the event loop)."""
        for engine in self.loaded():
            self._arm_expiry(engine)

    def close(self) -> None:
        for engine in self.engines():
            if engine.client is not None:
                engine.client.close()
                engine.client = None
                engine.set_state(UNLOADED)


def _close(client: Client) -> None:
    client.close()
    del client
    _refreeze()
    import torch  # loaded by then: the engines run on it

    if torch.cuda.is_available():
        # Hand the freed memory back to the device: the next model sizes its KV cache from what the
        # device reports free, not from torch's cache.
        torch.cuda.empty_cache()


def _refreeze() -> None:
    """Objects alive after loading are frozen out of the collector's sight (see app.py); an unloaded
    model's objects must be collectable again, and a new model's frozen."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class ModelTable:
    """Lookup by name and kind; a missing name picks the first model of that kind (a loaded one
    first). ``visible_to`` gives the view one API key may use: other models look as if they did
    not exist."""

    def __init__(self, pool: ModelPool, allowed: frozenset[str] | None = None) -> None:
        self.pool = pool
        self._allowed = allowed

    def visible_to(self, allowed: frozenset[str] | None) -> ModelTable:
        return self if allowed is None else ModelTable(self.pool, allowed)

    def _is_visible(self, name: str) -> bool:
        return self._allowed is None or name in self._allowed

    def entries(self) -> Iterator[_Entry]:
        return (e for e in self.pool.entries.values() if self._is_visible(e.name))

    def __iter__(self) -> Iterator[ServedModel]:
        """The loaded models."""
        return (e.served() for e in self.entries() if e.engine.state == LOADED and e.engine.client)

    def cards(self) -> list[ModelCard]:
        return [e.card() for e in self.entries()]

    async def get(
        self, name: str | None, kind: ModelKind, keep_alive: float | object | None = UNCHANGED
    ) -> ServedModel:
        """The model, loaded (waiting while it loads); the request holds it until its response ends."""
        entry = self.entry(name, kind)
        context = current_context()
        if context is not None:
            context.model = entry.name
        return await self.pool.acquire(entry, keep_alive)

    def entry(self, name: str | None, kind: ModelKind | None = None) -> _Entry:
        if name is None:
            assert kind is not None
            of_kind = [e for e in self.entries() if e.kind is kind]
            for entry in sorted(of_kind, key=lambda e: e.engine.state != LOADED):
                return entry
            if any(e.kind is kind for e in self.pool.entries.values()):
                raise PermissionDeniedError(f"this API key may not use the {_ROUTE_NAMES[kind]} models")
            raise ModelNotFoundError(f"no {_ROUTE_NAMES[kind]} model is served", param="model")
        entry = self.pool.entries.get(name)
        if entry is None or not self._is_visible(name):
            served = ", ".join(e.name for e in self.entries()) or "none"
            access = "" if self._allowed is None else " or you do not have access to it"
            raise ModelNotFoundError(
                f"the model {name!r} does not exist{access}; served models: {served}", param="model"
            )
        if kind is not None and entry.kind is not kind:
            raise UnsupportedTaskError(
                f"the model {name!r} is a {entry.kind.value} model and cannot serve "
                f"{_ROUTE_NAMES[kind]} requests",
                param="model",
            )
        return entry

    def close(self) -> None:
        self.pool.close()


def load_model_table(settings: ServerSettings, loop: asyncio.AbstractEventLoop) -> ModelTable:
    """Resolve every servable model and load the configured ones (``--model``); the same weights
    served twice are loaded once. Models of ``--models-dir`` and the registry load on demand.

    The memory plan of the configured models comes first: nothing loads when they do not fit, and
    each LLM's KV cache gets the planned share (checked again against what is free after its weights
    load). Later loads are planned against the same budget with what is loaded then."""
    plans = plan_server(settings)
    for line in describe(plans):
        log.info("%s", line)
    check_plans(plans)
    budgets = {plan.device: plan.budget_bytes for plan in plans}
    planned_kv = {plan.device: plan.kv_cache_bytes for plan in plans}
    engines: dict[tuple, _Engine] = {}
    entries = [_entry(spec, settings, engines) for spec in settings.model]
    configured = {e.name for e in entries}
    for spec in _on_demand_specs(settings, configured):
        try:
            entries.append(_entry(spec, settings, engines))
        except ModelLoadError as exc:
            log.warning("%s is not servable: %s", spec.served_name, exc)
    unknown = sorted(set(settings.pin) - {e.name for e in entries})
    if unknown:
        raise ModelLoadError(f"--pin names models that are not served: {', '.join(unknown)}")

    def start(engine: _Engine, kv_cache_bytes: int | None) -> Client:
        return _start_client(engine, settings, loop, kv_cache_bytes)

    pool = ModelPool(entries, settings, budgets, start, engines)
    for entry in entries[: len(settings.model)]:
        engine = entry.engine
        if engine.state == LOADED:
            continue
        engine.need = model_need(engine.spec, settings, engine.path)
        kv = planned_kv.get(engine.need.device) if engine.need.is_llm else None
        engine.client = start(engine, kv)
        engine.kv_cache_bytes = kv or 0
        engine.last_used = time.monotonic()
        engine.set_state(LOADED)
        log.info("serving %s (%s) from %s", entry.name, entry.kind.value, engine.path)
    for entry in entries[len(settings.model) :]:
        log.info("servable on demand: %s (%s) from %s", entry.name, entry.kind.value, entry.engine.path)
    return ModelTable(pool)


def _on_demand_specs(settings: ServerSettings, taken: set[str]) -> Iterator[ModelSpec]:
    """Models servable by name without loading at start: --models-dir's, then registered ones."""
    names = set(taken)
    if settings.models_dir:
        folder = Path(settings.models_dir).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"--models-dir {folder} is not a folder")
        for child in sorted(folder.iterdir()):
            is_model = (child.is_dir() and (child / "config.json").is_file()) or child.suffix == ".gguf"
            name = child.stem if child.suffix == ".gguf" else child.name
            if is_model and name not in names:
                names.add(name)
                yield ModelSpec(source=str(child), alias=name)
    if settings.serve_registered:
        from inferd.hub.registry import ModelRegistry

        try:
            registered = ModelRegistry(settings.cache_dir).entries()
        except ModelLoadError as exc:
            log.warning("%s", exc)
            registered = []
        for item in registered:
            if item.name not in names:
                names.add(item.name)
                yield ModelSpec(source=item.name, kind=ModelKind(item.kind) if item.kind else None)


def _entry(spec: ModelSpec, settings: ServerSettings, engines: dict[tuple, _Engine]) -> _Entry:
    resolved = resolve_model(spec.source, spec.kind, cache_dir=settings.cache_dir)
    on_llm_engine = is_causal_lm(resolved.path)
    files_kind = ModelKind.CHAT if on_llm_engine else detect_kind(resolved.path)
    wrong = ModelKind.EMBEDDING if on_llm_engine else ModelKind.CHAT
    if resolved.kind is wrong:
        held = "a causal LM" if on_llm_engine else f"a {files_kind.value} model"
        raise ModelLoadError(f"{spec.source} holds {held}; it cannot be served as {resolved.kind.value}")
    # A causal LM serves chat or, wrapped, rerank: two engines. Encoders serve both from one.
    served_kind = resolved.kind if on_llm_engine else files_kind
    config = settings.llm_config(spec) if on_llm_engine else settings.encoder_config(spec)
    key = (resolved.path, served_kind, config)
    engine = engines.get(key)
    if engine is None:
        engine = engines[key] = _Engine(
            spec=spec, path=resolved.path, files_kind=files_kind, served_kind=served_kind
        )
    engine.names.append(spec.served_name)
    engine.kinds.append(resolved.kind)
    return _Entry(spec.served_name, resolved.kind, spec.source, engine, int(time.time()))


def _start_client(
    engine: _Engine, settings: ServerSettings, loop: asyncio.AbstractEventLoop, kv_cache_bytes: int | None
) -> Client:
    spec = engine.spec
    if engine.files_kind is ModelKind.CHAT:
        config = replace(settings.llm_config(spec), kv_cache_memory=kv_cache_bytes)
        if engine.served_kind is ModelKind.RERANK:
            return start_llm_reranker(engine.path, config, loop, limits=settings.encoder_config(spec))
        return LLMClient.start(engine.path, config, loop)
    client = EncoderClient.start(engine.path, engine.files_kind, settings.encoder_config(spec))
    if ModelKind.EMBEDDING in engine.kinds and not client.can_embed:
        client.close()
        raise ModelLoadError(f"{spec.source} is a cross-encoder; it can rerank but not embed")
    return client
