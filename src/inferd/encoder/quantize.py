"""Per-request output quantisation, the same arithmetic as sentence-transformers' quantize_embeddings."""

from __future__ import annotations

import numpy as np

from inferd.encoder.params import EmbeddingType
from inferd.errors import InvalidRequestError


def quantize(embeddings: np.ndarray, embedding_type: EmbeddingType) -> np.ndarray:
    """float32 (n, d) → float32, int8/uint8 (n, d) or bit-packed int8/uint8 (n, ceil(d / 8))."""
    embeddings = embeddings.astype(np.float32, copy=False)
    if embedding_type == "float":
        return embeddings
    if embedding_type in ("int8", "uint8"):
        return _scalar(embeddings, embedding_type)
    packed = np.packbits(embeddings > 0, axis=-1)
    if embedding_type == "ubinary":
        return packed
    return (packed.astype(np.int16) - 128).astype(np.int8)


def _scalar(embeddings: np.ndarray, embedding_type: str) -> np.ndarray:
    # Scalar ranges are calibrated on the request's own embeddings, as sentence-transformers does
    # without calibration data; one vector has no range to calibrate on.
    if embeddings.shape[0] < 2:
        raise InvalidRequestError(
            f"embedding_type {embedding_type} calibrates its ranges on the request's embeddings; "
            "send at least two inputs",
            param="embedding_type",
        )
    starts = embeddings.min(axis=0)
    steps = (embeddings.max(axis=0) - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    levels = np.clip(np.floor((embeddings - starts) / steps), 0, 255)
    return levels.astype(np.uint8) if embedding_type == "uint8" else (levels - 128).astype(np.int8)
