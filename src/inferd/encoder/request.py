"""Per-request state shared by the event loop (waiting) and the worker threads (filling results)."""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass, field

import numpy as np

_ids = itertools.count()


@dataclass(slots=True, eq=False)
class Item:
    """One sequence to run through the model: a text, or a (query, document) pair."""

    request: EncodeRequest
    index: int
    input_ids: list[int]
    token_type_ids: list[int] | None = None
    seq: int = field(default_factory=lambda: next(_ids))  # arrival order across requests

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


class EncodeRequest:
    """A client request's items and the future its handler awaits.

    Worker threads call :meth:`set_output` / :meth:`fail`; the loop's future is completed through
    ``call_soon_threadsafe``, so nothing here blocks the event loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, num_items: int) -> None:
        self.id = next(_ids)
        self.future: asyncio.Future[np.ndarray] = loop.create_future()
        self._loop = loop
        self._outputs: list[np.ndarray | None] = [None] * num_items
        self._remaining = num_items
        self._lock = threading.Lock()
        self.is_cancelled = False
        self.started_at: float | None = None  # when the model began its first batch (metrics)

    def set_output(self, index: int, value: np.ndarray) -> None:
        with self._lock:
            self._outputs[index] = value
            self._remaining -= 1
            done = self._remaining == 0
        if done:
            self._loop.call_soon_threadsafe(self._resolve, np.stack(self._outputs))

    def fail(self, error: BaseException) -> None:
        self._loop.call_soon_threadsafe(self._reject, error)

    def _resolve(self, value: np.ndarray) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def _reject(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)
