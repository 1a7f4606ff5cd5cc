"""Per-key concurrency caps over real HTTP: the request past a key's cap gets 429 at once, other
keys go on, and the slot comes back when a response ends, a stream included, or its client leaves."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from inferd.api.auth import Principal
from inferd.api.concurrency import ConcurrencyLimiter
from inferd.errors import RateLimitError
from tests.conftest import gated_chat_server, wait_for
from tests.openapi import validate_openai

CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 4}
KEYS = [
    {"key": "sk-two", "name": "two", "max_concurrent_requests": 2},
    {"key": "sk-default", "name": "default"},  # the server's cap applies
    {"key": "sk-other", "name": "other", "max_concurrent_requests": 100},
]


def _key(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def capped(tiny_llama):
    """Keys with caps, and a chat engine that steps only while the gate is open."""
    with gated_chat_server(tiny_llama, api_key=KEYS, max_concurrent_requests=1) as (url, client, gate):
        limiter = url.app.user_middleware[0].kwargs["policy"].concurrency
        yield url, client, gate, limiter


def _stream(url: str, key: str) -> list[str]:
    body = CHAT | {"stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=_key(key), timeout=30) as r:
        assert r.status_code == 200
        return [line for line in r.iter_lines() if line]


def test_the_request_past_a_keys_cap_gets_429_at_once(capped):
    url, client, gate, limiter = capped
    gate.clear()
    try:
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(_stream, url, "sk-two") for _ in range(2)]
            wait_for(lambda: client.stats().num_waiting == 2)  # both in the engine, held by the gate
            start = time.monotonic()
            refused = httpx.post(url + "/v1/chat/completions", json=CHAT, headers=_key("sk-two"), timeout=2)
            assert time.monotonic() - start < 0.5
            tei = httpx.post(url + "/embed", json={"inputs": "x"}, headers=_key("sk-two"))
            other = httpx.get(url + "/v1/models", headers=_key("sk-other"))
            gate.set()
            streams = [future.result() for future in held]
    finally:
        gate.set()
    assert refused.status_code == 429
    validate_openai(refused.json(), "ErrorResponse")
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "limit 2" in refused.json()["error"]["message"] and refused.headers["retry-after"] == "1"
    assert tei.status_code == 429 and tei.json()["error_type"] == "Overloaded"
    assert other.status_code == 200  # another key is not affected
    assert all(lines[-1] == "data: [DONE]" for lines in streams)
    # The streams have ended: their slots are back, and the key runs two at once again.
    wait_for(lambda: limiter.num_in_flight("two") == 0)
    with ThreadPoolExecutor(2) as pool:
        again = list(pool.map(lambda _: _stream(url, "sk-two"), range(2)))
    assert all(lines[-1] == "data: [DONE]" for lines in again)


def test_the_servers_cap_applies_to_a_key_without_its_own(capped):
    url, client, gate, _ = capped
    gate.clear()
    try:
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(_stream, url, "sk-default")
            wait_for(lambda: client.stats().num_waiting == 1)
            refused = httpx.post(
                url + "/v1/chat/completions", json=CHAT, headers=_key("sk-default"), timeout=2
            )
            gate.set()
            assert held.result()[-1] == "data: [DONE]"
    finally:
        gate.set()
    assert refused.status_code == 429 and "limit 1" in refused.json()["error"]["message"]


def test_a_client_that_leaves_frees_its_slot(capped):
    url, client, gate, limiter = capped
    gate.clear()
    try:
        body = CHAT | {"stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=_key("sk-two")) as r:
            assert r.status_code == 200
            wait_for(lambda: client.stats().num_waiting == 1)
            assert limiter.num_in_flight("two") == 1
        # The client closed its connection mid-stream, before any token was generated.
        wait_for(lambda: limiter.num_in_flight("two") == 0)
    finally:
        gate.set()


def test_limiter_counts_per_key_and_frees_each_slot_once():
    limiter = ConcurrencyLimiter()
    one = Principal("one", max_concurrent_requests=1)
    slot = limiter.acquire(one)
    with pytest.raises(RateLimitError):
        limiter.acquire(one)
    unlimited = Principal("free")
    slots = [limiter.acquire(unlimited) for _ in range(1000)]
    assert limiter.num_in_flight("free") == 0 and len(slots) == 1000
    slot.release()
    slot.release()  # a second release must not free someone else's slot
    assert limiter.num_in_flight("one") == 0
    with limiter.acquire(one):
        assert limiter.num_in_flight("one") == 1
    assert limiter.num_in_flight("one") == 0
