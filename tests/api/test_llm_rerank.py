"""An LLM reranker (a causal LM scored on "yes"/"no") behind the Cohere/Jina and TEI rerank routes,
served with ``kind=rerank``: the reference order and scores, and errors in each API's shape."""

import cohere
import httpx
import numpy as np
import pytest
import torch

from inferd.config import load_settings
from tests.conftest import free_port, live_server
from tests.unit.llm.test_scoring import INSTRUCTION, SUFFIX, SYSTEM, build_llm_reranker

# Remove with the wiring: until api/model_table.py serves a causal LM given kind=rerank through
# api/llm_rerank.start_llm_reranker, the server refuses the model ("holds a chat model") and
# cannot start; once it is wired, strict makes these tests fail until the marker goes.


QUERY = "what is the capital of france?"
DOCS = [
    "Paris is the capital of France.",
    "Cats purr.",
    "The river Seine runs through Paris.",
    "no",
    "Berlin is the capital of Germany; yes, it is.",
]


@pytest.fixture(scope="module")
def reranker(model_root):
    return build_llm_reranker(model_root, "tiny-llm-rerank")


@pytest.fixture(scope="module")
def margins(reranker):
    """l_yes - l_no of each document, from transformers' forward on the whole prompt text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(reranker))
    model = AutoModelForCausalLM.from_pretrained(str(reranker), dtype=torch.float32).eval()
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    out = []
    with torch.inference_mode():
        for doc in DOCS:
            text = f"{SYSTEM}<Instruct>: {INSTRUCTION}\n<Query>: {QUERY}\n<Document>: {doc}{SUFFIX}"
            ids = tokenizer.encode(text, add_special_tokens=False)
            logits = model(torch.tensor([ids])).logits[0, -1]
            out.append(float(logits[yes] - logits[no]))
    return np.array(out)


@pytest.fixture(scope="module")
def server(reranker):
    settings = load_settings(
        {
            "model": [f"{reranker}=tiny-llm-rerank,kind=rerank"],
            "port": free_port(),
            "num_threads": 1,
            "dtype": "float32",  # the reference is fp32
            "kv_cache_memory": 4 * 2**20,
            "max_client_batch_size": 16,
        }
    )
    with live_server(settings) as url:
        yield url


def test_model_card_says_llm(server):
    (card,) = httpx.get(server + "/v1/models").json()["data"]
    assert card["id"] == "tiny-llm-rerank" and card["kind"] == "rerank"
    assert card["rerank_method"] == "llm" and card["max_input_tokens"] == 2048
    # the LLM engine's precision, as for a chat model: float32 asked for, no int8
    assert (card["dtype"], card["quantization"], card["kv_cache_dtype"]) == ("float32", "none", "float32")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cohere_routes_give_the_reference_order_and_scores(server, margins, version):
    body = {"model": "tiny-llm-rerank", "query": QUERY, "documents": DOCS, "return_documents": True}
    response = httpx.post(f"{server}/{version}/rerank", json=body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    expected = 1 / (1 + np.exp(-margins))
    assert [r["index"] for r in results] == np.argsort(-expected, kind="stable").tolist()
    np.testing.assert_allclose([r["relevance_score"] for r in results], np.sort(expected)[::-1], atol=1e-4)
    assert all(r["document"]["text"] == DOCS[r["index"]] for r in results)
    assert response.json()["usage"]["total_tokens"] > 250 * len(DOCS)  # the template is counted


def test_official_cohere_client(server, margins):
    client = cohere.ClientV2(api_key="unused", base_url=server)
    response = client.rerank(model="tiny-llm-rerank", query=QUERY, documents=DOCS, top_n=2)
    assert [r.index for r in response.results] == np.argsort(-margins, kind="stable")[:2].tolist()


def test_tei_rerank_gives_the_reference_scores(server, margins):
    ranks = httpx.post(server + "/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True}).json()
    assert [r["index"] for r in ranks] == np.argsort(-margins, kind="stable").tolist()
    np.testing.assert_allclose([r["score"] for r in ranks], np.sort(margins)[::-1], atol=1e-4)
    probabilities = httpx.post(server + "/rerank", json={"query": QUERY, "texts": DOCS}).json()
    np.testing.assert_allclose(
        sorted(r["score"] for r in probabilities), np.sort(1 / (1 + np.exp(-margins))), atol=1e-5
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"query": "", "documents": ["a"]}, "query must be a non-empty string"),
        ({"query": "q", "documents": ["a"] * 17}, "documents has 17 items, more than the limit of 16"),
        ({"query": "q", "documents": ["a", ""]}, "documents[1] is an empty string"),
    ],
)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cohere_errors_are_400s_in_cohere_shape(server, version, body, message):
    response = httpx.post(f"{server}/{version}/rerank", json={"model": "tiny-llm-rerank", **body})
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"message"}
    assert message in response.json()["message"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"query": "", "texts": ["a"]}, 422),
        ({"query": "q", "texts": ["a"] * 17}, 422),
        ({"query": "q", "texts": ["word " * 3000]}, 413),  # past the context without truncate
    ],
)
def test_tei_errors_in_tei_shape(server, body, status):
    response = httpx.post(server + "/rerank", json=body)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error", "error_type"}
