"""One HTTP request carried between processes, and the ASGI call that runs it on a replica's app.

The ingress reads a request into a ``ForwardedRequest``; the replica runs it through the very
same ASGI app a single server runs (middleware, auth, limits, routes, errors, SSE) and yields the
response as a ``ResponseStart`` followed by body chunks. Plain data: Ray pickles it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

# Per hop, not per message: the ingress frames the body itself.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"trailer"})


@dataclass(slots=True)
class ForwardedRequest:
    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None
    scheme: str = "http"
    http_version: str = "1.1"
    prefix_hashes: tuple[int, ...] = field(default=())  # read by the router, never by the replica
    target_replica: str | None = None  # the router sends it to this replica while it lives


@dataclass(slots=True)
class ResponseStart:
    status: int
    headers: list[tuple[bytes, bytes]]


async def run_asgi(
    app: Any, request: ForwardedRequest, extra_headers: list[tuple[bytes, bytes]]
) -> AsyncIterator[Any]:
    """Run ``app`` on ``request``: yields one ``ResponseStart``, then the body's chunks (bytes).

    Closing the iterator early (the client left, Ray cancelled the call) tells the app
    ``http.disconnect``, as a closed socket would, and then cancels it."""
    messages: asyncio.Queue[dict | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    async def call() -> None:
        try:
            await app(_scope(request), receive, send)
        finally:
            await messages.put(None)

    task = asyncio.create_task(call())
    try:
        async for chunk in _response(messages, extra_headers):
            yield chunk
        await task  # an app that raised after its last byte: surface it
    finally:
        gone.set()
        if not task.done():
            await asyncio.sleep(0)  # let the app see the disconnect and abort its request
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _response(messages: asyncio.Queue, extra_headers: list[tuple[bytes, bytes]]) -> AsyncIterator[Any]:
    while (message := await messages.get()) is not None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in HOP_BY_HOP]
            yield ResponseStart(message["status"], headers + extra_headers)
        elif message["type"] == "http.response.body":
            if message.get("body"):
                yield bytes(message["body"])
            if not message.get("more_body", False):
                return


def _scope(request: ForwardedRequest) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": request.http_version,
        "method": request.method,
        "scheme": request.scheme,
        "path": request.path,
        "raw_path": request.path.encode("latin-1", "replace"),
        "root_path": "",
        "query_string": request.query_string,
        "headers": request.headers,
        "client": request.client,
        "server": None,
        "state": {},
    }
