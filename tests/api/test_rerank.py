import cohere
import httpx
import numpy as np

DOCS = ["the cat purr", "dogs bark at the moon", "paris is the capital of france", "rain"]


def test_tei_rerank_is_sorted_and_returns_text(server):
    ranks = httpx.post(
        server + "/rerank", json={"query": "the cat", "texts": DOCS, "return_text": True}
    ).json()
    assert sorted(r["index"] for r in ranks) == [0, 1, 2, 3]
    scores = [r["score"] for r in ranks]
    assert scores == sorted(scores, reverse=True)
    assert all(0 < s < 1 for s in scores)  # sigmoid of the logit
    assert all(r["text"] == DOCS[r["index"]] for r in ranks)
    raw = httpx.post(server + "/rerank", json={"query": "the cat", "texts": DOCS, "raw_scores": True}).json()
    assert [r["index"] for r in raw] == [r["index"] for r in ranks]


def test_tei_embed_matches_openai_route(server):
    tei = httpx.post(server + "/embed", json={"inputs": ["the cat", "a dog"]}).json()
    openai = httpx.post(
        server + "/v1/embeddings", json={"model": "tiny-embed", "input": ["the cat", "a dog"]}
    ).json()
    np.testing.assert_allclose(tei, [d["embedding"] for d in openai["data"]], rtol=1e-5)


def test_official_cohere_client_v1(server):
    client = cohere.Client(api_key="unused", base_url=server)
    response = client.rerank(
        model="tiny-rerank", query="the cat", documents=DOCS, top_n=2, return_documents=True
    )
    assert len(response.results) == 2
    assert response.results[0].relevance_score >= response.results[1].relevance_score
    assert response.results[0].document.text == DOCS[response.results[0].index]


def test_official_cohere_client_v2(server):
    client = cohere.ClientV2(api_key="unused", base_url=server)
    response = client.rerank(model="tiny-cosine", query="the cat", documents=DOCS, top_n=3)
    assert len(response.results) == 3
    scores = [r.relevance_score for r in response.results]
    assert scores == sorted(scores, reverse=True)


def test_jina_style_documents_and_usage(server):
    body = {"model": "tiny-rerank", "query": "the cat", "documents": [{"text": d} for d in DOCS]}
    response = httpx.post(server + "/v1/rerank", json=body).json()
    assert response["usage"]["total_tokens"] > 0
    assert response["meta"]["api_version"]["version"] == "1"
    assert all("document" in r for r in response["results"])  # v1 and Jina return documents by default
    v2 = httpx.post(server + "/v2/rerank", json=body).json()
    assert all("document" not in r for r in v2["results"])
