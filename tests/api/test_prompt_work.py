"""Prompt work a client causes is bounded, never runs the client's code, and stays off the event loop."""

import threading
import time

import httpx
import pytest

OPS = {"Authorization": "Bearer sk-ops"}


def _chat(url: str, **extra) -> httpx.Response:
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return httpx.post(url + "/v1/chat/completions", headers=OPS, json=body | extra, timeout=30)


def _llm(url) -> object:
    return next(m.client for m in url.app.state.models if m.name == "tiny-chat")


@pytest.mark.parametrize("name", ["chat_template", "tokenize", "tools", "return_dict", "not an identifier"])
def test_template_kwargs_cannot_replace_the_template_or_the_renderers_arguments(secured_server, name):
    response = _chat(secured_server, chat_template_kwargs={name: "{% for i in range(10**9) %}{% endfor %}"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "chat_template_kwargs"
    assert repr(name) in response.json()["error"]["message"]


def test_template_variables_still_reach_the_template(secured_server):
    assert _chat(secured_server, chat_template_kwargs={"enable_thinking": False}).status_code == 200


def test_the_default_prompt_cap_follows_the_context_and_refuses_before_rendering(secured_server, monkeypatch):
    client = _llm(secured_server)
    assert client.engine.config.max_prompt_chars is None
    assert client.max_prompt_chars == 32 * client.max_model_len

    def never(*args, **kwargs):
        raise AssertionError("rendered a prompt over the character cap")

    monkeypatch.setattr(client.tokenizer, "apply_chat_template", never)
    text = "x" * (client.max_prompt_chars + 1)
    response = _chat(secured_server, messages=[{"role": "user", "content": text}])
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    assert f"limit of {client.max_prompt_chars}" in response.json()["error"]["message"]


def test_rendering_runs_off_the_event_loop(secured_server, monkeypatch):
    client = _llm(secured_server)
    render = client.render_chat

    def slow_render(*args, **kwargs):
        time.sleep(1.0)  # a slow template: it must hold a worker thread, not the event loop
        return render(*args, **kwargs)

    monkeypatch.setattr(client, "render_chat", slow_render)
    done = threading.Event()
    # Template kwargs make a render whose cost the server cannot tell from the characters alone.
    slow = {"chat_template_kwargs": {"enable_thinking": False}}
    thread = threading.Thread(target=lambda: (_chat(secured_server, **slow), done.set()))
    thread.start()
    latencies = []
    while not done.is_set():
        start = time.perf_counter()
        assert httpx.get(secured_server + "/health").status_code == 200
        latencies.append(time.perf_counter() - start)
        time.sleep(0.05)
    thread.join()
    assert len(latencies) >= 5
    assert max(latencies) < 0.25, latencies


def test_tokenising_a_long_prompt_lets_other_threads_run(secured_server, monkeypatch):
    """A worker thread is no help if the tokenizer holds the GIL for the whole prompt: the event
    loop's thread would stall just the same."""
    from dataclasses import replace

    client = _llm(secured_server)
    monkeypatch.setattr(client.engine, "config", replace(client.engine.config, max_prompt_chars=10**8))
    text = "the cat and the dog " * 200_000  # 4M characters: about a second of tokenising
    gaps = []
    worker = threading.Thread(target=client.encode, args=(text,))
    last = time.perf_counter()
    worker.start()
    while worker.is_alive():
        time.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    assert len(gaps) > 50 and max(gaps) < 0.1, (len(gaps), max(gaps))


async def test_cancelled_prompt_work_still_holds_its_thread_slot():
    """A client that sends a large prompt and hangs up must not free the slot of a thread still
    rendering it: the prompt threads stay bounded however often clients disconnect."""
    import asyncio

    from inferd.api.serving.generation import _PREPARE_THREADS, off_loop

    running, peak, lock = [0], [0], threading.Lock()

    def work() -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1

    slots = _PREPARE_THREADS
    hung_up = [asyncio.ensure_future(off_loop(work)) for _ in range(slots)]
    await asyncio.sleep(0.05)  # all slots busy
    for task in hung_up:
        task.cancel()  # their clients left; their threads still run
    await asyncio.sleep(0)
    later = [asyncio.ensure_future(off_loop(work)) for _ in range(slots)]
    await asyncio.gather(*hung_up, *later, return_exceptions=True)
    assert peak[0] <= slots
