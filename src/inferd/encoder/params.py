"""Engine-side request parameters and results (plain dataclasses; pydantic stays at the edge)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary"]
TruncationSide = Literal["right", "left"]


@dataclass(frozen=True, slots=True)
class EmbedParams:
    """How to embed one request's inputs."""

    normalize: bool | None = None  # None: as the model is configured (its Normalize module)
    truncate: bool = False
    truncation_side: TruncationSide = "right"
    prompt_name: str | None = None
    prompt: str | None = None  # a literal instruction prefix; wins over prompt_name
    dimensions: int | None = None  # Matryoshka: keep the first N dimensions, then re-normalise
    embedding_type: EmbeddingType = "float"


@dataclass(frozen=True, slots=True)
class RerankParams:
    """How to score one query against its documents."""

    raw_scores: bool = False
    truncate: bool = False
    truncation_side: TruncationSide = "right"
    max_tokens_per_doc: int | None = None


@dataclass(frozen=True, slots=True)
class EmbedOutput:
    """Embeddings in input order: float32, or int8 / uint8 for quantised types."""

    embeddings: np.ndarray
    num_prompt_tokens: int


@dataclass(frozen=True, slots=True)
class RerankOutput:
    """One score per document, in document order (callers sort)."""

    scores: np.ndarray
    num_prompt_tokens: int
