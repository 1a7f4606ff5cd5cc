"""The encoder engine: one model, its batch queue, a batcher thread and a model thread."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

import torch

from inferd.compute import compute
from inferd.config.engine import EncoderConfig
from inferd.encoder.models.base import EncoderModel, PreparedBatch, prepare_batch
from inferd.encoder.queue import BatchQueue
from inferd.encoder.request import Item
from inferd.errors import EngineError

log = logging.getLogger(__name__)


class BatchObserver(Protocol):
    """Told about each batch the model ran (on the model thread); must be quick and never raise."""

    def on_batch(self, num_items: int, num_tokens: int, duration_s: float) -> None: ...


class _NoObserver:
    def on_batch(self, num_items: int, num_tokens: int, duration_s: float) -> None:
        pass


class EncoderEngine:
    """Runs batches of one model off the event loop.

    The batcher thread takes the next batch from the queue and pads it into tensors while the model
    thread runs the previous one; a semaphore keeps exactly one prepared batch in hand, so a batch is
    never formed long before the model is ready for it.
    """

    def __init__(self, model: EncoderModel, config: EncoderConfig) -> None:
        self.model = model
        self.config = config
        self.queue = BatchQueue(
            max_batch_tokens=config.max_batch_tokens,
            max_batch_requests=config.max_batch_requests,
            max_queued_items=config.max_queued_items,
            is_padded=not model.is_packed,
        )
        self._prepared: queue.Queue[PreparedBatch | None] = queue.Queue()
        self._slot = threading.Semaphore(1)
        self._threads: list[threading.Thread] = []
        self.observer: BatchObserver = _NoObserver()
        self.error: BaseException | None = None  # set when a thread crashed
        self._in_hand: PreparedBatch | None = None  # the batch the model thread is running

    @property
    def is_running(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def start(self) -> None:
        self._threads = [
            threading.Thread(
                target=self._guarded(self._batch_loop), name="inferd-encoder-batcher", daemon=True
            ),
            threading.Thread(target=self._guarded(self._model_loop), name="inferd-encoder-model", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.queue.close()
        for thread in self._threads:
            thread.join(timeout)

    def _guarded(self, loop: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                loop()
            except BaseException as exc:  # a thread died: fail what waits instead of hanging it
                log.exception("an encoder engine thread crashed")
                self.error = exc
                self._fail_pending(exc)

        return run

    def _fail_pending(self, exc: BaseException) -> None:
        self.queue.close()
        error = EngineError(f"the encoder engine crashed: {exc}")
        batches = [self._in_hand.items] if self._in_hand is not None else []
        while (items := self.queue.next_batch(timeout=0)) is not None:
            batches.append(items)
        while not self._prepared.empty():
            prepared = self._prepared.get_nowait()
            if prepared is not None:
                batches.append(prepared.items)
        self._prepared.put(None)  # the model thread, if alive, stops
        self._slot.release()  # the batcher, if alive, wakes up to a closed queue and stops
        for request in {item.request for items in batches for item in items}:
            request.fail(error)

    def submit(self, items: list[Item]) -> None:
        """Queue a request's items; raises OverloadedError when the queue is full."""
        self.queue.put(items)

    def _batch_loop(self) -> None:
        while True:
            self._slot.acquire()
            items = self.queue.next_batch()
            if items is None:
                self._prepared.put(None)
                return
            self._prepared.put(self._prepare(items))

    def _prepare(self, items: list[Item]) -> PreparedBatch:
        model = self.model
        return prepare_batch(items, model.tokenizer.pad_token_id, model.uses_token_type_ids, model.is_packed)

    def _model_loop(self) -> None:
        while True:
            batch = self._prepared.get()
            if batch is not None:
                batch = self._top_up(batch)
            self._slot.release()
            if batch is None:
                return
            self._in_hand = batch
            # Forwards run on the process's one compute thread (see inferd.compute), which also
            # sets torch's thread count there.
            compute.run(self._run, batch, num_threads=self.config.num_threads)
            self._in_hand = None

    def _top_up(self, batch: PreparedBatch) -> PreparedBatch:
        """The prepared batch plus what arrived while it waited for the model, where that still fits:
        it was formed when the previous batch started, so under a steady stream of single requests
        it would hold only what had queued by then (measured: 65 passages/s at 8 concurrent
        one-passage clients without this)."""
        extra = self.queue.top_up(batch.items)
        return self._prepare(batch.items + extra) if extra else batch

    def _run(self, batch: PreparedBatch) -> None:
        keep = [i for i, item in enumerate(batch.items) if not item.request.is_cancelled]
        if not keep:
            return
        if len(keep) < len(batch.items):
            batch = self._prepare([batch.items[i] for i in keep])
        start = time.monotonic()
        for item in batch.items:
            if item.request.started_at is None:
                item.request.started_at = start
        try:
            with torch.inference_mode():
                outputs = self.model.forward(batch).numpy()
        except Exception as exc:
            log.exception("encoder forward failed on a batch of %d", len(batch.items))
            for request in {item.request for item in batch.items}:
                request.fail(EngineError(f"the model failed on this input: {exc}"))
            return
        num_tokens = sum(item.num_tokens for item in batch.items)
        self.observer.on_batch(len(batch.items), num_tokens, time.monotonic() - start)
        for item, row in zip(batch.items, outputs, strict=True):
            item.request.set_output(item.index, row)
