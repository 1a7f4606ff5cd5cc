"""inferd on Ray Serve: 2 replicas x 1 CPU on a local Ray cluster, the same API through the ingress."""

from __future__ import annotations

import time

import httpx
import pytest

from inferd.config import load_settings
from tests.conftest import free_port

ray = pytest.importorskip("ray", reason="needs the ray extra: pip install 'inferd[ray]'")

KEY = "sk-ray"
AUTH = {"Authorization": f"Bearer {KEY}"}
REPLICA = "x-inferd-replica"


@pytest.fixture(scope="module")
def ray_server(tiny_llama, tiny_embedder):
    from ray import serve

    from inferd.scale.ray_serve import start

    settings = load_settings(
        {
            "model": [f"{tiny_llama}=tiny-chat", f"{tiny_embedder}=tiny-embed"],
            "port": free_port(),
            "replicas": 2,
            "cpus_per_replica": 1,
            "api_key": [KEY],
            "kv_cache_memory": 4 * 2**20,
            "log_level": "warning",
        }
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        start(settings, min_match=0.5, max_imbalance=8)
        url = f"http://127.0.0.1:{settings.port}"
        _wait_ready(url)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the Ray ingress never became ready")


def test_openai_client_streams_chat_and_embeds_through_the_ingress(ray_server):
    import openai

    client = openai.OpenAI(base_url=ray_server + "/v1", api_key=KEY)
    stream = client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "the cat and the dog"}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert sum(len(c.choices[0].delta.content or "") for c in chunks if c.choices) > 0
    embedded = client.embeddings.create(model="tiny-embed", input=["the cat", "a dog"])
    assert len(embedded.data) == 2 and len(embedded.data[0].embedding) > 0
    # The same request on a single server gives the same numbers: replicas hold the same weights.
    again = client.embeddings.create(model="tiny-embed", input=["the cat", "a dog"])
    assert again.data[0].embedding == pytest.approx(embedded.data[0].embedding, abs=1e-5)


def test_keys_are_checked_by_the_replicas_own_gateway(ray_server):
    import openai

    response = httpx.post(ray_server + "/v1/embeddings", json={"model": "tiny-embed", "input": "x"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response.headers[REPLICA]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=ray_server + "/v1", api_key="sk-wrong").models.list()


def test_errors_and_request_ids_pass_through_once(ray_server):
    bad = httpx.post(ray_server + "/v1/chat/completions", content=b"{not json", headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    mine = httpx.get(ray_server + "/v1/models", headers={**AUTH, "x-request-id": "req-42"})
    assert mine.headers.get_list("x-request-id") == ["req-42"]


def test_groups_sharing_a_system_prompt_stick_to_one_replica(ray_server):
    groups = [f"you are helper number {g} . " + " ".join(["the cat and the dog"] * 30) for g in range(4)]
    seen: dict[int, list[str]] = {g: [] for g in range(4)}
    with httpx.Client(timeout=60, headers=AUTH) as client:
        for turn in range(4):
            for g, system in enumerate(groups):  # interleaved: every group between two of one group
                body = {
                    "model": "tiny-chat",
                    "messages": [
                        {"role": "system", "content": system},
                        {"role": "user", "content": f"question {turn} about a dog"},
                    ],
                    "max_tokens": 2,
                }
                response = client.post(ray_server + "/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
                seen[g].append(response.headers[REPLICA])
                if turn > 0:
                    cached = response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
                    assert cached > 0, f"group {g} turn {turn} missed its replica's prefix cache"
    for g, replicas in seen.items():
        assert len(set(replicas)) == 1, f"group {g} went to {replicas}"
    # New prefixes spread: with both replicas idle, the one holding less takes the next group.
    assert len({replicas[0] for replicas in seen.values()}) == 2
