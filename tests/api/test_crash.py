"""An engine that crashes fails its pending requests once (500) and turns /health 503; none hang."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from inferd.config import load_settings
from tests.conftest import free_port, live_server

CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 4}


class _Fatal(BaseException):
    """Not an Exception: nothing on the way may swallow it, as with a real fault."""


@pytest.fixture(scope="module")
def doomed(tiny_llama, tiny_embedder):
    settings = load_settings(
        {
            "model": [f"{tiny_llama}=tiny-chat", f"{tiny_embedder}=tiny-embed"],
            "port": free_port(),
            "num_threads": 1,
            "kv_cache_memory": 4 * 2**20,
        }
    )
    with live_server(settings) as url:
        yield url, {m.name: m.client for m in url.app.state.models}


def _stream_lines(url: str) -> list[str]:
    with httpx.stream("POST", url + "/v1/chat/completions", json=CHAT | {"stream": True}, timeout=30) as r:
        return [line for line in r.iter_lines() if line]


def test_llm_engine_crash_fails_pending_requests_and_health(doomed):
    url, clients = doomed
    llm = clients["tiny-chat"]
    release = threading.Event()

    def crash():
        release.wait(30)
        raise RuntimeError("simulated scheduler fault")

    llm.engine.scheduler.schedule = crash
    with ThreadPoolExecutor(2) as pool:
        plain = pool.submit(httpx.post, url + "/v1/chat/completions", json=CHAT, timeout=30)
        streamed = pool.submit(_stream_lines, url)
        deadline = time.monotonic() + 10
        while llm.stats().num_waiting < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        release.set()
        failed, lines = plain.result(), streamed.result()
    assert failed.status_code == 500
    assert "crashed" in failed.json()["error"]["message"]
    assert "crashed" in lines[-2] and lines[-1] == "data: [DONE]"
    health = httpx.get(url + "/health")
    assert health.status_code == 503 and health.json()["failed"] == ["tiny-chat"]
    assert httpx.get(url + "/ready").status_code == 503
    assert httpx.post(url + "/v1/chat/completions", json=CHAT).status_code == 503
    # The encoder is untouched by the LLM's crash.
    assert httpx.post(url + "/embed", json={"inputs": "the cat"}).status_code == 200


def test_encoder_thread_crash_fails_its_request(doomed):
    url, clients = doomed
    engine = clients["tiny-embed"]._engine

    def fault(batch):
        raise _Fatal("simulated device fault")

    engine.model.forward = fault
    failed = httpx.post(url + "/embed", json={"inputs": "the cat"}, timeout=30)
    assert failed.status_code == 500 and failed.json()["error_type"] == "Backend"
    assert httpx.post(url + "/embed", json={"inputs": "the cat"}).status_code == 503
    assert set(httpx.get(url + "/health").json()["failed"]) == {"tiny-chat", "tiny-embed"}
