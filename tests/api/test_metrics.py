"""/metrics parsed with prometheus_client's parser: counters move by exactly the requests made."""

import httpx
from prometheus_client.parser import text_string_to_metric_families

from inferd.api.app import create_app
from inferd.config import load_settings

OPS = {"Authorization": "Bearer sk-ops"}
MESSAGES = [{"role": "user", "content": "paris is the capital of"}]


def _scrape(url: str) -> dict[tuple[str, frozenset], float]:
    response = httpx.get(url + "/metrics", headers=OPS)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _delta(before, after, name: str, **labels) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)


def test_counters_move_by_exactly_the_requests_made(secured_server):
    before = _scrape(secured_server)
    with httpx.Client(base_url=secured_server, headers=OPS, timeout=30) as client:
        embed_tokens = sum(
            client.post("/v1/embeddings", json={"model": "tiny-embed", "input": text}).json()["usage"][
                "prompt_tokens"
            ]
            for text in ("the cat", "the dog and the cat", "paris")
        )
        chat = client.post(
            "/v1/chat/completions", json={"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 5}
        ).json()["usage"]
        with client.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": "tiny-chat",
                "messages": MESSAGES,
                "max_tokens": 6,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ) as stream:
            lines = [line for line in stream.iter_lines() if line]
        assert client.get("/v1/no-such-route").status_code == 404
    streamed = httpx.Response(200, content=lines[-2].removeprefix("data: ")).json()["usage"]
    after = _scrape(secured_server)

    http = "inferd:http_requests_total"
    assert _delta(before, after, http, method="POST", route="/v1/embeddings", status="200") == 3
    assert _delta(before, after, http, method="POST", route="/v1/chat/completions", status="200") == 2
    assert _delta(before, after, http, method="GET", route="unmatched", status="404") == 1
    assert (
        _delta(
            before, after, "inferd:http_request_duration_seconds_count", method="POST", route="/v1/embeddings"
        )
        == 3
    )

    assert _delta(before, after, "inferd:prompt_tokens_total", model="tiny-embed") == embed_tokens
    assert _delta(before, after, "inferd:prompt_tokens_total", model="tiny-chat") == (
        chat["prompt_tokens"] + streamed["prompt_tokens"]
    )
    assert _delta(before, after, "inferd:generation_tokens_total", model="tiny-chat") == (
        chat["completion_tokens"] + streamed["completion_tokens"]
    )
    finished = sum(
        _delta(before, after, "inferd:request_success_total", model="tiny-chat", finished_reason=reason)
        for reason in ("stop", "length")
    )
    assert finished == 2
    for histogram in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
    ):
        assert _delta(before, after, f"inferd:{histogram}_count", model="tiny-chat") == 2, histogram
    generated = chat["completion_tokens"] + streamed["completion_tokens"]
    assert (
        _delta(before, after, "inferd:inter_token_latency_seconds_count", model="tiny-chat") == generated - 2
    )
    assert _delta(before, after, "inferd:iteration_tokens_count", model="tiny-chat") >= generated
    assert (
        _delta(before, after, "inferd:encoder_tokenization_duration_seconds_count", model="tiny-embed") == 3
    )
    assert _delta(before, after, "inferd:encoder_queue_duration_seconds_count", model="tiny-embed") == 3
    assert _delta(before, after, "inferd:encoder_batch_tokens_sum", model="tiny-embed") == embed_tokens
    assert _delta(before, after, "inferd:encoder_batch_size_sum", model="tiny-embed") == 3


def test_engine_gauges_are_exported_per_model(secured_server):
    samples = _scrape(secured_server)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert _value(samples, f"inferd:{name}", model="tiny-chat") == 0, name
    assert ("inferd:prefix_cache_queries_total", frozenset({("model", "tiny-chat")})) in samples
    assert ("inferd:prefix_cache_hits_total", frozenset({("model", "tiny-chat")})) in samples
    assert _value(samples, "inferd:encoder_queue_size", model="tiny-rerank") == 0


def test_metrics_need_a_key_unless_public(secured_server, tiny_embedder):
    assert httpx.get(secured_server + "/metrics").status_code == 401
    settings = load_settings({"model": [str(tiny_embedder)], "api_key": ["k"], "public_metrics": True})
    # Two apps in one process: each has its own registry, so nothing is registered twice.
    first, second = create_app(settings), create_app(settings)
    assert first.state.metrics.registry is not second.state.metrics.registry
