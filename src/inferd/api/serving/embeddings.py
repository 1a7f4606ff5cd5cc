"""Embedding results → wire bodies (OpenAI list, TEI matrix)."""

from __future__ import annotations

import base64

import numpy as np

from inferd.encoder.params import EmbedOutput


def openai_embeddings_body(output: EmbedOutput, model: str, encoding_format: str) -> dict:
    """OpenAI's embedding list; base64 carries the raw little-endian bytes of each vector."""
    vectors = output.embeddings
    if encoding_format == "base64":
        little = vectors.astype(vectors.dtype.newbyteorder("<"), copy=False)
        rows: list = [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    else:
        rows = list(vectors)  # numpy rows; orjson writes them without a Python float per value
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
        "model": model,
        "usage": {"prompt_tokens": output.num_prompt_tokens, "total_tokens": output.num_prompt_tokens},
    }


def tei_embeddings_body(output: EmbedOutput) -> np.ndarray:
    return output.embeddings
