"""One hostile client never hurts anyone else's request (issue 12's acceptance test).

A real ``inferd serve`` process (tiny chat model, embedder, cross-encoder) runs 8 greedy streams
while ~50 hostile requests of every known kind are fired at it in parallel. The streams must finish
with exactly the text they produce on a quiet server, every hostile request must get a 4xx in its
family's shape, and ``/health`` must keep answering within 100 ms throughout (one probe may take
up to 300 ms: see the test).

Structural attacks go just past their caps (thousands of items, not millions): what a body costs
to parse as JSON is paid on the event loop before any check can run (about 60 ms a MiB of small
values here), and it is bounded by --max-request-bytes, not by these caps (docs/SECURITY.md).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.openapi import validate_openai

PROMPTS = [f"the cat and the dog number {i} went to the" for i in range(8)]
SLOW_LOOP = "{% for i in range(10000) %}{% for j in range(3000) %}{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def served(tiny_llama: Path, tiny_embedder: Path, tiny_cross_encoder: Path) -> Iterator[str]:
    port = free_port()
    command = [
        sys.executable, "-m", "inferd", "serve",
        "--model", f"{tiny_llama}=tiny-chat",
        "--model", f"{tiny_embedder}=tiny-embed",
        "--model", f"{tiny_cross_encoder}=tiny-rerank",
        "--port", str(port), "--num-threads", "1", "--kv-cache-memory", str(16 * 2**20),
        "--log-level", "warning",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(url + "/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert process.poll() is None, process.stdout.read()
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert "Traceback" not in output, output


def _chat(**extra) -> tuple[str, dict]:
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    return "/v1/chat/completions", body | extra


def _hostile() -> list[tuple[str, dict]]:
    """One request per known attack; the list is cycled to ~50 requests."""
    huge = "x" * 2_000_000
    return [
        _chat(logit_bias={"99999999": 1}),
        _chat(logit_bias={"²": 1}),
        _chat(logit_bias={str(i): 1 for i in range(1000)}),
        _chat(stop_token_ids=[99999999], min_tokens=3),
        _chat(stop_token_ids=list(range(5000))),
        _chat(stop=["y" * 100_000]),
        _chat(chat_template_kwargs={"chat_template": SLOW_LOOP}),
        _chat(chat_template_kwargs={"tokenize": True}),
        _chat(messages=[{"role": "user", "content": "hi"}] * 3000),
        _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}] * 1000}]),
        _chat(messages=[{"role": "user", "content": huge}]),
        _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        _chat(max_tokens=10**9),
        _chat(n=10**6),
        _chat(tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(500)]),
        ("/v1/completions", {"model": "tiny-chat", "prompt": [[-1, 5]], "max_tokens": 2}),
        ("/v1/completions", {"model": "tiny-chat", "prompt": [[10**9]], "max_tokens": 2}),
        ("/v1/completions", {"model": "tiny-chat", "prompt": huge, "max_tokens": 2}),
        ("/detokenize", {"model": "tiny-chat", "tokens": [-1]}),
        ("/detokenize", {"model": "tiny-chat", "tokens": [10**12]}),
        ("/tokenize", {"model": "tiny-chat", "prompt": huge}),
        ("/v1/embeddings", {"model": "tiny-embed", "input": ["a"] * 2048, "prompt": "p" * 1_000_000}),
        ("/v1/embeddings", {"model": "tiny-embed", "input": [[-1]]}),
        ("/v1/rerank", {"model": "tiny-rerank", "query": "q" * 1_000_000, "documents": ["d"] * 2048}),
        ("/rerank", {"query": "", "texts": ["a"]}),
    ]


def _assert_family_error(path: str, response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, (path, response.status_code, response.text[:300])
    body = response.json()
    if path in ("/embed", "/rerank"):
        assert set(body) == {"error", "error_type"}
    elif path in ("/v1/rerank", "/v2/rerank"):
        assert set(body) == {"message"}
    else:
        validate_openai(body, "ErrorResponse")


async def _stream_text(client: httpx.AsyncClient, prompt: str) -> str:
    # 200 tokens: long enough for the health probes to overlap the attack on a fast CPU (at 48 the
    # whole noisy run took ~0.1 s on a Zen 5 EPYC, five probes)
    body = {"model": "tiny-chat", "prompt": prompt, "max_tokens": 200, "temperature": 0, "stream": True}
    text = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, event
                text.append(event["choices"][0]["text"])
    return "".join(text)


def _watch_health(url: str, stop: threading.Event, latencies: list[float]) -> None:
    """On its own thread, so that the test's own event loop (sending the attacks) adds nothing. A
    failed probe is recorded as an infinite latency: an exception here would only end the thread."""
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                is_ok = client.get("/health").status_code == 200
            except httpx.HTTPError:
                is_ok = False
            latencies.append(time.perf_counter() - start if is_ok else float("inf"))
            time.sleep(0.02)


async def _noisy_run(url: str) -> list[str]:
    # Encoded up front: the bodies' JSON is not the test loop's work while the streams run.
    attacks = [(path, json.dumps(body).encode()) for path, body in _hostile()]
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def attack(path: str, body: bytes) -> None:
            headers = {"content-type": "application/json"}
            _assert_family_error(path, await client.post(path, content=body, headers=headers))

        streams = [asyncio.create_task(_stream_text(client, p)) for p in PROMPTS]
        await asyncio.gather(*(attack(*attacks[i % len(attacks)]) for i in range(50)))
        return list(await asyncio.gather(*streams))


def test_hostile_requests_do_not_disturb_greedy_streams_or_probes(served):
    async def quiet() -> list[str]:
        async with httpx.AsyncClient(base_url=served, timeout=120) as client:
            return list(await asyncio.gather(*(_stream_text(client, p) for p in PROMPTS)))

    expected = asyncio.run(quiet())
    assert all(expected)
    stop, latencies = threading.Event(), []
    watcher = threading.Thread(target=_watch_health, args=(served, stop, latencies))
    watcher.start()
    try:
        texts = asyncio.run(_noisy_run(served))
    finally:
        stop.set()
        watcher.join()
    assert texts == expected
    assert len(latencies) > 5
    # Every probe within 100 ms but one, which gets 300 ms: the probe's thread shares this test
    # process's GIL with the attacking client, and on two cores one scheduler hiccup reached
    # 126 ms in a full-suite run (the rest under 70 ms). A loop blocked by a hostile request
    # (a template, a parse) shows as seconds.
    worst, *rest = sorted(latencies, reverse=True)
    assert worst < 0.3 and max(rest) < 0.1, sorted(latencies)[-5:]
