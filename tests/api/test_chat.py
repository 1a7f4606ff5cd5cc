"""Chat and text completions over real HTTP with the official openai client (tiny llama)."""

import asyncio
import json

import httpx
import openai
import pytest

from inferd.config import load_settings
from tests.conftest import free_port, live_server
from tests.openapi import validate_openai


@pytest.fixture(scope="module")
def llm_server(tiny_llama, tiny_embedder):
    settings = load_settings(
        {
            "model": [f"{tiny_llama}=tiny-chat", f"{tiny_embedder}=tiny-embed"],
            "port": free_port(),
            "num_threads": 1,
            "kv_cache_memory": 4 * 2**20,
            "max_n": 4,
            # fp32: the logprob checks compare with transformers' fp32 forward.
            "dtype": "float32",
        }
    )
    with live_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def client(llm_server):
    return openai.OpenAI(base_url=llm_server + "/v1", api_key="unused")


MESSAGES = [{"role": "system", "content": "the cat"}, {"role": "user", "content": "paris is the capital of"}]


def test_chat_completion_is_valid_and_greedy_is_deterministic(client, llm_server):
    first = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8, temperature=0)
    second = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8, temperature=0)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.choices[0].finish_reason in ("stop", "length")
    assert first.usage.completion_tokens <= 8 and first.usage.prompt_tokens > 5
    raw = httpx.post(
        llm_server + "/v1/chat/completions",
        json={
            "model": "tiny-chat",
            "messages": MESSAGES,
            "max_tokens": 4,
            "logprobs": True,
            "top_logprobs": 2,
        },
    ).json()
    validate_openai(raw, "CreateChatCompletionResponse")
    assert len(raw["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2


def test_stream_concatenates_to_the_full_text_and_chunks_are_valid(client, llm_server):
    kwargs = dict(model="tiny-chat", messages=MESSAGES, max_tokens=10, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"] or finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    with httpx.stream(
        "POST",
        llm_server + "/v1/chat/completions",
        json=kwargs | {"stream": True, "stream_options": {"include_usage": True}},
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        validate_openai(json.loads(line.removeprefix("data: ")), "CreateChatCompletionStreamResponse")


def test_async_client_and_n_choices(llm_server):
    async def main():
        async_client = openai.AsyncOpenAI(base_url=llm_server + "/v1", api_key="unused")
        result = await async_client.chat.completions.create(
            model="tiny-chat", messages=MESSAGES, max_tokens=5, n=3, temperature=1.0, seed=7
        )
        again = await async_client.chat.completions.create(
            model="tiny-chat", messages=MESSAGES, max_tokens=5, n=3, temperature=1.0, seed=7
        )
        stream = await async_client.chat.completions.create(
            model="tiny-chat", messages=MESSAGES, max_tokens=5, n=3, temperature=1.0, seed=7, stream=True
        )
        streamed = ["", "", ""]
        async for chunk in stream:
            for choice in chunk.choices:
                streamed[choice.index] += choice.delta.content or ""
        return result, again, streamed

    result, again, streamed = asyncio.run(main())
    assert streamed == [c.message.content for c in result.choices]
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert [c.message.content for c in result.choices] == [c.message.content for c in again.choices]


def test_completions_with_token_prompts_and_logprobs(client, llm_server):
    result = client.completions.create(
        model="tiny-chat", prompt=["the cat", "paris is"], max_tokens=4, temperature=0, logprobs=2, echo=False
    )
    assert len(result.choices) == 2
    assert len(result.choices[0].logprobs.token_logprobs) == len(result.choices[0].logprobs.tokens)
    raw = httpx.post(
        llm_server + "/v1/completions",
        json={"model": "tiny-chat", "prompt": [[10, 11, 12]], "max_tokens": 3, "echo": True},
    ).json()
    validate_openai(raw, "CreateCompletionResponse")
    assert raw["choices"][0]["text"].startswith(
        httpx.post(llm_server + "/detokenize", json={"tokens": [10, 11, 12]}).json()["prompt"]
    )


BAD_CHAT = [
    ({"messages": []}, 400),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400),
    ({"temperature": 2.5}, 400),
    ({"temperature": -0.1}, 400),
    ({"top_p": 0}, 400),
    ({"top_p": 1.5}, 400),
    ({"n": 0}, 400),
    ({"n": 5}, 400),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400),
    ({"max_tokens": -1}, 400),
    ({"logit_bias": {"5": 101}}, 400),
    ({"max_tokens": 100000}, 400),
    ({"model": "nope"}, 404),
    ({"model": "tiny-embed"}, 400),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
]


@pytest.mark.parametrize(("patch", "status"), BAD_CHAT)
def test_bad_chat_requests(llm_server, patch, status):
    body = {"model": "tiny-chat", "messages": MESSAGES} | patch
    response = httpx.post(llm_server + "/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    validate_openai(response.json(), "ErrorResponse")


def test_context_length_error_uses_openais_code(llm_server):
    body = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 100000}
    error = httpx.post(llm_server + "/v1/chat/completions", json=body).json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "maximum context length is 256 tokens" in error["message"]


def test_models_lists_the_chat_model(llm_server):
    cards = {m["id"]: m for m in httpx.get(llm_server + "/v1/models").json()["data"]}
    assert cards["tiny-chat"]["kind"] == "chat" and cards["tiny-chat"]["max_model_len"] == 256
    # the precision it serves in: float32 asked for, so no int8 choice of the server's
    card = cards["tiny-chat"]
    assert (card["dtype"], card["quantization"], card["kv_cache_dtype"]) == ("float32", "none", "float32")


def test_echo_with_logprobs_scores_the_prompt(llm_server, tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    prompt = [8, 9, 10, 11, 12]
    body = {
        "model": "tiny-chat",
        "prompt": prompt,
        "max_tokens": 2,
        "echo": True,
        "logprobs": 2,
        "temperature": 0,
    }
    result = httpx.post(llm_server + "/v1/completions", json=body).json()
    logprobs = result["choices"][0]["logprobs"]
    # OpenAI's legacy API (and vLLM) give the first echoed token null logprobs, as nothing predicts
    # it; the OpenAPI schema's arrays admit numbers only, so validate the rest of the body.
    validate_openai(
        result | {"choices": [{**result["choices"][0], "logprobs": {k: v[1:] for k, v in logprobs.items()}}]},
        "CreateCompletionResponse",
    )
    assert len(logprobs["tokens"]) == len(prompt) + 2
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([prompt])).logits[0], dim=-1)
    expected = [reference[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
    assert logprobs["token_logprobs"][1 : len(prompt)] == pytest.approx(expected, abs=1e-4)
    assert all(len(top) == 2 for top in logprobs["top_logprobs"][1:])
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_a_disconnected_stream_is_aborted_and_frees_its_blocks(llm_server):
    import time

    engine = next(m for m in llm_server.app.state.models if m.name == "tiny-chat").client.engine
    aborted_before = engine.scheduler.num_finished["abort"]
    body = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", llm_server + "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        assert engine.scheduler.running  # generating while we read
    # The connection is closed: within a few steps the request is gone and its blocks are free.
    deadline = time.monotonic() + 10
    while (engine.scheduler.running or engine.kv_cache.usage > 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.kv_cache.usage == 0
    assert engine.scheduler.num_finished["abort"] == aborted_before + 1


def test_a_stream_sends_nothing_before_its_first_token(tiny_llama):
    """The role chunk goes out with the first token: until the engine has run the request, the
    body is empty (so an ingress in front may still retry it elsewhere)."""
    import queue
    import threading

    from tests.conftest import gated_chat_server

    with gated_chat_server(tiny_llama) as (url, _, gate):
        gate.clear()
        received: queue.Queue = queue.Queue()
        body = {
            "model": "tiny-chat",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "stream": True,
        }

        def read() -> None:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
                received.put(("status", response.status_code))
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        received.put(("event", line[6:]))
            received.put(("end", None))

        threading.Thread(target=read, daemon=True).start()
        assert received.get(timeout=10) == ("status", 200)  # the headers are out at once
        with pytest.raises(queue.Empty):
            received.get(timeout=0.5)  # the engine has not stepped: not a byte of body
        gate.set()
        kind, first = received.get(timeout=10)
        assert kind == "event"
        first_delta = json.loads(first)["choices"][0]["delta"]
        assert first_delta == {"role": "assistant", "content": ""}
        kind, second = received.get(timeout=10)
        assert json.loads(second)["choices"][0]["delta"].get("content")  # the first token, right behind it


def test_tokenize_answers_the_ids_and_detokenize_reverses_them(llm_server):
    prompt = httpx.post(
        llm_server + "/tokenize", json={"model": "tiny-chat", "prompt": "the cat and the dog"}
    )
    assert prompt.status_code == 200
    answer = prompt.json()
    assert answer["count"] == len(answer["tokens"]) > 0 and answer["max_model_len"] > 0
    back = httpx.post(llm_server + "/detokenize", json={"model": "tiny-chat", "tokens": answer["tokens"]})
    assert "the cat and the dog" in back.json()["prompt"]
    chat = httpx.post(
        llm_server + "/tokenize",
        json={"model": "tiny-chat", "messages": [{"role": "user", "content": "the cat"}]},
    ).json()
    assert chat["count"] > len(
        httpx.post(llm_server + "/tokenize", json={"prompt": "the cat"}).json()["tokens"]
    )
