"""The bundled all-MiniLM-L6-v2 over real HTTP equals sentence-transformers."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from inferd.config import load_settings
from tests.conftest import free_port, live_server

pytestmark = pytest.mark.slow

WORDS = [
    "retrieval",
    "augmented",
    "generation",
    "needs",
    "embeddings",
    "of",
    "passages",
    "and",
    "queries",
    "that",
    "are",
    "fast",
    "to",
    "compute",
    "and",
    "faithful",
    "to",
    "the",
    "reference",
    "model",
    "whatever",
    "the",
    "batch",
    "they",
    "land",
    "in",
]


def passages() -> list[str]:
    # Mixed lengths: a few words up to about 200 tokens (the model's limit is 256).
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + (i * 29) % 170)) for i in range(48)]


def test_eight_concurrent_clients_get_the_reference_embeddings(bundled_minilm):
    texts = passages()
    settings = load_settings({"model": ["all-minilm-l6-v2"], "port": free_port(), "max_batch_requests": 8})
    with live_server(settings) as url:

        def send(chunk: list[str]) -> list[list[float]]:
            response = httpx.post(
                url + "/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": chunk}, timeout=120
            )
            assert response.status_code == 200, response.text
            return [d["embedding"] for d in response.json()["data"]]

        chunks = [texts[i::8] for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(send, chunks))
    ours = np.empty((len(texts), 384), dtype=np.float32)
    for i, vectors in enumerate(results):
        ours[i::8] = vectors
    reference = SentenceTransformer(str(bundled_minilm), device="cpu").encode(texts)
    cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), np.linalg.norm(reference, axis=1), rtol=1e-4)
