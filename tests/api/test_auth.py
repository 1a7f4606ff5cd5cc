"""API keys over real HTTP: every route but the probes and the playground page (static, no secret)
needs one, in each family's shape."""

import re

import httpx
import openai
import pytest

from inferd.api.auth import KeyRing
from inferd.config import load_settings
from inferd.errors import AuthenticationError
from tests.openapi import validate_openai

OPEN_PATHS = {"/health", "/ready", "/", "/ui", "/ui/app.js", "/ui/app.css"}
OPS = {"Authorization": "Bearer sk-ops"}


def _routes(routes) -> list[tuple[str, str]]:
    """(method, concrete path) for every route the app serves, included routers' routes too."""
    pairs = []
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            pairs.extend(_routes(included.routes))
        elif isinstance(getattr(route, "path", None), str) and getattr(route, "methods", None):
            path = re.sub(r"\{[^}]+\}", "x", route.path)
            pairs.extend((method, path) for method in sorted(route.methods) if method != "HEAD")
    return pairs


def _assert_unauthorized(response: httpx.Response, path: str) -> None:
    assert response.status_code == 401, (path, response.text)
    body = response.json()
    if path in ("/embed", "/rerank"):
        assert set(body) == {"error", "error_type"} and body["error_type"] == "Unauthorized"
    elif path in ("/v1/rerank", "/v2/rerank"):
        assert set(body) == {"message"}
    elif path.startswith("/api/"):  # Ollama's shape
        assert set(body) == {"error"} and "API key" in body["error"]
    else:
        validate_openai(body, "ErrorResponse")
        assert body["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-wrong"}, {"x-api-key": "nope"}])
def test_every_route_refuses_a_missing_or_wrong_key(secured_server, headers):
    routes = _routes(secured_server.app.routes)
    assert len(routes) >= 15  # the OpenAI, TEI, Cohere, tokenizer, docs and operations routes
    with httpx.Client(base_url=secured_server, headers=headers) as client:
        for method, path in routes:
            response = client.request(method, path, json={})
            if path in OPEN_PATHS:
                assert response.status_code == 200, path
            else:
                _assert_unauthorized(response, path)
        _assert_unauthorized(client.get("/no/such/route"), "/no/such/route")


def test_bearer_and_x_api_key_are_accepted(secured_server):
    assert httpx.get(secured_server + "/v1/models", headers=OPS).status_code == 200
    assert httpx.get(secured_server + "/v1/models", headers={"x-api-key": "sk-ops"}).status_code == 200
    basic = httpx.get(secured_server + "/v1/models", headers={"Authorization": "Basic sk-ops"})
    assert basic.status_code == 401
    client = openai.OpenAI(base_url=secured_server + "/v1", api_key="sk-ops")
    assert client.embeddings.create(model="tiny-embed", input="the cat").data
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=secured_server + "/v1", api_key="sk-bad").models.list()


def test_a_key_sees_and_uses_only_its_models(secured_server):
    headers = {"Authorization": "Bearer sk-embed-only"}
    listed = httpx.get(secured_server + "/v1/models", headers=headers).json()["data"]
    assert [m["id"] for m in listed] == ["tiny-embed"]
    chat = httpx.post(
        secured_server + "/v1/chat/completions",
        headers=headers,
        json={"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert chat.status_code == 404
    assert chat.json()["error"]["code"] == "model_not_found"
    assert "do not have access" in chat.json()["error"]["message"]
    assert httpx.get(secured_server + "/v1/models/tiny-chat", headers=headers).status_code == 404
    tei = httpx.post(secured_server + "/rerank", headers=headers, json={"query": "q", "texts": ["a"]})
    assert tei.status_code == 403 and tei.json()["error_type"] == "Unauthorized"
    ok = httpx.post(secured_server + "/embed", headers=headers, json={"inputs": "the cat"})
    assert ok.status_code == 200


def test_cors_preflight_needs_no_key(secured_server):
    preflight = httpx.options(
        secured_server + "/v1/embeddings",
        headers={"Origin": "https://ui.example", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://ui.example"
    other = httpx.options(
        secured_server + "/v1/embeddings",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in other.headers


def test_keys_from_flags_file_and_config_entries(tmp_path, monkeypatch):
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nsk-file-1\n\nsk-file-2\n")
    config = tmp_path / "inferd.yaml"
    config.write_text(
        "api_key:\n  - sk-plain\n  - {key: sk-named, name: team-a, models: [m1], requests_per_minute: 5}\n"
        f"api_key_file: {key_file}\ntokens_per_minute: 100\n"
    )
    settings = load_settings({}, config)
    ring = KeyRing(settings.api_keys(), tokens_per_minute=settings.tokens_per_minute)
    named = ring.authenticate([(b"authorization", b"Bearer sk-named")])
    assert (named.name, named.models, named.requests_per_minute, named.tokens_per_minute) == (
        "team-a",
        frozenset({"m1"}),
        5,
        100,
    )
    assert ring.authenticate([(b"x-api-key", b"sk-file-2")]).name.startswith("key-")
    with pytest.raises(AuthenticationError):
        ring.authenticate([(b"authorization", b"Bearer sk-file-3")])
    monkeypatch.setenv("INFERD_API_KEY", "sk-a sk-b")
    assert len(load_settings().api_keys()) == 2
    assert "sk-a" not in repr(load_settings())


def test_ready_names_no_model_when_keys_are_configured(secured_server, server):
    """/ready answers without a key, so it must not list models that only some keys may use."""
    body = httpx.get(secured_server + "/ready").json()
    assert body == {"status": "ready", "models": {"running": 3, "total": 3}}
    assert "tiny-chat" not in httpx.get(secured_server + "/ready").text
    # Without keys nothing is restricted: the names are there for operators.
    assert set(httpx.get(server + "/ready").json()["models"]) == {"tiny-embed", "tiny-cosine", "tiny-rerank"}


def test_version_route_names_the_kernel_build(secured_server):
    from inferd.llm.runner.kernels import variants

    body = httpx.get(secured_server + "/version", headers=OPS).json()
    assert body["kernels"] == variants.runnable()[0].name
