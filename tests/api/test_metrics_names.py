"""--metrics-names: the LLM engine metrics under vLLM's names and labels, or under both names.

Live servers of the tiny chat model (and the tiny embedder, whose metrics keep inferd's names),
scraped with prometheus_client's own parser.
"""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from inferd.api.metrics import Metrics
from inferd.config import load_settings
from tests.conftest import free_port, live_server

MESSAGES = [{"role": "user", "content": "paris is the capital of"}]
VLLM_LABELS = {"model_name": "tiny-chat", "engine": "0"}

# inferd's LLM engine series → vLLM's, written out here rather than read from metrics.py, so that a
# wrong entry in its table fails these tests.
RENAMED = {
    "inferd:num_requests_running": "vllm:num_requests_running",
    "inferd:num_requests_waiting": "vllm:num_requests_waiting",
    "inferd:kv_cache_usage_perc": "vllm:kv_cache_usage_perc",
    "inferd:prefix_cache_queries_total": "vllm:prefix_cache_queries_total",
    "inferd:prefix_cache_hits_total": "vllm:prefix_cache_hits_total",
    "inferd:prompt_tokens_total": "vllm:prompt_tokens_total",
    "inferd:generation_tokens_total": "vllm:generation_tokens_total",
    "inferd:request_success_total": "vllm:request_success_total",
    "inferd:iteration_tokens": "vllm:iteration_tokens_total",
    "inferd:cache_config_info": "vllm:cache_config_info",
    "inferd:spec_decode_num_draft_tokens_total": "vllm:spec_decode_num_draft_tokens_total",
    "inferd:spec_decode_num_accepted_tokens_total": "vllm:spec_decode_num_accepted_tokens_total",
    **{
        f"inferd:{name}": f"vllm:{name}"
        for name in (
            "time_to_first_token_seconds",
            "inter_token_latency_seconds",
            "e2e_request_latency_seconds",
            "request_queue_time_seconds",
        )
    },
}
SUFFIXES = ("_bucket", "_count", "_sum", "_created")


def _vllm_name(series: str) -> str | None:
    """vLLM's name of an inferd LLM series (histogram parts included); None for any other series."""
    for base, renamed in RENAMED.items():
        for suffix in ("", *SUFFIXES):
            if series == base + suffix:
                return renamed + suffix
    return None


def _scrape(url: str) -> dict[tuple[str, frozenset], float]:
    response = httpx.get(url + "/metrics")
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _value(samples, name: str, **labels) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no series {name}{labels}"
    return samples[key]


def _chat(url: str, **body) -> dict:
    response = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 6} | body,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()["usage"] if not body.get("stream") else {}


def _server(tiny_llama, tiny_embedder, names: str):
    models = [f"{tiny_llama}=tiny-chat", f"{tiny_embedder}=tiny-embed"]
    settings = {"model": models, "port": free_port(), "num_threads": 1, "kv_cache_memory": 4 * 2**20}
    return live_server(load_settings(settings | {"metrics_names": names}))


@pytest.fixture(scope="module")
def vllm_server(tiny_llama, tiny_embedder):
    with _server(tiny_llama, tiny_embedder, "vllm") as url:
        yield url


@pytest.fixture(scope="module")
def both_server(tiny_llama, tiny_embedder):
    with _server(tiny_llama, tiny_embedder, "both") as url:
        yield url


def test_vllm_names_move_with_a_chat_request(vllm_server):
    before = _scrape(vllm_server)
    usage = _chat(vllm_server)
    after = _scrape(vllm_server)

    def delta(name: str, **labels) -> float:
        labels = VLLM_LABELS | labels
        return _value(after, name, **labels) - before.get((name, frozenset(labels.items())), 0.0)

    assert usage["prompt_tokens"] > 0
    assert delta("vllm:prompt_tokens_total") == usage["prompt_tokens"]
    assert delta("vllm:generation_tokens_total") == usage["completion_tokens"]
    finished = sum(
        after.get(
            ("vllm:request_success_total", frozenset((VLLM_LABELS | {"finished_reason": r}).items())), 0
        )
        - before.get(
            ("vllm:request_success_total", frozenset((VLLM_LABELS | {"finished_reason": r}).items())), 0
        )
        for r in ("stop", "length")
    )
    assert finished == 1
    for histogram in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
    ):
        assert delta(f"vllm:{histogram}_count") == 1, histogram
    assert delta("vllm:inter_token_latency_seconds_count") == usage["completion_tokens"] - 1
    assert delta("vllm:iteration_tokens_total_count") >= usage["completion_tokens"]
    assert delta("vllm:prefix_cache_queries_total") >= usage["prompt_tokens"]

    # The endpoint picker's three gauges, idle again after the request.
    assert _value(after, "vllm:num_requests_waiting", **VLLM_LABELS) == 0
    assert _value(after, "vllm:num_requests_running", **VLLM_LABELS) == 0
    usage_perc = _value(after, "vllm:kv_cache_usage_perc", **VLLM_LABELS)
    assert 0 <= usage_perc <= 1
    assert _value(after, "vllm:gpu_cache_usage_perc", **VLLM_LABELS) == usage_perc

    # No LLM series under inferd's names, and none under the inferd label name.
    assert not [name for name, labels in after if _vllm_name(name) and ("model", "tiny-chat") in labels]
    assert not [
        name for name, labels in after if name.startswith("vllm:") and ("model", "tiny-chat") in labels
    ]


def test_encoder_http_and_pool_metrics_keep_inferd_names(vllm_server):
    before = _scrape(vllm_server)
    response = httpx.post(vllm_server + "/v1/embeddings", json={"model": "tiny-embed", "input": "the cat"})
    assert response.status_code == 200
    tokens = response.json()["usage"]["prompt_tokens"]
    after = _scrape(vllm_server)

    embed = "inferd:prompt_tokens_total", frozenset({("model", "tiny-embed")})
    assert after[embed] - before.get(embed, 0) == tokens
    route = frozenset({("method", "POST"), ("route", "/v1/embeddings"), ("status", "200")})
    assert (
        after["inferd:http_requests_total", route] - before.get(("inferd:http_requests_total", route), 0) == 1
    )
    assert _value(after, "inferd:model_loads_total", model="tiny-chat") == 1
    assert _value(after, "inferd:encoder_queue_size", model="tiny-embed") == 0
    assert not [key for key in after if key[0].startswith("vllm:") and ("model_name", "tiny-embed") in key[1]]


def test_both_names_carry_equal_values(both_server):
    _chat(both_server)
    _chat(both_server, stream=True, max_tokens=4)
    samples = _scrape(both_server)

    compared = 0
    for (name, labels), value in samples.items():
        renamed = _vllm_name(name)
        if renamed is None or name.endswith("_created") or ("model", "tiny-chat") not in labels:
            continue
        vllm_labels = {k: v for k, v in labels if k != "model"} | VLLM_LABELS
        assert _value(samples, renamed, **vllm_labels) == value, name
        compared += 1
    assert compared > 30  # every bucket of every histogram, the counters and the gauges
    assert _value(samples, "vllm:generation_tokens_total", **VLLM_LABELS) > 0
    # The series sets match too: nothing under vLLM's names that inferd's lack.
    vllm_series = sum(
        1 for name, labels in samples if name.startswith("vllm:") and not name.endswith("_created")
    )
    assert vllm_series == compared + 1  # + vllm:gpu_cache_usage_perc, the older name's alias


def test_default_exports_no_vllm_names():
    body = Metrics().render().decode()
    assert "vllm:" not in body
    assert "inferd:num_requests_waiting" in body
    both = {family.name for family in text_string_to_metric_families(Metrics("both").render().decode())}
    inferd = {family.name for family in text_string_to_metric_families(body)}
    assert inferd < both


def test_an_unknown_naming_is_refused():
    with pytest.raises(ValidationError, match="metrics_names"):
        load_settings({"metrics_names": "prometheus"})


def test_cache_config_info_gives_the_block_size_an_endpoint_picker_hashes_by(vllm_server):
    (client,) = [m.client for m in vllm_server.app.state.models if m.name == "tiny-chat"]
    kv = client.engine.kv_cache
    samples = _scrape(vllm_server)
    infos = [(labels, value) for (name, labels), value in samples.items() if name == "vllm:cache_config_info"]
    assert len(infos) == 1
    labels, value = dict(infos[0][0]), infos[0][1]
    assert value == 1
    assert labels["model_name"] == "tiny-chat"
    assert int(labels["block_size"]) == kv.block_size > 0
    assert int(labels["num_gpu_blocks"]) == kv.pool.num_blocks > 0
    assert labels["cache_dtype"] == client.engine.config.dtype
    assert labels["enable_prefix_caching"] == "True"
