"""Per-key concurrency cap: how many requests one key may have in flight at once.

A rate per minute does not bound what one key holds right now: a few hundred slow streams opened in
the same second pass any per-minute budget and then occupy every running slot for minutes. This
cap counts requests from admission until their last byte, streams included, and refuses the one
past it at once (429), as TEI does when its concurrency limit is hit.
"""

from __future__ import annotations

from starlette.types import Message, Send

from inferd.api.auth import Principal
from inferd.errors import RateLimitError


class ConcurrencyLimiter:
    """Counts each principal's requests in flight. Only the event loop touches it."""

    def __init__(self) -> None:
        self._num_in_flight: dict[str, int] = {}

    def acquire(self, principal: Principal) -> Slot:
        """A slot for one request of ``principal``; RateLimitError when it holds its cap already.
        Release the slot when the response has ended, whichever way it ended."""
        limit = principal.max_concurrent_requests
        if limit is None:
            return Slot(self, None)
        count = self._num_in_flight.get(principal.name, 0)
        if count >= limit:
            raise RateLimitError(
                f"Too many concurrent requests for this API key: limit {limit} in flight. "
                "Retry when one of them has finished.",
                retry_after=1,
            )
        self._num_in_flight[principal.name] = count + 1
        return Slot(self, principal.name)

    def num_in_flight(self, name: str) -> int:
        return self._num_in_flight.get(name, 0)

    def _release(self, name: str) -> None:
        count = self._num_in_flight[name] - 1
        if count:
            self._num_in_flight[name] = count
        else:
            del self._num_in_flight[name]  # keys come and go: keep only those with work


class Slot:
    """One request's place under its key's cap; a context manager that frees it exactly once."""

    __slots__ = ("_limiter", "_name")

    def __init__(self, limiter: ConcurrencyLimiter, name: str | None) -> None:
        self._limiter = limiter
        self._name = name

    def releasing(self, send: Send) -> Send:
        """``send`` that frees the slot as the response's last byte goes out: a client may start
        its next request the moment it has read this one, before the route's task has wound down."""
        if self._name is None:
            return send

        async def releasing(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.release()

        return releasing

    def release(self) -> None:
        if self._name is not None:
            name, self._name = self._name, None
            self._limiter._release(name)

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
