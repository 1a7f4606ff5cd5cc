"""The quality gate of the encoders' default dtype, on the bundled all-MiniLM-L6-v2 served as
`inferd serve` serves it by default on this CPU (bfloat16 matrix products where the CPU has native
bf16, after the load-time check of encoder.precision; float32 elsewhere): embeddings of a test
corpus written apart from that check's probe texts stay within cosine 0.9999 of float32
sentence-transformers, and served as a reranker it ranks every test group's documents in
sentence-transformers' order."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from inferd.config import load_settings
from inferd.config.model_spec import ModelKind
from inferd.config.settings import cpu_has_native_bf16
from inferd.encoder.models.registry import load_encoder_model
from inferd.encoder.precision import COSINE_GATE, PROBE_TEXTS
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


def test_the_default_is_bfloat16_where_the_cpu_has_it_and_passes_its_check(bundled_minilm):
    config = load_settings({}).encoder_config()
    model = load_encoder_model(bundled_minilm, ModelKind.EMBEDDING, config)
    # all-MiniLM-L6-v2 passes the load-time check (0.99992 at worst on an AVX512-BF16 EPYC): where
    # the CPU has native bf16 the default serves it, and the tests below measure bfloat16.
    assert model.dtype == ("bfloat16" if cpu_has_native_bf16() else "float32")


def test_default_embeddings_stay_within_the_cosine_gate(bundled_minilm, reference):
    settings = load_settings({"model": ["all-minilm-l6-v2"], "port": free_port()})
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
    settings = load_settings({"model": ["all-minilm-l6-v2=minilm-rerank,kind=rerank"], "port": free_port()})
    with live_server(settings) as url:
        for query, documents in GROUPS:
            response = httpx.post(
                url + "/v1/rerank",
                json={"model": "minilm-rerank", "query": query, "documents": documents},
                timeout=60,
            )
            assert response.status_code == 200, response.text
            ours = [r["index"] for r in response.json()["results"]]
            vectors = reference.encode([query, *documents], normalize_embeddings=True)
            expected = list(np.argsort(-(vectors[1:] @ vectors[0]), kind="stable"))
            assert ours == expected, query
