"""End-to-end cancellation: a client that disconnects cancels the engine work done for it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; cancel it (and raise ClientDisconnected) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        # Wait for the work to wind down (its engine request closed) before the caller goes on: a
        # timeout's 504 then means the engine has let go of the request.
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise ClientDisconnected


async def _disconnect(request: Request) -> None:
    # The body has been read by now, so the next message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
