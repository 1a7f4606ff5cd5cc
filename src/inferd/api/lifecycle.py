"""Drain before stopping: refuse new work, let in-flight requests (streams included) finish."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("inferd.api")


class Lifecycle:
    """Counts requests in flight and says whether the server is draining.

    Only the event loop touches it (the signal handler hops onto the loop first).
    """

    def __init__(self) -> None:
        self.is_draining = False
        self.num_in_flight = 0

    def begin_drain(self) -> None:
        self.is_draining = True
        log.info("draining: %d requests in flight", self.num_in_flight)

    @contextmanager
    def track(self) -> Iterator[None]:
        self.num_in_flight += 1
        try:
            yield
        finally:
            self.num_in_flight -= 1

    async def wait_idle(self, timeout: float, poll_s: float = 0.05) -> bool:
        """Wait until nothing is in flight; False when ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while self.num_in_flight > 0:
            if time.monotonic() >= deadline:
                log.warning("drain timeout: %d requests still in flight", self.num_in_flight)
                return False
            await asyncio.sleep(poll_s)
        return True
