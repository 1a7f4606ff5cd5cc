"""uvicorn's server with a drain: the first SIGTERM/SIGINT stops new work before stopping the process."""

from __future__ import annotations

import asyncio
import logging
from types import FrameType

import uvicorn

from inferd.api.lifecycle import Lifecycle

log = logging.getLogger("inferd.api")


class DrainingServer(uvicorn.Server):
    """On the first signal: ``/ready`` turns 503 and new requests get 503 while the port stays open
    (a load balancer sees the 503s, not refused connections); in-flight requests, streams
    included, get ``drain_timeout`` seconds to finish; then uvicorn's own shutdown runs. A second
    signal skips the rest of the drain."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_timeout: float) -> None:
        super().__init__(config)
        self._lifecycle = lifecycle
        self._drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or self._lifecycle.is_draining:
            super().handle_exit(sig, frame)
            return
        self._lifecycle.is_draining = True  # at once: the loop may answer a request before the hop
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._lifecycle.begin_drain()
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        await self._lifecycle.wait_idle(self._drain_timeout)
        log.info("drained; stopping")
        self.should_exit = True
