"""Frozen configs handed to the engines; derived facts live in the engines' own result objects."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EncoderConfig:
    """Batching and execution limits of one encoder engine."""

    max_batch_tokens: int = 16384
    max_batch_requests: int = 32
    max_queued_items: int = 8192
    max_client_batch_size: int = 2048
    num_threads: int = 1
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in (
            "max_batch_tokens",
            "max_batch_requests",
            "max_queued_items",
            "max_client_batch_size",
            "num_threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
