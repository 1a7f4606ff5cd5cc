from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from inferd.config import EncoderConfig, ModelKind
from inferd.encoder.client import EncoderClient
from inferd.hub.resolve import detect_kind


@contextmanager
def started(path: Path, **config):
    client = EncoderClient.start(path, detect_kind(path), EncoderConfig(num_threads=1, **config))
    try:
        yield client
    finally:
        client.close()


__all__ = ["ModelKind", "started"]
