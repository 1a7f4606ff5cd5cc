"""The Ray-free parts of scaling out: merged metrics, prefix affinity, replica settings."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from inferd.config import load_settings
from inferd.scale.affinity import AffinityPolicy, Choosing, PrefixIndex, prefix_hashes
from inferd.scale.exposition import merge_expositions


def _replica_text(requests: int, waiting: int, ttft: list[float]) -> str:
    registry = CollectorRegistry()
    Counter("inferd_requests", "Requests.", ["model"], registry=registry).labels("m").inc(requests)
    Gauge("vllm:num_requests_waiting", "Waiting.", registry=registry).set(waiting)
    histogram = Histogram("inferd_ttft_seconds", "TTFT.", registry=registry, buckets=(0.1, 1.0))
    for value in ttft:
        histogram.observe(value)
    return generate_latest(registry).decode()


def test_merged_exposition_keeps_each_replicas_samples_under_its_label():
    merged = merge_expositions(
        {"r1": _replica_text(3, 2, [0.05]), "r2": _replica_text(5, 0, [0.5, 2.0])}
    ).decode()
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    requests = {
        s.labels["replica"]: s.value for s in families["inferd_requests"].samples if s.name.endswith("_total")
    }
    assert requests == {"r1": 3, "r2": 5}
    assert all(s.labels["model"] == "m" for s in families["inferd_requests"].samples)
    waiting = {s.labels["replica"]: s.value for s in families["vllm:num_requests_waiting"].samples}
    assert waiting == {"r1": 2, "r2": 0}
    buckets = {
        (s.labels["replica"], s.labels["le"]): s.value
        for s in families["inferd_ttft_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert buckets[("r1", "0.1")] == 1 and buckets[("r2", "0.1")] == 0 and buckets[("r2", "+Inf")] == 2
    # Prometheus rejects a family declared twice: one TYPE line each, however many replicas.
    types = [line for line in merged.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    assert "# TYPE inferd_requests_total counter" in types


def test_prefix_hashes_chain_the_chat_prompt_and_ignore_other_routes():
    def chat(system: str, user: str, model: str = "m") -> bytes:
        import orjson

        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        return orjson.dumps({"model": model, "messages": messages})

    system = "you are a helpful assistant. " * 20
    a = prefix_hashes("POST", "/v1/chat/completions", chat(system, "first question " * 10))
    b = prefix_hashes("POST", "/v1/chat/completions", chat(system, "second question " * 10))
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert shared >= len(system) // 64 - 1  # the system prompt's chunks are common
    assert prefix_hashes("POST", "/v1/chat/completions", chat(system, "q", model="other"))[0] != a[0]
    assert prefix_hashes("POST", "/v1/embeddings", chat(system, "q")) == ()
    assert prefix_hashes("POST", "/v1/chat/completions", b"{not json") == ()


def test_prefix_index_prefers_the_holder_until_the_load_is_imbalanced():
    index = PrefixIndex(AffinityPolicy(min_match=0.5, max_imbalance=4))
    hashes = (1, 2, 3, 4)
    index.record("a", hashes)
    assert index.rank(["a", "b"], hashes, {"a": 3, "b": 0})[0] == ["a"]  # affinity beats a small gap
    assert index.rank(["a", "b"], hashes, {"a": 6, "b": 0})[0] == ["b"]  # past max_imbalance: load wins
    assert index.rank(["a", "b"], (9, 2, 3, 4), {"a": 0, "b": 0})[0] == ["b"]  # no match: the emptier one
    index.forget("a")
    assert index.num_matching("a", hashes) == 0


def test_autoscaling_range_is_checked():
    settings = load_settings({"replicas": 2, "max_replicas": 4})
    assert settings.max_replicas == 4
    with pytest.raises(ValidationError, match="below replicas"):
        load_settings({"replicas": 3, "max_replicas": 2})


def test_replica_count_is_fixed_or_ray_serves_autoscaling_config():
    pytest.importorskip("ray", reason="needs the ray extra")
    from inferd.scale.ray_serve import _replica_count

    assert _replica_count(load_settings({"replicas": 2})) == {"num_replicas": 2}
    auto = _replica_count(load_settings({"replicas": 2, "max_replicas": 6, "max_num_seqs": 16}))
    assert auto["num_replicas"] == "auto"
    config = auto["autoscaling_config"]
    assert (config["min_replicas"], config["initial_replicas"], config["max_replicas"]) == (2, 2, 6)
    assert config["target_ongoing_requests"] == 16  # a full batch per replica
    custom = _replica_count(load_settings({"replicas": 1, "max_replicas": 3, "autoscale_target": 5}))
    assert custom["autoscaling_config"]["target_ongoing_requests"] == 5


def test_requests_being_routed_count_on_the_replica_they_are_headed_for():
    class Pending:  # Ray's PendingRequest, as far as Choosing looks at it
        def __init__(self) -> None:
            self.future = Future()

    now = [0.0]
    choosing = Choosing(ttl_s=30, clock=lambda: now[0])
    index = PrefixIndex(AffinityPolicy())
    one, two, three = Pending(), Pending(), Pending()
    # Two new prompts arrive together: the second sees the first headed for "a" and takes "b".
    first = index.rank(["a", "b"], (1, 2), choosing.loads())[0][0]
    choosing.chose(one, first)
    second = index.rank(["a", "b"], (7, 8), choosing.loads())[0][0]
    assert {first, second} == {"a", "b"}
    choosing.chose(one, second)  # refused by the first, routed again: only the last choice counts
    assert choosing.loads() == {second: 1}
    choosing.placed(one)
    assert choosing.loads() == {}
    choosing.chose(two, "a")
    two.future.cancel()  # the client left while it queued: it stops counting at once
    assert choosing.loads() == {}
    choosing.chose(three, "a")  # never heard of again: it stops counting after the ttl
    now[0] = 31.0
    assert choosing.loads() == {}
