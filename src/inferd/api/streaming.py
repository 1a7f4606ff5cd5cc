"""The only SSE writer: ``data: {json}`` events, an error event if the stream fails, then [DONE]."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import orjson
from starlette.responses import StreamingResponse

from inferd.api.errors import openai_error
from inferd.errors import InferdError

log = logging.getLogger("inferd.api")


def sse_response(events: AsyncIterator[dict]) -> StreamingResponse:
    return StreamingResponse(
        _encode(events),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _encode(events: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield b"data: " + orjson.dumps(event) + b"\n\n"
    except InferdError as exc:
        yield error_event(exc)
    yield DONE


DONE = b"data: [DONE]\n\n"
_MERGE_QUEUE_SIZE = 8


def error_event(exc: InferdError) -> bytes:
    """Headers are gone already: an error travels as an event in OpenAI's error shape (a client's
    own, such as a grammar that cannot be followed, as an invalid_request_error)."""
    return b"data: " + orjson.dumps({"error": openai_error(exc)}) + b"\n\n"


async def merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Items of several async iterators as they come, tagged with the iterator's index.
    Leaving early cancels the rest and closes them (which aborts their engine requests).

    The queue is small and bounded: while the consumer (a client not reading) falls behind, the
    pumps stop pulling and the items wait in the iterators' own buffers, which the engine bounds
    (``--max-buffered-outputs``); an unbounded queue here would hold them all instead."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=_MERGE_QUEUE_SIZE)
    done = object()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            await queue.put((index, exc))
            return
        await queue.put((index, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
