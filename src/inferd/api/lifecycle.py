"""Drain before stopping: refuse new work, let in-flight requests (streams included) finish, and
end cleanly the ones still running when the drain's time is up."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

from inferd.errors import InferdError

log = logging.getLogger("inferd.api")


class RequestCut(Exception):
    """The request was ended from outside its route: its timeout passed or the drain ran out."""

    def __init__(self, reason: InferdError) -> None:
        super().__init__(reason.message)
        self.reason = reason


class Flight:
    """One request in flight. A deadline or the drain can cut its work: the task running it is
    cancelled, as ``asyncio.timeout`` does it (no extra task per request), which cancels the route
    and through it the engine request; the gateway then still answers, with a 5xx body when
    nothing was sent yet, or a last event for a stream."""

    __slots__ = ("_reason", "_task", "_timers")

    def __init__(self) -> None:
        self._reason: InferdError | None = None
        self._task: asyncio.Task | None = None
        self._timers: list[asyncio.TimerHandle] = []

    def cut_after(self, seconds: float, reason: InferdError) -> asyncio.TimerHandle:
        """Cut the work with ``reason`` unless it ends (or the handle is cancelled) first."""
        timer = asyncio.get_running_loop().call_later(seconds, self.cut, reason)
        self._timers.append(timer)
        return timer

    def cut(self, reason: InferdError) -> None:
        """End the work with ``reason``; the first reason wins."""
        if self._reason is not None:
            return
        self._reason = reason
        if self._task is not None:
            self._task.cancel()

    async def run(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the calling task; RequestCut when it was cut."""
        if self._reason is not None:
            work.close()  # cut before it started: nothing to undo
            raise RequestCut(self._reason)
        self._task = task = asyncio.current_task()
        try:
            await work
        except asyncio.CancelledError:
            if self._reason is None:
                raise  # someone else's cancellation (the server stopping): theirs to handle
            _uncancel(task)  # ours, and answered by the caller
            raise RequestCut(self._reason) from None
        finally:
            self._task = None  # a cut from now on has nothing left to cancel

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()


def _uncancel(task: asyncio.Task | None) -> None:
    uncancel = getattr(task, "uncancel", None)  # Python 3.11+: keeps cancelling() truthful
    if uncancel is not None:
        uncancel()


class Lifecycle:
    """Counts requests in flight and says whether the server is draining.

    Only the event loop touches it (the signal handler hops onto the loop first).
    """

    def __init__(self) -> None:
        self.is_draining = False
        self._flights: set[Flight] = set()

    @property
    def num_in_flight(self) -> int:
        return len(self._flights)

    def begin_drain(self) -> None:
        self.is_draining = True
        log.info("draining: %d requests in flight", self.num_in_flight)

    @contextmanager
    def track(self) -> Iterator[Flight]:
        flight = Flight()
        self._flights.add(flight)
        try:
            yield flight
        finally:
            flight.close()
            self._flights.discard(flight)

    def cut_all(self, reason: InferdError) -> None:
        """End every request in flight with ``reason`` (each answers it in its own task)."""
        for flight in list(self._flights):
            flight.cut(reason)

    async def wait_idle(self, timeout: float, poll_s: float = 0.05) -> bool:
        """Wait until nothing is in flight; False when ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while self._flights:
            if time.monotonic() >= deadline:
                log.warning("drain timeout: %d requests still in flight", self.num_in_flight)
                return False
            await asyncio.sleep(poll_s)
        return True
