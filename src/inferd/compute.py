"""One thread for all tensor work in the process: model loading, LLM steps and encoder batches.

Torch runs its CPU operators, and inferd's native kernels, on OpenMP. GNU OpenMP gives every
thread that opens a parallel region its own pool of worker threads, and once the workers of all
pools outnumber the CPUs it stops letting them spin between regions: each of the hundreds of
regions in a forward then waits for a sleeping worker to be woken. Measured on this project's
2-core machine, a one-stream decode step went from 21 to 27 ms (p50) as soon as a second thread
had run a parallel region. The LLM engine loop and the encoder engines therefore hand their
forwards to this single thread, which owns the only pool; they still schedule, batch and publish
on their own threads. The handoff costs tens of microseconds per step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class _Task:
    __slots__ = ("args", "done", "error", "fn", "num_threads", "result")

    def __init__(self, fn: Callable, args: tuple, num_threads: int | None) -> None:
        self.fn, self.args, self.num_threads = fn, args, num_threads
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None


class ComputeThread:
    """Runs callables one at a time on a single daemon thread; callers block until theirs ran."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Task] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, fn: Callable[..., T], *args, num_threads: int | None = None) -> T:
        """``fn(*args)`` on the compute thread with torch set to ``num_threads`` (if given)."""
        if threading.current_thread() is self._thread:  # already here: run inline
            _set_threads(num_threads)
            return fn(*args)
        task = _Task(fn, args, num_threads)
        self._ensure_started()
        self._queue.put(task)
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.result  # type: ignore[return-value]

    def _ensure_started(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="inferd-compute", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            task = self._queue.get()
            try:
                _set_threads(task.num_threads)
                task.result = task.fn(*task.args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who decides
                task.error = exc
            finally:
                task.done.set()


def _set_threads(num_threads: int | None) -> None:
    if num_threads is None:
        return
    import torch

    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)


compute = ComputeThread()
