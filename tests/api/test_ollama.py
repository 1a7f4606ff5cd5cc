"""Ollama's API with the official ``ollama`` client on a live server of tiny models: chat and generate
(the same text as the OpenAI route), embed, the model lists, structured output, thinking, tools,
keep_alive unloading, errors in Ollama's shape, and pull/delete against the fake hub."""

import json
from pathlib import Path

import httpx
import jsonschema
import ollama
import pytest

from inferd.config import load_settings
from tests.api.test_reasoning import QWEN3_TEMPLATE, R1_TEMPLATE, SCHEMA, THINK
from tests.conftest import free_port, live_server, wait_for
from tests.fakehub import FakeHub, FakeHubServer
from tests.models import build_byte_llama

USER = [{"role": "user", "content": "What is 2 + 3?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama, tiny_embedder):
    root = tmp_path_factory.mktemp("ollama-models")
    qwen3 = build_byte_llama(
        root,
        "qwen3",
        QWEN3_TEMPLATE,
        added=("<tool_call>", "</tool_call>", *THINK),
        max_position_embeddings=4096,
    )
    r1 = build_byte_llama(root, "r1", R1_TEMPLATE, added=THINK)
    settings = load_settings(
        {
            "model": [f"{tiny_llama}=tiny-chat", f"{qwen3}=qwen3", f"{r1}=r1", f"{tiny_embedder}=tiny-embed"],
            "port": free_port(),
            "num_threads": 1,
            "kv_cache_memory": 16 * 2**20,
            "cache_dir": str(tmp_path_factory.mktemp("inferd-cache")),
        }
    )
    with live_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server)


def _openai_chat(server, model, **body) -> str:
    body = {"model": model, "messages": USER} | body
    response = httpx.post(server + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_chat_whole_and_streamed_equal_the_openai_route(server, client):
    options = {"temperature": 0, "num_predict": 12, "seed": 1}
    expected = _openai_chat(server, "tiny-chat", temperature=0, max_tokens=12, seed=1)
    whole = client.chat(model="tiny-chat", messages=USER, options=options)
    assert whole.message.content == expected and whole.done and whole.done_reason in ("stop", "length")
    assert (
        whole.eval_count > 0 and whole.prompt_eval_count > 0 and whole.total_duration >= whole.eval_duration
    )
    parts = list(client.chat(model="tiny-chat", messages=USER, options=options, stream=True))
    assert "".join(p.message.content for p in parts) == expected
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].eval_count == whole.eval_count and parts[-1].created_at.endswith("Z")


def test_generate_is_a_one_turn_chat(server, client):
    expected = _openai_chat(server, "tiny-chat", temperature=0, max_tokens=8)
    reply = client.generate(
        model="tiny-chat", prompt=USER[0]["content"], options={"temperature": 0, "num_predict": 8}
    )
    assert reply.response == expected and reply.done
    raw = client.generate(
        model="tiny-chat", prompt="hello", raw=True, options={"num_predict": 4, "temperature": 0}
    )
    completion = httpx.post(
        server + "/v1/completions",
        json={"model": "tiny-chat", "prompt": "hello", "max_tokens": 4, "temperature": 0},
        timeout=60,
    ).json()
    assert raw.response == completion["choices"][0]["text"]


def test_num_ctx_caps_prompt_and_output(client):
    reply = client.chat(model="tiny-chat", messages=USER, options={"num_ctx": 10_000, "num_predict": 3})
    assert reply.eval_count <= 3
    with pytest.raises(ollama.ResponseError) as error:  # the prompt alone fills 2 tokens
        client.chat(model="tiny-chat", messages=USER, options={"num_ctx": 2})
    assert error.value.status_code == 400 and "num_ctx" in str(error.value)


def test_embed_equals_openai_vectors(server, client):
    out = client.embed(model="tiny-embed", input=["hello world", "good night"])
    reference = httpx.post(
        server + "/v1/embeddings",
        json={"model": "tiny-embed", "input": ["hello world", "good night"]},
        timeout=30,
    ).json()
    for got, want in zip(out.embeddings, reference["data"]):
        assert got == pytest.approx(want["embedding"], abs=1e-5)
        assert sum(x * x for x in got) == pytest.approx(1.0, abs=1e-4)
    assert out.prompt_eval_count > 0
    legacy = client.embeddings(model="tiny-embed", prompt="hello world")
    assert len(legacy.embedding) == len(out.embeddings[0])


def test_tags_ps_show_version(server, client):
    names = {m.model for m in client.list().models}
    assert {"tiny-chat", "qwen3", "tiny-embed"} <= names
    listed = next(m for m in client.list().models if m.model == "tiny-chat")
    assert listed.size > 0 and listed.details.family == "llama" and listed.digest
    client.chat(model="tiny-chat", messages=USER, options={"num_predict": 1})
    running = {m.model: m for m in client.ps().models}
    assert "tiny-chat" in running and running["tiny-chat"].size > 0
    shown = client.show("qwen3")
    assert "thinking" in shown.capabilities and "tools" in shown.capabilities and shown.template
    assert client.show("tiny-embed").capabilities == ["embedding"]
    assert httpx.get(server + "/api/version").json()["version"]


@pytest.mark.parametrize("stream", [False, True])
def test_format_json_and_schema(client, stream):
    def text(fmt):
        options = {"num_predict": 80, "seed": 3}
        reply = client.chat(
            model="qwen3", messages=USER, format=fmt, think=False, options=options, stream=stream
        )
        return "".join(p.message.content for p in reply) if stream else reply.message.content

    assert isinstance(json.loads(text("json")), dict)
    jsonschema.validate(json.loads(text(SCHEMA)), SCHEMA)


def test_think_splits_the_thinking(server, client):
    # R1's prompt opens the block: the reply is reasoning until </think>, as the OpenAI route splits it.
    body = {"model": "r1", "messages": USER, "max_tokens": 32, "seed": 2, "temperature": 0}
    expected = httpx.post(server + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0][
        "message"
    ]
    options = {"num_predict": 32, "seed": 2, "temperature": 0}
    for stream in (False, True):
        reply = client.chat(model="r1", messages=USER, think=True, options=options, stream=stream)
        parts = list(reply) if stream else [reply]
        thinking = "".join(p.message.thinking or "" for p in parts)
        content = "".join(p.message.content for p in parts)
        assert thinking and thinking == expected["reasoning_content"] and "</think>" not in thinking
        assert content == expected["content"]
    off = client.chat(model="qwen3", messages=USER, think=False, options={"num_predict": 16, "seed": 1})
    assert not off.message.thinking and off.message.content
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(model="tiny-chat", messages=USER, think=True)
    assert error.value.status_code == 400


def test_tools_give_calls_with_object_arguments(client):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = client.chat(
        model="qwen3",
        messages=messages,
        tools=[WEATHER],
        think=False,
        format=None,
        options={"num_predict": 120, "seed": 1},
    )
    calls = reply.message.tool_calls or []
    # Unforced, a random model rarely calls: check the shape when it does, and the round trip.
    for call in calls:
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    follow = [
        *messages,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
    ]
    assert client.chat(model="qwen3", messages=follow, tools=[WEATHER], options={"num_predict": 4}).done


def _state(server: str, name: str) -> str:
    return {m["id"]: m["state"] for m in httpx.get(server + "/admin/models").json()["data"]}[name]


def test_keep_alive_zero_unloads(server, client):
    client.chat(model="tiny-chat", messages=USER, options={"num_predict": 1})
    reply = httpx.post(
        server + "/api/generate", json={"model": "tiny-chat", "keep_alive": 0}, timeout=60
    ).json()
    assert reply["done_reason"] == "unload"

    assert _state(server, "tiny-chat") in ("unloading", "unloaded")  # like Ollama, answered at once
    wait_for(lambda: _state(server, "tiny-chat") == "unloaded")
    assert "tiny-chat" not in {m.model for m in client.ps().models}
    loaded = httpx.post(server + "/api/chat", json={"model": "tiny-chat", "messages": []}, timeout=60).json()
    assert loaded["done_reason"] == "load" and "tiny-chat" in {m.model for m in client.ps().models}


def test_errors_in_ollama_shape(server, client):
    with pytest.raises(ollama.ResponseError) as error:
        client.chat(model="nope", messages=USER)
    assert error.value.status_code == 404
    for options in ({"temperature": "hot"}, {"top_p": 7}, {"num_predict": -5}):
        with pytest.raises(ollama.ResponseError) as error:
            client.chat(model="tiny-chat", messages=USER, options=options)
        assert error.value.status_code == 400
    response = httpx.post(server + "/api/chat", json={"model": "tiny-chat", "messages": "x"})
    assert response.status_code == 400 and set(response.json()) == {"error"}
    response = httpx.post(
        server + "/api/generate", json={"model": "tiny-chat", "prompt": "x", "template": "{{ .Prompt }}"}
    )
    assert response.status_code == 400 and "template" in response.json()["error"]
    with pytest.raises(ollama.ResponseError) as error:
        client.embed(model="tiny-chat", input="x")
    assert error.value.status_code == 400


@pytest.fixture
def hub(tiny_llama, monkeypatch, tmp_path):
    from huggingface_hub import constants

    fake = FakeHub()
    fake.add_repo("acme/tiny-llama", {p.name: p.read_bytes() for p in tiny_llama.iterdir() if p.is_file()})
    with FakeHubServer(fake) as running:
        monkeypatch.setattr(constants, "ENDPOINT", running.url)
        template = running.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield running


def test_pull_streams_progress_then_delete(server, client, hub):
    statuses = list(client.pull("acme/tiny-llama", stream=True))
    assert statuses[0].status == "pulling manifest" and statuses[-1].status == "success"
    downloads = [s for s in statuses if s.digest]
    assert downloads and all(s.total and s.completed <= s.total for s in downloads)
    assert any(s.completed == s.total for s in downloads)
    registry = json.loads((Path(server.app.state.settings.cache_dir) / "models.json").read_text())
    assert "acme/tiny-llama" in [m["name"] for m in registry["models"]]
    # Servable at once, without a restart: listed, loaded by its first request, then unloaded.
    assert "acme/tiny-llama" in [m.model for m in client.list().models]
    reply = client.chat(
        model="acme/tiny-llama", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3}
    )
    assert reply.done and reply.eval_count == 3
    with pytest.raises(ollama.ResponseError) as error:
        client.delete("acme/tiny-llama")  # loaded: refused
    assert error.value.status_code == 400
    client.chat(model="acme/tiny-llama", messages=[], keep_alive=0)
    wait_for(lambda: _state(server, "acme/tiny-llama") == "unloaded")  # it unloads in the background
    assert client.delete("acme/tiny-llama")["status"] == "success"
    assert "acme/tiny-llama" not in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as error:
        client.delete("acme/tiny-llama")
    assert error.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as error:
        client.pull("/etc")
    assert error.value.status_code == 400
