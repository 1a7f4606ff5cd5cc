"""The encoder's waiting queue: it hands out batches under a token budget, similar lengths together."""

from __future__ import annotations

import threading
from collections import OrderedDict

from inferd.encoder.request import Item
from inferd.errors import OverloadedError


class BatchQueue:
    """Thread-safe FIFO of items; :meth:`next_batch` blocks until it can return a batch.

    A batch starts from the oldest item (so nothing starves) and grows with the queued items whose
    lengths are closest to it, while the batch's cost stays within ``max_batch_tokens`` — the padded
    cost (longest × count) when ``is_padded`` — and its size within ``max_batch_requests``. Items
    of cancelled requests are dropped here, before they cost any compute.
    """

    def __init__(
        self,
        *,
        max_batch_tokens: int,
        max_batch_requests: int,
        max_queued_items: int,
        is_padded: bool = True,
        min_fill: float = 0.85,
    ) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests
        self.max_queued_items = max_queued_items
        self.is_padded = is_padded
        # A padded batch stops growing before padding exceeds 1 - min_fill of its cost: on a CPU
        # every padded position costs as much as a real one, while a batch's fixed cost is small.
        self.min_fill = min_fill if is_padded else 0.0
        # Only this many of the oldest items are considered for one batch: bounds the sort.
        self._window = max(256, 8 * max_batch_requests)
        self._items: OrderedDict[int, Item] = OrderedDict()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, items: list[Item]) -> None:
        """Queue all of ``items`` or none: raises OverloadedError past ``max_queued_items``."""
        with self._cond:
            if self._closed:
                raise OverloadedError("the encoder is shutting down", retry_after=5)
            if len(self._items) + len(items) > self.max_queued_items:
                raise OverloadedError(
                    f"the encoder queue is full ({len(self._items)} inputs waiting, limit "
                    f"{self.max_queued_items}); retry later"
                )
            for item in items:
                self._items[item.seq] = item
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def next_batch(self, timeout: float | None = None) -> list[Item] | None:
        """The next batch; None once closed, or when ``timeout`` passes with nothing queued."""
        with self._cond:
            while True:
                window = self._live_window()
                if window:
                    return self._take(self._select(window))
                if self._closed:
                    return None
                if not self._cond.wait(timeout) and timeout is not None:
                    return None

    def top_up(self, batch: list[Item]) -> list[Item]:
        """Queued items that still fit beside ``batch`` (oldest first, within the token and size
        budgets), taken from the queue; never blocks. Only for unpadded batches, whose cost is
        their token count whatever the mix of lengths."""
        if self.is_padded:
            return []
        with self._cond:
            total = sum(item.num_tokens for item in batch)
            extra: list[Item] = []
            for item in self._live_window():
                if len(batch) + len(extra) >= self.max_batch_requests:
                    break
                if total + item.num_tokens <= self.max_batch_tokens:
                    extra.append(item)
                    total += item.num_tokens
            return self._take(extra)

    def _live_window(self) -> list[Item]:
        window: list[Item] = []
        for seq, item in list(self._items.items()):
            if item.request.is_cancelled:
                del self._items[seq]
                continue
            window.append(item)
            if len(window) == self._window:
                break
        return window

    def _select(self, window: list[Item]) -> list[Item]:
        anchor = window[0]
        by_length = sorted(window, key=lambda it: it.num_tokens)
        pos = next(i for i, it in enumerate(by_length) if it is anchor)
        chosen = [anchor]
        longest, total = anchor.num_tokens, anchor.num_tokens
        lo, hi = pos - 1, pos + 1
        while len(chosen) < self.max_batch_requests and (lo >= 0 or hi < len(by_length)):
            take_low = hi >= len(by_length) or (
                lo >= 0
                and anchor.num_tokens - by_length[lo].num_tokens
                <= by_length[hi].num_tokens - anchor.num_tokens
            )
            candidate = by_length[lo] if take_low else by_length[hi]
            new_longest = max(longest, candidate.num_tokens)
            useful = total + candidate.num_tokens
            cost = new_longest * (len(chosen) + 1) if self.is_padded else useful
            if cost > self.max_batch_tokens or useful < self.min_fill * cost:
                # Longer neighbours only cost more: stop growing upwards; shorter ones may still fit.
                if take_low:
                    break
                hi = len(by_length)
                continue
            chosen.append(candidate)
            longest, total = new_longest, total + candidate.num_tokens
            if take_low:
                lo -= 1
            else:
                hi += 1
        return chosen

    def _take(self, batch: list[Item]) -> list[Item]:
        for item in batch:
            del self._items[item.seq]
        return batch
