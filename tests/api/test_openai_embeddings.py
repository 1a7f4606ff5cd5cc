import base64

import httpx
import numpy as np
import openai
import pytest

from tests.openapi import validate_openai


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused")


def test_official_client_gets_embeddings(client):
    result = client.embeddings.create(model="tiny-embed", input=["the cat", "dogs bark at the moon"])
    assert [d.index for d in result.data] == [0, 1]
    vectors = np.array([d.embedding for d in result.data])
    assert vectors.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert result.usage.prompt_tokens == result.usage.total_tokens > 4
    assert result.model == "tiny-embed"


def test_float_and_base64_carry_the_same_vectors(server):
    body = {"model": "tiny-embed", "input": "the moon"}
    as_float = httpx.post(server + "/v1/embeddings", json=body).json()
    as_b64 = httpx.post(server + "/v1/embeddings", json=body | {"encoding_format": "base64"}).json()
    validate_openai(as_float, "CreateEmbeddingResponse")
    decoded = np.frombuffer(base64.b64decode(as_b64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, as_float["data"][0]["embedding"], rtol=1e-6)


@pytest.mark.parametrize("form", ["string", "strings", "ids", "id-lists"])
def test_every_input_form(server, form):
    inputs = {
        "string": "the cat",
        "strings": ["the cat", "a"],
        "ids": [2, 10, 3],
        "id-lists": [[2, 10, 3], [2, 3]],
    }
    response = httpx.post(server + "/v1/embeddings", json={"model": "tiny-embed", "input": inputs[form]})
    assert response.status_code == 200, response.text
    validate_openai(response.json(), "CreateEmbeddingResponse")
    expected = 1 if form in ("string", "ids") else 2
    assert len(response.json()["data"]) == expected


def test_dimensions_and_embedding_types(server):
    post = lambda **extra: httpx.post(  # noqa: E731
        server + "/v1/embeddings",
        json={"model": "tiny-embed", "input": ["the cat", "the sun", "a dog"]} | extra,
    ).json()
    short = post(dimensions=8)
    assert all(len(d["embedding"]) == 8 for d in short["data"])
    int8 = post(embedding_type="int8")
    values = np.array([d["embedding"] for d in int8["data"]])
    assert values.dtype.kind == "i" and values.min() >= -128 and values.max() <= 127
    binary = post(embedding_type="ubinary", encoding_format="base64")
    assert len(base64.b64decode(binary["data"][0]["embedding"])) == 16 // 8


def test_models_list_reports_kinds(server):
    body = httpx.get(server + "/v1/models").json()
    validate_openai(body, "ListModelsResponse")
    cards = {m["id"]: m for m in body["data"]}
    assert cards["tiny-embed"]["kind"] == "embedding" and cards["tiny-embed"]["dimensions"] == 16
    assert cards["tiny-cosine"]["rerank_method"] == "cosine"
    assert cards["tiny-rerank"]["rerank_method"] == "cross-encoder"
    assert cards["tiny-rerank"]["quantization"] is None  # an encoder: no LLM engine precision
    assert cards["tiny-embed"]["max_input_tokens"] == 64
    one = httpx.get(server + "/v1/models/tiny-rerank")
    assert one.json()["id"] == "tiny-rerank"
    assert httpx.get(server + "/v1/models/nope").status_code == 404
