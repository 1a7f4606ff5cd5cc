"""Rate limits, backpressure, request timeout and request-size limits over real HTTP."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from inferd.api.auth import Principal
from inferd.api.limits import RateLimiter, TokenBucket
from inferd.errors import RateLimitError
from tests.conftest import gated_chat_server, wait_for
from tests.openapi import validate_openai

CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 4}


def _key(name: str) -> dict:
    return {"Authorization": f"Bearer {name}"}


def test_requests_per_minute_per_key(secured_server):
    for _ in range(2):
        assert httpx.get(secured_server + "/v1/models", headers=_key("sk-rpm")).status_code == 200
    refused = httpx.get(secured_server + "/v1/models", headers=_key("sk-rpm"))
    assert refused.status_code == 429
    validate_openai(refused.json(), "ErrorResponse")
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 30
    tei = httpx.post(secured_server + "/embed", headers=_key("sk-rpm"), json={"inputs": "x"})
    assert tei.status_code == 429 and tei.json()["error_type"] == "Overloaded"
    # Another key is not affected.
    assert httpx.get(secured_server + "/v1/models", headers=_key("sk-ops")).status_code == 200


def test_tokens_per_minute_are_reserved_at_admission(secured_server):
    too_large = httpx.post(
        secured_server + "/v1/embeddings",
        headers=_key("sk-tpm"),
        json={"model": "tiny-embed", "input": "the cat and the dog"},
    )
    assert too_large.status_code == 429
    assert "Request too large for tokens per minute: limit 5" in too_large.json()["error"]["message"]
    # A chat request reserves its prompt and max_tokens before it runs.
    chat = httpx.post(
        secured_server + "/v1/chat/completions",
        headers=_key("sk-tpm"),
        json={"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50},
    )
    assert chat.status_code == 429 and "requested" in chat.json()["error"]["message"]
    first = httpx.post(
        secured_server + "/v1/embeddings", headers=_key("sk-tpm"), json={"model": "tiny-embed", "input": "x"}
    )
    assert first.status_code == 200 and first.json()["usage"]["prompt_tokens"] == 3  # [CLS] x [SEP]
    refused = httpx.post(
        secured_server + "/v1/embeddings", headers=_key("sk-tpm"), json={"model": "tiny-embed", "input": "x"}
    )
    assert refused.status_code == 429
    assert "tokens per minute" in refused.json()["error"]["message"]


def test_concurrent_requests_cannot_overrun_the_token_budget_and_unused_tokens_come_back():
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    who = Principal("p", tokens_per_minute=100)
    limiter.reserve_tokens(who, 60)  # prompt + max_tokens of a first request, still running
    with pytest.raises(RateLimitError):
        limiter.reserve_tokens(who, 60)  # a concurrent one: charged at the end, both would pass
    limiter.charge_tokens(who, 10 - 60)  # the first used 10 of its 60
    limiter.reserve_tokens(who, 60)
    with pytest.raises(RateLimitError, match="Request too large"):
        limiter.reserve_tokens(who, 101)


def test_token_bucket_refills_over_time():
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    who = Principal("p", requests_per_minute=60, tokens_per_minute=600)
    limiter.admit(who)
    limiter.charge_tokens(who, 1200)  # overdraft: 600 tokens behind
    with pytest.raises(RateLimitError) as refused:
        limiter.admit(who)
    assert refused.value.retry_after == 60
    now[0] = 61.0
    limiter.admit(who)
    bucket = TokenBucket(60, clock=lambda: now[0])
    bucket.take(60)
    assert bucket.seconds_until(1) == pytest.approx(1.0)


def test_body_size_limit_in_each_family_shape(secured_server):
    big = "x" * (100 * 1024)
    openai_error = httpx.post(
        secured_server + "/v1/embeddings", headers=_key("sk-ops"), json={"model": "tiny-embed", "input": big}
    )
    assert openai_error.status_code == 413
    validate_openai(openai_error.json(), "ErrorResponse")
    tei = httpx.post(secured_server + "/embed", headers=_key("sk-ops"), json={"inputs": big})
    assert tei.status_code == 413 and tei.json()["error_type"] == "Validation"

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(100):
            yield b"x" * 1024

    chunked = httpx.post(
        secured_server + "/v1/rerank",
        headers=_key("sk-ops") | {"content-type": "application/json"},
        content=chunks(),
    )
    assert chunked.status_code == 413 and set(chunked.json()) == {"message"}


@pytest.fixture(scope="module")
def gated(tiny_llama):
    """A chat server whose engine steps only while the gate is open; one running slot, one waiting."""
    limits = {"max_num_seqs": 1, "max_queued_requests": 1, "request_timeout": 2.0, "max_prompt_chars": 500}
    with gated_chat_server(tiny_llama, **limits) as gated:
        yield gated


def test_a_full_llm_queue_refuses_at_once(gated):
    url, client, gate = gated
    gate.clear()
    with ThreadPoolExecutor(2) as pool:
        held = [
            pool.submit(httpx.post, url + "/v1/chat/completions", json=CHAT, timeout=30) for _ in range(2)
        ]
        wait_for(lambda: client.stats().num_waiting == 2)
        start = time.monotonic()
        refused = httpx.post(url + "/v1/chat/completions", json=CHAT)
        assert time.monotonic() - start < 0.5
        gate.set()
        assert [f.result().status_code for f in held] == [200, 200]
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "server_overloaded"
    assert int(refused.headers["retry-after"]) >= 1


def test_request_timeout_aborts_the_engine_request(gated):
    url, client, gate = gated
    gate.clear()
    try:
        timed_out = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert timed_out.status_code == 504
        assert timed_out.json()["error"]["code"] == "timeout"
        assert client.stats().num_waiting == 0  # the client side let go of it
        with httpx.stream(
            "POST", url + "/v1/chat/completions", json=CHAT | {"stream": True}, timeout=30
        ) as r:
            lines = [line for line in r.iter_lines() if line]
        assert r.status_code == 200
        assert "took longer than 2s" in lines[-2] and lines[-1] == "data: [DONE]"
    finally:
        gate.set()
    wait_for(lambda: not client.engine.has_work)  # the aborts reached the engine; blocks are free
    assert client.engine.kv_cache.usage == 0


def test_prompt_character_limit(gated):
    url, _, _ = gated
    response = httpx.post(
        url + "/v1/completions", json={"model": "tiny-chat", "prompt": "the cat " * 100, "max_tokens": 2}
    )
    assert response.status_code == 400
    assert "800 characters" in response.json()["error"]["message"]


def test_more_sequences_than_the_server_holds_is_a_400(gated):
    url, _, _ = gated
    response = httpx.post(url + "/v1/completions", json={"model": "tiny-chat", "prompt": ["a", "b", "c"]})
    assert response.status_code == 400 and "3 sequences" in response.json()["error"]["message"]
