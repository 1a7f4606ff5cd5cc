"""Per-key rate limits: token buckets for requests and for tokens per minute."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from inferd.api.auth import Principal
from inferd.errors import RateLimitError


class TokenBucket:
    """Holds up to ``per_minute`` units and refills at ``per_minute / 60`` per second. Debits may
    take it below zero: usage known only afterwards (tokens) is still paid for."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._level = self.capacity
        self._updated = clock()

    def _refill(self) -> float:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._updated) * self.rate)
        self._updated = now
        return self._level

    def seconds_until(self, amount: float) -> float:
        """How long until ``amount`` units are there; 0 when they are now."""
        missing = amount - self._refill()
        return max(0.0, missing / self.rate)

    def take(self, amount: float) -> None:
        self._refill()
        self._level -= amount


class RateLimiter:
    """One request bucket and one token bucket per principal, made on first use."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def admit(self, principal: Principal) -> None:
        """Take one request from the principal's budget, or raise RateLimitError."""
        with self._lock:
            if principal.tokens_per_minute is not None:
                bucket = self._bucket(self._tokens, principal.name, principal.tokens_per_minute)
                # Any positive balance admits a request: its size is known only afterwards.
                _raise_if_waiting(bucket.seconds_until(0), "tokens", principal.tokens_per_minute)
            if principal.requests_per_minute is not None:
                bucket = self._bucket(self._requests, principal.name, principal.requests_per_minute)
                _raise_if_waiting(bucket.seconds_until(1), "requests", principal.requests_per_minute)
                bucket.take(1)

    def reserve_tokens(self, principal: Principal, num_tokens: int, num_flexible: int = 0) -> int:
        """Take what a request can use as it is admitted — ``num_tokens`` (its prompt and
        max_tokens), plus ``num_flexible`` (the context left to choices without max_tokens) as far
        as a minute's budget goes — or raise RateLimitError; returns what it took. Concurrent
        requests cannot overrun the budget together; what a request leaves unused comes back
        through ``charge_tokens``."""
        limit = principal.tokens_per_minute
        if limit is None or num_tokens + num_flexible <= 0:
            return 0
        if num_tokens > limit:
            raise RateLimitError(
                f"Request too large for tokens per minute: limit {limit}, requested {num_tokens}. "
                "Lower max_tokens or the input's size.",
                retry_after=60,
            )
        amount = min(num_tokens + num_flexible, limit)
        with self._lock:
            bucket = self._bucket(self._tokens, principal.name, limit)
            _raise_if_waiting(bucket.seconds_until(amount), "tokens", limit)
            bucket.take(amount)
        return amount

    def charge_tokens(self, principal: Principal, num_tokens: int) -> None:
        """Settle a finished request: ``num_tokens`` used beyond what it reserved (negative: the
        unused part of its reservation, given back)."""
        if principal.tokens_per_minute is None or num_tokens == 0:
            return
        with self._lock:
            self._bucket(self._tokens, principal.name, principal.tokens_per_minute).take(num_tokens)

    def _bucket(self, buckets: dict[str, TokenBucket], name: str, per_minute: int) -> TokenBucket:
        bucket = buckets.get(name)
        if bucket is None:
            bucket = buckets[name] = TokenBucket(per_minute, self._clock)
        return bucket


def _raise_if_waiting(seconds: float, unit: str, limit: int) -> None:
    if seconds > 0:
        wait = max(1, math.ceil(seconds))
        raise RateLimitError(
            f"Rate limit reached for {unit} per minute: limit {limit}. Please try again in {wait}s.",
            retry_after=wait,
        )
