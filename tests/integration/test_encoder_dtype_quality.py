"""The quality gate of the encoders' default dtype, on the bundled all-MiniLM-L6-v2 served as
`inferd serve` serves it by default on this CPU (bfloat16 matrix products where the CPU has native
bf16, after the load-time check of encoder.precision; float32 elsewhere): embeddings of a test
corpus written apart from that check's probe texts stay within cosine 0.9999 of float32
sentence-transformers, and served as a reranker it ranks every test group's documents in
sentence-transformers' order."""

from __future__ import annotations

from dataclasses import replace

import httpx
import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from inferd.config import load_settings
from inferd.config.model_spec import ModelKind
from inferd.config.settings import cpu_has_native_bf16
from inferd.encoder.models.registry import load_encoder_model
from inferd.encoder.precision import COSINE_GATE, PROBE_TEXTS, switch_if_faithful
from tests.conftest import free_port, live_server

pytestmark = pytest.mark.slow

# Written for this test: lengths from one word to ~200 tokens, several domains and languages.
CORPUS = [
    "hi",
    "refund",
    "Where is my parcel?",
    "best hiking trails near the lake",
    "The bridge was closed for repairs after inspectors found cracks in two of its supports.",
    "Add the onions and cook them slowly until they turn soft and golden, about fifteen minutes.",
    "for i in range(10):\n    print(i * i)",
    "Quarterly revenue rose 12% to $3.4 billion, driven by cloud subscriptions in Europe and Asia.",
    "The patient was advised to rest, drink plenty of fluids and return if the fever persisted.",
    "El tren sale de la estación central a las ocho y cuarto todas las mañanas.",
    "Der Vertrag kann mit einer Frist von drei Monaten zum Jahresende gekündigt werden.",
    "Il museo resta chiuso il lunedì e nei giorni festivi.",
    "Мы встретились у входа в парк ровно в полдень.",
    "图书馆周末开放到晚上九点。",
    "ERROR 2024-05-01T10:22:13Z worker-3 connection reset by peer (retry 4/5)",
    "Newton's second law states that force equals mass times acceleration.",
    " ".join(
        [
            "Embedding models map a passage to a vector so that passages with similar meaning lie close "
            "together; a search then compares the vector of a question with those of many passages, and "
            "the nearest ones are returned, which is why small numeric errors matter more for short texts "
            "than for long ones, whose errors average out across many tokens."
        ]
        * 3
    ),
    "Keep away from children. Store below 25 °C in a dry place.",
    "A cat sat on the warm windowsill and watched the rain.",
    "Q: How many moons does Mars have? A: Two, Phobos and Deimos.",
]
GROUPS = [
    (
        "how do vaccines work",
        [
            "Vaccines train the immune system to recognise a pathogen without causing the disease.",
            "A vaccine contains weakened or inactivated parts of a germ that trigger an immune response.",
            "The train to the coast runs every hour on weekdays.",
            "Vacuum cleaners work by creating a difference in air pressure.",
            "Immunity after vaccination can fade, so some vaccines need booster doses.",
            "The bakery sells sourdough bread on Saturdays.",
        ],
    ),
    (
        "python sort a list of dictionaries by a key",
        [
            "Use sorted(items, key=lambda d: d['age']) to order dictionaries by their age field.",
            "Python lists have a sort method that sorts in place.",
            "The python is a large snake found in Africa and Asia.",
            "Dictionaries map keys to values and keep insertion order.",
            "SQL sorts rows with ORDER BY.",
            "Our office moves to the fourth floor next month.",
        ],
    ),
    (
        "symptoms of dehydration",
        [
            "Signs of dehydration include thirst, dark urine, dizziness and tiredness.",
            "Drink water regularly during exercise to avoid dehydration.",
            "Dehydrated vegetables keep for months in a sealed jar.",
            "The symptoms of a cold include a runny nose and sore throat.",
            "The stock market closed higher on Friday.",
            "Severe dehydration can cause confusion and a rapid heartbeat and needs urgent care.",
        ],
    ),
    (
        "cheap flights to lisbon in march",
        [
            "Budget airlines offer fares to Lisbon from 39 euros in early March.",
            "Lisbon is the capital of Portugal and lies on the Tagus estuary.",
            "Book flights on a Tuesday for the lowest prices, some travel sites claim.",
            "March is a good month to plant potatoes.",
            "The library lends e-books for up to three weeks.",
            "Trains between Porto and Lisbon take about three hours.",
        ],
    ),
]


def test_the_gate_corpus_is_not_the_probe():
    assert not set(CORPUS) & set(PROBE_TEXTS)


@pytest.fixture(scope="module")
def reference(bundled_minilm):
    return SentenceTransformer(str(bundled_minilm), device="cpu")


def test_the_default_follows_the_check_where_the_cpu_has_bf16(bundled_minilm):
    """Where the CPU has native bf16 the default serves bf16 exactly when the check passes; the tests
    below then measure it. all-MiniLM-L6-v2 passed on an AVX512-BF16 EPYC at 0.999925 (its one-word
    probe), close enough to the gate that another CPU's bf16 kernels could decide otherwise: the
    verdict is printed, not asserted."""
    config = load_settings({"device": "cpu"}).encoder_config()
    served = load_encoder_model(bundled_minilm, ModelKind.EMBEDDING, config)
    if not cpu_has_native_bf16():
        assert not config.dtype_gate and served.dtype == "float32"
        return
    probed = load_encoder_model(bundled_minilm, ModelKind.EMBEDDING, replace(config, dtype="float32"))
    verdict = switch_if_faithful(probed, torch.bfloat16)
    print(f"\nall-MiniLM-L6-v2 load-time check on this CPU: {verdict}")
    assert served.dtype == ("bfloat16" if verdict.passed else "float32")


def test_default_embeddings_stay_within_the_cosine_gate(bundled_minilm, reference):
    settings = load_settings({"model": ["all-minilm-l6-v2"], "port": free_port(), "device": "cpu"})
    with live_server(settings) as url:
        response = httpx.post(
            url + "/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": CORPUS}, timeout=120
        )
    assert response.status_code == 200, response.text
    ours = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
    theirs = reference.encode(CORPUS)
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    print(
        f"\nall-MiniLM-L6-v2 default dtype vs float32: worst cosine {cosine.min():.6f} ({CORPUS[cosine.argmin()][:30]!r})"
    )
    assert cosine.min() >= COSINE_GATE


def test_default_rerank_keeps_the_reference_order(bundled_minilm, reference):
    settings = load_settings(
        {"model": ["all-minilm-l6-v2=minilm-rerank,kind=rerank"], "port": free_port(), "device": "cpu"}
    )
    with live_server(settings) as url:
        for query, documents in GROUPS:
            response = httpx.post(
                url + "/v1/rerank",
                json={"model": "minilm-rerank", "query": query, "documents": documents},
                timeout=60,
            )
            assert response.status_code == 200, response.text
            ours = np.empty(len(documents))
            for result in response.json()["results"]:
                ours[result["index"]] = result["relevance_score"]
            vectors = reference.encode([query, *documents], normalize_embeddings=True)
            theirs = vectors[1:] @ vectors[0]
            # every pair of documents in the reference's order, but for near-ties (1e-3 of the range)
            tie = 1e-3 * float(theirs.max() - theirs.min())
            ahead = theirs[:, None] - theirs[None, :] > tie
            assert not (ahead & (ours[:, None] - ours[None, :] <= 0)).any(), query
            assert ahead.sum() >= len(documents), "the groups must tell their documents apart"
