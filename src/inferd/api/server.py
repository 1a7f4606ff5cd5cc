"""uvicorn's server with a drain on the first SIGTERM/SIGINT, and the socket deadlines uvicorn lacks."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from types import FrameType
from typing import Any, ClassVar

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from inferd.api.lifecycle import Lifecycle
from inferd.config import ServerSettings
from inferd.errors import ShuttingDownError

log = logging.getLogger("inferd.api")

# What a cut stream needs to write its error event and [DONE] once the drain is over.
_CUT_GRACE_S = 2.0


def build_server(app: FastAPI, settings: ServerSettings) -> DrainingServer:
    """The server ``inferd serve`` runs: ``app`` behind the connection cap and socket deadlines."""
    deadlines = SocketDeadlines(settings.header_timeout, settings.stream_write_timeout)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(deadlines),
        limit_concurrency=settings.max_connections,
        backlog=settings.backlog,
        timeout_keep_alive=settings.keep_alive_timeout,
        log_level=settings.log_level,
        log_config=None,  # our handler on the root logger formats uvicorn's lines too
        access_log=False,  # the gateway writes one access line per request
        timeout_graceful_shutdown=2,  # the drain before it gave requests their time already
    )
    return DrainingServer(config, app.state.lifecycle, settings.drain_timeout)


class DrainingServer(uvicorn.Server):
    """On the first signal: ``/ready`` turns 503 and new requests get 503 while the port stays open
    (a load balancer sees the 503s, not refused connections); in-flight requests, streams
    included, get ``drain_timeout`` seconds to finish; those still running then are cut (a stream
    gets an error event and [DONE]); then uvicorn's own shutdown runs. A second signal skips the
    rest of the drain."""

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
        if not await self._lifecycle.wait_idle(self._drain_timeout):
            # Cut rather than dropped by uvicorn's shutdown: a stream learns why it ended.
            reason = ShuttingDownError(
                f"the server shut down before this request finished (drain timeout {self._drain_timeout:g}s); "
                "retry on another replica"
            )
            self._lifecycle.cut_all(reason)
            await self._lifecycle.wait_idle(_CUT_GRACE_S)
        log.info("drained; stopping")
        self.should_exit = True


@dataclass(frozen=True, slots=True)
class SocketDeadlines:
    """How long a connection may take to send its headers, and leave a response unread."""

    header_timeout: float
    write_timeout: float


def guarded_protocol(deadlines: SocketDeadlines) -> type[GuardedHttpProtocol]:
    """uvicorn builds one protocol per connection from a class: this one carries the deadlines."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"deadlines": deadlines})


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (pinned: it is what uvicorn's ``auto`` picks with
    uvicorn[standard]) with two deadlines it lacks, so that idle or slow sockets cannot pile up:

    - headers: a connection must send a request's complete headers within ``header_timeout`` of
      connecting or of the request's first byte, else it is closed. The idle time between
      requests is uvicorn's keep-alive timeout.
    - writes: while the transport's buffer is over its high-water mark (the client is not
      reading), a response waits at most ``write_timeout``; then the connection is aborted. uvicorn
      sees the disconnect and the route's stream is cancelled, which aborts its engine request:
      the request stops producing output nobody reads.
    """

    deadlines: ClassVar[SocketDeadlines]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        # Bytes between requests (a new request, or stray CRLFs) start the header clock.
        if self.cycle is None or self.cycle.response_complete:
            self._arm_header_timer()
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()  # a pipelined request, read while the previous one runs

    def on_headers_complete(self) -> None:
        self._header_timer = _cancel(self._header_timer)
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._header_timer = _cancel(self._header_timer)
        self._write_timer = _cancel(self._write_timer)
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.deadlines.write_timeout, self._on_write_timeout)

    def resume_writing(self) -> None:
        self._write_timer = _cancel(self._write_timer)
        super().resume_writing()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:  # the clock runs from the first byte, not the latest
            self._header_timer = self.loop.call_later(self.deadlines.header_timeout, self._on_header_timeout)

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        log.debug(
            "closing %s: no complete request headers in %gs", self.client, self.deadlines.header_timeout
        )
        self.transport.close()

    def _on_write_timeout(self) -> None:
        self._write_timer = None
        path = self.scope.get("path") if self.scope else None
        log.warning(
            "aborting the connection of %s (%s): its client left the response unread for %gs",
            self.client,
            path,
            self.deadlines.write_timeout,
        )
        self.transport.abort()  # close() would wait for the buffer to drain: it never will


def _cancel(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()
    return None
