import asyncio

import pytest

from inferd.api.cancellation import ClientDisconnected, unless_disconnected


class FakeRequest:
    """Stands in for Starlette's Request: only ``receive`` is used."""

    def __init__(self, disconnect_after: float | None) -> None:
        self.disconnect_after = disconnect_after

    async def receive(self):
        if self.disconnect_after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.disconnect_after)
        return {"type": "http.disconnect"}


async def test_disconnect_cancels_the_work():
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def work():
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(ClientDisconnected):
        await unless_disconnected(FakeRequest(0.01), work())
    await asyncio.sleep(0)
    assert started.is_set() and cancelled.is_set()


async def test_result_is_returned_when_the_client_stays():
    async def work():
        return 42

    assert await unless_disconnected(FakeRequest(None), work()) == 42
