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
def ray_server(long_llama, tiny_embedder):
    from ray import serve

    from inferd.scale.ray_serve import start

    settings = load_settings(
        {
            "model": [f"{long_llama}=tiny-chat", f"{tiny_embedder}=tiny-embed"],
            "port": free_port(),
            "replicas": 2,
            "cpus_per_replica": 1,
            "api_key": [KEY],
            "kv_cache_memory": 4 * 2**20,
            "max_model_len": 1024,
            "max_num_seqs": 4,  # the rest of a load waits in the replica's queue, not yet started
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


def _metric_samples(text: str, suffix: str) -> dict[str, float]:
    """The value of the family ending in ``suffix``, per replica label."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name.endswith(suffix):
            for sample in family.samples:
                replica = sample.labels["replica"]
                found[replica] = found.get(replica, 0.0) + sample.value
    return found


def _replicas_waiting(url: str) -> dict[str, float]:
    response = httpx.get(url + "/metrics", headers=AUTH, timeout=30)
    return _metric_samples(response.text, "num_requests_waiting")


def _replicas_in_metrics(url: str) -> dict[str, float]:
    response = httpx.get(url + "/metrics", headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    return _metric_samples(response.text, "num_requests_running")


def test_metrics_hold_every_replica_labelled(ray_server):
    answered = set()
    with httpx.Client(timeout=60, headers=AUTH) as client:
        for i in range(6):  # distinct prompts, both replicas idle: they spread
            body = {
                "model": "tiny-chat",
                "messages": [{"role": "user", "content": f"{i} " * 40}],
                "max_tokens": 1,
            }
            answered.add(client.post(ray_server + "/v1/chat/completions", json=body).headers[REPLICA])
    assert len(answered) == 2
    response = httpx.get(ray_server + "/metrics", headers=AUTH, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    # Each replica's own counts, under its name: the answers each replica gave sum to six.
    requests = _metric_samples(response.text, "request_success")
    assert set(requests) == answered
    assert sum(requests.values()) >= 6 and all(v >= 1 for v in requests.values())
    # One HELP and TYPE per family, however many replicas report it.
    types = [line for line in response.text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)) > 10


def _kill_replica(name: str) -> None:
    """SIGKILL the process of the engine replica ``name`` (what the OOM killer would do)."""
    import os
    import signal

    (actor_name,) = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::") and a["name"].endswith(name)
    ]
    actor = ray.get_actor(actor_name, namespace="serve")
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGKILL)


def test_a_replica_killed_under_load_loses_no_request_that_had_not_started(ray_server):
    """Runs last in this module: it kills a replica (and waits for Ray to replace it)."""
    import asyncio
    import json

    async def stream(client: httpx.AsyncClient, i: int, record: dict) -> None:
        body = {
            "model": "tiny-chat",
            "messages": [{"role": "user", "content": f"request {i} " * 8}],
            "max_tokens": 400,
            "ignore_eos": True,
            "stream": True,
        }
        async with client.stream("POST", ray_server + "/v1/chat/completions", json=body) as response:
            record.update(status=response.status_code, replica=response.headers.get(REPLICA), events=[])
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    record["events"].append(line[6:])

    async def load() -> tuple[list[dict], str, float]:
        records = [{} for _ in range(32)]
        async with httpx.AsyncClient(timeout=180, headers=AUTH) as client:
            tasks = [asyncio.create_task(stream(client, i, records[i])) for i in range(32)]
            victim, queued = None, 0.0
            for _ in range(600):  # until a stream is under way and requests wait behind it
                await asyncio.sleep(0.05)
                busy = [i for i, r in enumerate(records) if len(r.get("events", [])) > 3 and not _done(r)]
                waiting = [r for r in records if "status" not in r]
                if busy and len(waiting) >= 8:
                    victim = records[busy[0]]["replica"]
                    # Requests the victim has queued (not started) at the kill: the ones to retry.
                    queued = (await asyncio.to_thread(_replicas_waiting, ray_server)).get(victim, 0.0)
                    await asyncio.to_thread(_kill_replica, victim)
                    break
            assert victim is not None, "the load never queued behind running streams"
            await asyncio.gather(*tasks)
        return records, victim, queued

    def _done(record: dict) -> bool:
        return bool(record.get("events")) and record["events"][-1] == "[DONE]"

    records, victim, queued = asyncio.run(load())
    assert queued > 0, "the victim had no queued request to retry"
    cut = 0
    for i, record in enumerate(records):
        # Nothing is lost: every request was answered; one queued on the victim was retried.
        assert record["status"] == 200, f"request {i}: {record}"
        assert _done(record), f"request {i} did not end with [DONE]"
        payloads = [json.loads(e) for e in record["events"][:-1]]
        if "error" in payloads[-1]:
            # Only a stream the dead replica had started may end this way, and then cleanly.
            assert record["replica"] == victim, f"request {i} had not started, yet it failed"
            assert payloads[-1]["error"]["code"] == "service_unavailable"
            cut += 1
        else:
            assert payloads[-1]["choices"][0]["finish_reason"] == "length", f"request {i}"
    assert cut >= 1  # the victim was killed mid-stream
    assert cut <= 4  # at most its running batch (max_num_seqs): the queued ones were retried
    # Ray replaces the replica: two replicas report metrics again, the victim not among them.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        names = set(_replicas_in_metrics(ray_server))
        if len(names) == 2 and victim not in names:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"the killed replica was not replaced: {names}")
