"""Bad input gets a clear 4xx in the route family's error shape, never a 500."""

import re

import httpx
import pytest

from tests.openapi import validate_openai

LONG = "the cat and the dog " * 40

OPENAI_CASES = [
    ({"model": "nope", "input": "x"}, 404, "model_not_found"),
    ({"model": "tiny-rerank", "input": "x"}, 400, "model_not_supported"),
    ({"model": "tiny-embed", "input": []}, 400, None),
    ({"model": "tiny-embed", "input": ""}, 400, None),
    ({"model": "tiny-embed", "input": ["ok", 3]}, 400, None),
    ({"model": "tiny-embed", "input": ["x"] * 17}, 400, None),
    ({"model": "tiny-embed", "input": "x", "encoding_format": "hex"}, 400, None),
    ({"model": "tiny-embed", "input": "x", "embedding_type": "int4"}, 400, None),
    ({"model": "tiny-embed", "input": "x", "dimensions": 17}, 400, None),
    ({"model": "tiny-embed", "input": "x", "dimensions": 0}, 400, None),
    ({"model": "tiny-embed", "input": LONG}, 400, "context_length_exceeded"),
    ({"model": "tiny-embed", "input": "x", "prompt_name": "nope"}, 400, None),
    ({"model": "tiny-embed", "input": "x", "embedding_type": "int8"}, 400, None),
    ({"input": "x"}, 400, None),
    ({"model": 5, "input": "x"}, 400, None),
]


@pytest.mark.parametrize(("body", "status", "code"), OPENAI_CASES)
def test_openai_route_errors(server, body, status, code):
    response = httpx.post(server + "/v1/embeddings", json=body)
    assert response.status_code == status, response.text
    validate_openai(response.json(), "ErrorResponse")
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]


def test_malformed_json_and_unknown_route(server):
    response = httpx.post(
        server + "/v1/embeddings", content=b"{bad", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    validate_openai(response.json(), "ErrorResponse")
    missing = httpx.get(server + "/v1/nothing-here")
    assert missing.status_code == 404
    validate_openai(missing.json(), "ErrorResponse")


def test_long_input_message_names_limit_and_length(server):
    error = httpx.post(server + "/v1/embeddings", json={"model": "tiny-embed", "input": LONG}).json()["error"]
    assert "64" in error["message"] and "202" in error["message"]
    ok = httpx.post(server + "/v1/embeddings", json={"model": "tiny-embed", "input": LONG, "truncate": True})
    assert ok.status_code == 200


TEI_CASES = [
    ("/embed", {"inputs": LONG}, 413),
    ("/embed", {"inputs": []}, 422),
    ("/embed", {"inputs": [1.5]}, 422),
    ("/rerank", {"query": "q", "texts": []}, 422),
    ("/rerank", {"query": "", "texts": ["a"]}, 422),
    ("/rerank", {"query": "q"}, 422),
]


@pytest.mark.parametrize(("path", "body", "status"), TEI_CASES)
def test_tei_route_errors(server, path, body, status):
    response = httpx.post(server + path, json=body)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error", "error_type"}


COHERE_CASES = [
    ({"model": "tiny-rerank", "query": "q", "documents": ["a"], "top_n": 0}, 400),
    ({"model": "tiny-rerank", "query": "q", "documents": []}, 400),
    ({"model": "tiny-embed", "query": "q", "documents": ["a"]}, 400),
    ({"model": "nope", "query": "q", "documents": ["a"]}, 404),
    ({"model": "tiny-rerank", "query": "q", "documents": [{"title": "no text"}]}, 400),
]


@pytest.mark.parametrize(("body", "status"), COHERE_CASES)
@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
def test_cohere_route_errors(server, path, body, status):
    response = httpx.post(server + path, json=body)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"message"}


@pytest.mark.parametrize("model", ["cosine", "cross-encoder"])
def test_tei_rerank_names_the_overlong_text(tiny_embedder, tiny_cross_encoder, model):
    import asyncio

    from inferd.encoder.params import RerankParams
    from inferd.errors import InputTooLongError
    from tests.unit.encoder_helpers import started

    path = tiny_embedder if model == "cosine" else tiny_cross_encoder
    with started(path) as client:
        for texts, where in ((["short", LONG], "texts[1]"), ([LONG, "short"], "texts[0]")):
            with pytest.raises(InputTooLongError, match=rf"^{re.escape(where)} has"):
                asyncio.run(client.rerank("the cat", texts, RerankParams(), param="texts"))
        if model == "cosine":
            with pytest.raises(InputTooLongError, match=r"^query has"):
                asyncio.run(client.rerank(LONG, ["short"], RerankParams(), param="texts"))


def test_full_queue_is_a_429_with_retry_after(tiny_embedder):
    from inferd.config import load_settings
    from tests.conftest import free_port, live_server

    settings = load_settings(
        {"model": [f"{tiny_embedder}=tiny"], "port": free_port(), "num_threads": 1, "max_queued_items": 2}
    )
    with live_server(settings) as url:
        body = {"model": "tiny", "input": ["the cat", "the dog", "the sun"]}
        response = httpx.post(url + "/v1/embeddings", json=body)
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1
        validate_openai(response.json(), "ErrorResponse")
        tei = httpx.post(url + "/embed", json={"inputs": body["input"]})
        assert tei.status_code == 429 and tei.json()["error_type"] == "Overloaded"
        assert httpx.post(url + "/v1/embeddings", json=body | {"input": ["ok"]}).status_code == 200
