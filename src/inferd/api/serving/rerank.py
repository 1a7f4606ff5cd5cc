"""Rerank scores → ranked results in TEI's and Cohere/Jina's shapes."""

from __future__ import annotations

import uuid

import numpy as np

from inferd.encoder.params import RerankOutput


def ranking(scores: np.ndarray, top_n: int | None = None) -> list[int]:
    """Document indices by descending score (stable for ties), cut to ``top_n``."""
    order = np.argsort(-scores, kind="stable").tolist()
    return order if top_n is None else order[:top_n]


def tei_rerank_body(output: RerankOutput, texts: list[str], return_text: bool) -> list[dict]:
    return [
        {"index": i, "score": float(output.scores[i]), **({"text": texts[i]} if return_text else {})}
        for i in ranking(output.scores)
    ]


def cohere_rerank_body(
    output: RerankOutput,
    texts: list[str],
    *,
    model: str,
    top_n: int | None,
    return_documents: bool,
    api_version: str,
) -> dict:
    results = []
    for i in ranking(output.scores, top_n):
        result: dict = {"index": i, "relevance_score": float(output.scores[i])}
        if return_documents:
            result["document"] = {"text": texts[i]}
        results.append(result)
    return {
        "id": str(uuid.uuid4()),
        "model": model,
        "results": results,
        "meta": {"api_version": {"version": api_version}, "billed_units": {"search_units": 1}},
        "usage": {"prompt_tokens": output.num_prompt_tokens, "total_tokens": output.num_prompt_tokens},
    }
