"""The playground page (``GET /``) in a real headless Chromium against live servers of tiny models:
what it shows is what the API answers (the chat reply streamed, the cosine of the embeddings, the
rerank order), it keeps a conversation, stops a reply, honours an API key, and talks to no other
origin."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from playwright.sync_api import Browser, Page, Request, expect, sync_playwright

from inferd.config import load_settings
from tests.conftest import free_port, live_server
from tests.models import build_byte_llama

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY = "sk-playground"
TIMEOUT_MS = 20_000

# DeepSeek-R1's newer layout: earlier replies lose their reasoning, and the generation prompt opens a
# think block, so the reply is reasoning until the model writes </think> (a random model hardly ever
# does). Its long context lets a reply run long enough to be stopped.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.split('</think>')[-1] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


@contextmanager
def _serving(settings: dict) -> Iterator[str]:
    """A live server as ``inferd serve`` builds it (the page included)."""
    base = {"port": free_port(), "num_threads": 1, "kv_cache_memory": 16 * 2**20}
    with live_server(load_settings(base | settings)) as url:
        yield url


@pytest.fixture(scope="module")
def thinker(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ui-models")
    added = ("<think>", "</think>")
    # never_ends: a reply to be stopped must still be running when the click comes, however fast the CPU
    return build_byte_llama(
        root, "thinker", THINKING_TEMPLATE, added=added, max_position_embeddings=8192, never_ends=True
    )


@pytest.fixture(scope="module")
def server(tiny_llama, tiny_embedder, tiny_cross_encoder, thinker) -> Iterator[str]:
    models = [
        f"{tiny_llama}=tiny-chat",
        f"{thinker}=tiny-think",
        f"{tiny_embedder}=tiny-embed",
        f"{tiny_cross_encoder}=tiny-rerank",
    ]
    with _serving({"model": models}) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_server(tiny_llama) -> Iterator[str]:
    with _serving({"model": [f"{tiny_llama}=tiny-chat"], "api_key": [{"key": KEY, "name": "ui"}]}) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"the UI tests drive Chromium at {CHROMIUM}: install it (apt-get install chromium)")
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class Session:
    """A fresh browser context (empty localStorage) on one page, with what the page did recorded."""

    page: Page
    requests: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def posted(self, path: str) -> list[dict]:
        return [r.post_data_json for r in self.requests if r.method == "POST" and r.url.endswith(path)]


@pytest.fixture
def session(browser) -> Iterator[Session]:
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    session = Session(context.new_page())
    session.page.on("request", lambda r: session.requests.append(r))
    session.page.on("requestfailed", lambda r: session.failed.append(r))
    session.page.on("pageerror", lambda exc: session.errors.append(str(exc)))
    session.page.on(
        "console", lambda m: session.errors.append(m.text) if "Content Security Policy" in m.text else None
    )
    yield session
    context.close()


def _open(session: Session, url: str) -> Page:
    response = session.page.goto(url + "/")
    assert response is not None and response.status == 200, (
        f"GET / answered {response and response.status}: the page must be public (no API key)"
    )
    return session.page


def _assert_own_origin_only(session: Session, url: str) -> None:
    assert session.requests, "the page made no request at all"
    foreign = [r.url for r in session.requests if not r.url.startswith(url + "/")]
    assert not foreign, f"requests to other origins: {foreign}"
    assert not session.errors, session.errors


def _send(page: Page, text: str) -> None:
    page.fill("#chat-input", text)
    page.press("#chat-input", "Enter")


def _last_reply(page: Page):
    return page.locator(".message.assistant").last


def _wait_for_reply(page: Page, number: int) -> str:
    reply = page.locator(".message.assistant").nth(number - 1)
    expect(reply.locator(".stats")).to_contain_text("tok/s")
    return reply.locator(".content").text_content()


def test_chat_streams_the_reply_the_api_gives(server, session, tmp_path):
    page = _open(session, server)
    expect(page.locator("#chat-model option")).to_have_text(["tiny-chat", "tiny-think"])
    expect(page.locator("#embed-model option")).to_have_text(["tiny-embed"])
    expect(page.locator("#rerank-model option")).to_have_text(["tiny-rerank"])
    page.select_option("#chat-model", "tiny-chat")
    page.fill("#chat-temperature", "0")
    page.fill("#chat-max-tokens", "12")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)

    def reference(messages):
        """The same request as the page's, answered whole by the API."""
        return client.chat.completions.create(
            model="tiny-chat", messages=messages, temperature=0, max_tokens=12
        )

    # Shift+Enter is a new line in the message; Enter sends it.
    page.fill("#chat-input", "hello there")
    page.press("#chat-input", "Shift+Enter")
    page.type("#chat-input", "friend")
    page.press("#chat-input", "Enter")
    first = _wait_for_reply(page, 1)
    (body,) = session.posted("/v1/chat/completions")
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "hello there\nfriend"}]
    expected = reference(body["messages"])
    assert first == expected.choices[0].message.content and first
    stats = _last_reply(page).locator(".stats").text_content()
    tokens = expected.usage.completion_tokens
    assert re.search(rf"^{tokens} tokens · [\d.]+ tok/s · TTFT \d+ ms", stats), stats

    # The second turn carries the first (and markup in it stays text).
    markup = '<img src=x onerror="document.title=1"> <b>bold</b>'
    _send(page, markup)
    second = _wait_for_reply(page, 2)
    history = session.posted("/v1/chat/completions")[1]["messages"]
    assert history[:2] == [body["messages"][0], {"role": "assistant", "content": first}]
    assert history[2] == {"role": "user", "content": markup}
    expected = reference(history)
    assert second == expected.choices[0].message.content
    user = page.locator(".message.user").last
    expect(user).to_have_text(markup)
    assert user.locator("img, b").count() == 0
    assert page.title() == "inferd playground"

    page.screenshot(path=tmp_path / "chat.png", full_page=True)
    page.screenshot(path="/tmp/ui-chat.png", full_page=True)
    _assert_own_origin_only(session, server)


def test_reasoning_shows_apart_from_the_answer(server, session):
    page = _open(session, server)
    page.select_option("#chat-model", "tiny-think")
    page.fill("#chat-temperature", "0")
    page.fill("#chat-max-tokens", "16")
    _send(page, "think first")
    _wait_for_reply(page, 1)
    body = session.posted("/v1/chat/completions")[0]
    expected = httpx.post(server + "/v1/chat/completions", json=body | {"stream": False}, timeout=60).json()
    message = expected["choices"][0]["message"]
    assert message["reasoning_content"], "the template opens a think block: the reply starts as reasoning"
    reasoning = _last_reply(page).locator(".reasoning")
    expect(reasoning).to_be_visible()
    assert reasoning.locator("div").text_content() == message["reasoning_content"]
    assert _last_reply(page).locator(".content").text_content() == (message["content"] or "")
    _assert_own_origin_only(session, server)


def test_stop_ends_the_reply_and_keeps_what_arrived(server, session):
    page = _open(session, server)
    page.select_option("#chat-model", "tiny-think")
    page.fill("#chat-max-tokens", "8000")  # seconds of tokens: it is stopped long before the end
    _send(page, "a long one")
    reasoning = _last_reply(page).locator(".reasoning div")
    expect(reasoning).not_to_be_empty()
    page.click("#chat-stop")
    expect(_last_reply(page).locator(".stats")).to_contain_text("stopped")
    # The browser reports the aborted request as an event of its own, which may come a moment after
    # the page has shown "stopped".
    for _ in range(100):
        if session.failed:
            break
        page.wait_for_timeout(50)
    (aborted,) = session.failed
    assert aborted.url.endswith("/v1/chat/completions") and aborted.failure == "net::ERR_ABORTED"
    expect(page.locator("#chat-stop")).to_be_disabled()

    # The conversation goes on: the stopped turn, as far as it came, is part of it.
    shown = _last_reply(page).locator(".content").text_content()
    page.fill("#chat-max-tokens", "4")
    _send(page, "and now short")
    _wait_for_reply(page, 2)
    messages = session.posted("/v1/chat/completions")[1]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == shown
    _assert_own_origin_only(session, server)


def test_embeddings_tab_shows_the_cosine_of_the_api_embeddings(server, session):
    page = _open(session, server)
    page.click("#tab-embeddings")
    similarity = page.locator("#embed-similarity")
    page.fill("#embed-a", "the cat sat on the mat")
    page.fill("#embed-b", "the cat sat on the mat")
    page.click("#embed-run")
    expect(similarity).not_to_be_empty()
    assert abs(float(similarity.text_content()) - 1) < 1e-3

    texts = ["the cat sat on the mat", "stock markets fell sharply today"]
    page.fill("#embed-b", texts[1])
    page.click("#embed-run")
    expect(similarity).not_to_have_text("1.0000")
    response = httpx.post(server + "/v1/embeddings", json={"model": "tiny-embed", "input": texts})
    a, b = (np.array(d["embedding"]) for d in response.json()["data"])
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert abs(float(similarity.text_content()) - cosine) < 1e-4
    page.screenshot(path="/tmp/ui-embeddings.png", full_page=True)
    _assert_own_origin_only(session, server)


def test_rerank_tab_shows_the_api_order(server, session):
    page = _open(session, server)
    page.click("#tab-rerank")
    documents = ["a cat sat on a mat", "paris is in france", "cats chase mice", "the stock market fell"]
    page.fill("#rerank-query", "what do cats do")
    page.fill("#rerank-documents", "\n".join(documents) + "\n\n")
    page.click("#rerank-run")
    rows = page.locator("#rerank-results li")
    expect(rows).to_have_count(len(documents))
    body = {"model": "tiny-rerank", "query": "what do cats do", "documents": documents}
    results = httpx.post(server + "/v1/rerank", json=body).json()["results"]
    assert rows.locator(".document").all_text_contents() == [documents[r["index"]] for r in results]
    shown = [float(s) for s in rows.locator(".score").all_text_contents()]
    assert shown == pytest.approx([r["relevance_score"] for r in results], abs=1e-4)
    page.screenshot(path="/tmp/ui-rerank.png", full_page=True)
    _assert_own_origin_only(session, server)


def test_api_errors_are_shown(server, session):
    page = _open(session, server)
    page.select_option("#chat-model", "tiny-chat")
    page.fill("#chat-temperature", "7")  # above the API's bound of 2
    _send(page, "hello")
    expect(page.locator("#notice")).to_contain_text("temperature")
    expect(_last_reply(page)).to_have_class(re.compile("failed"))
    assert page.input_value("#chat-input") == "hello"  # kept, to send again


def test_api_key_is_asked_for_and_sent(keyed_server, session):
    page = _open(session, keyed_server)
    notice = page.locator("#notice")
    expect(notice).to_contain_text("needs an API key")
    expect(page.locator("#chat-model")).to_be_disabled()
    page.screenshot(path="/tmp/ui-key.png", full_page=True)
    page.fill("#api-key", "sk-wrong")
    page.press("#api-key", "Tab")  # the key is taken on change
    expect(notice).to_contain_text("refused this API key")

    page.fill("#api-key", KEY)
    page.press("#api-key", "Tab")
    expect(page.locator("#chat-model option")).to_have_text(["tiny-chat"])
    expect(notice).to_be_hidden()
    page.fill("#chat-max-tokens", "8")
    _send(page, "hello")
    assert _wait_for_reply(page, 1)
    api_calls = [r for r in session.requests if "/v1/" in r.url]
    assert api_calls[0].headers.get("authorization") is None
    assert api_calls[1].headers.get("authorization") == "Bearer sk-wrong"
    assert all(r.headers.get("authorization") == f"Bearer {KEY}" for r in api_calls[2:])

    # The key is remembered: a reload loads the models without asking.
    page.reload()
    expect(page.locator("#chat-model option")).to_have_text(["tiny-chat"])
    expect(notice).to_be_hidden()
    assert json.loads(page.evaluate("JSON.stringify(localStorage.getItem('inferd.apiKey'))")) == KEY
    _assert_own_origin_only(session, keyed_server)


def test_assets_are_served_with_their_types(server):
    for path, media_type in [
        ("/", "text/html"),
        ("/ui", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ]:
        response = httpx.get(server + path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith(media_type), path
        assert response.headers["cache-control"] == "no-cache"
        again = httpx.get(server + path, headers={"if-none-match": response.headers["etag"]})
        assert again.status_code == 304 and not again.content
    assert "connect-src 'self'" in httpx.get(server + "/").headers["content-security-policy"]
    schema = httpx.get(server + "/openapi.json").json()
    assert "/" not in schema["paths"] and "/ui" not in schema["paths"]
