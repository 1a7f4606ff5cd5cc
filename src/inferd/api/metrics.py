"""Prometheus metrics: one registry per app, fed by engine observers, HTTP middleware and scrapes.

The engines know nothing of Prometheus: they call plain observer methods (``GenerationObserver``,
``EncoderObserver``) and expose ``stats()`` snapshots; this module turns both into metrics.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from inferd.api.context import add_tokens
from inferd.api.model_table import LLM_CLIENTS, Client, ModelTable, PoolListener
from inferd.encoder.client import EncoderClient
from inferd.llm.client import LLMClient
from inferd.llm.outputs import RequestOutput

PREFIX = "inferd:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets, so that dashboards built for it read ours the same way.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
_SHORT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# A mask takes tens of microseconds a row on a 49k vocabulary, milliseconds at a large schema's worst.
_MASK_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class Metrics:
    """Every metric of one app, in its own registry (several apps in one process do not collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._snapshot = _SnapshotCollector()
        self.registry.register(self._snapshot)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ("model",)) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=self.registry)

        def histogram(name: str, doc: str, buckets, labels: tuple[str, ...] = ("model",)) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry)

        self.http_requests = counter(
            "http_requests", "HTTP requests by route template and status.", ("method", "route", "status")
        )
        self.http_duration = histogram(
            "http_request_duration_seconds", "HTTP request latency.", _HTTP_BUCKETS, ("method", "route")
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt (input) tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.request_success = counter(
            "request_success", "Finished LLM requests by reason.", ("model", "finished_reason")
        )
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between output tokens.", _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "LLM request latency.", _LATENCY_BUCKETS)
        self.queue_time = histogram(
            "request_queue_time_seconds", "Time LLM requests waited to be scheduled.", _LATENCY_BUCKETS
        )
        self.iteration_tokens = histogram("iteration_tokens", "Tokens per LLM engine step.", _TOKEN_BUCKETS)
        self.structured_mask = histogram(
            "structured_mask_seconds",
            "Time an LLM engine step spent filling grammar masks (structured output).",
            _MASK_BUCKETS,
        )
        self.model_loads = counter("model_loads", "Models loaded (at start or on demand).")
        self.model_unloads = counter(
            "model_unloads", "Models unloaded, by reason (unloaded, evicted, expired).", ("model", "reason")
        )
        self.model_evictions = counter(
            "model_evictions", "Models unloaded to make room in the memory budget for another."
        )
        self.model_load_seconds = histogram("model_load_seconds", "Time a model took to load.", _LOAD_BUCKETS)
        self.encoder_batch_size = histogram("encoder_batch_size", "Inputs per encoder batch.", _SIZE_BUCKETS)
        self.encoder_batch_tokens = histogram(
            "encoder_batch_tokens", "Tokens per encoder batch.", _TOKEN_BUCKETS
        )
        self.encoder_batch_duration = histogram(
            "encoder_batch_inference_duration_seconds", "Forward time of one encoder batch.", _SHORT_BUCKETS
        )
        self.encoder_tokenization = histogram(
            "encoder_tokenization_duration_seconds", "Tokenisation time per request.", _SHORT_BUCKETS
        )
        self.encoder_queue = histogram(
            "encoder_queue_duration_seconds", "Time a request's inputs waited for the model.", _SHORT_BUCKETS
        )
        self.encoder_inference = histogram(
            "encoder_inference_duration_seconds", "Model time per request.", _SHORT_BUCKETS
        )

    def attach(self, models: ModelTable) -> None:
        """Observe every engine of ``models``, now and as they load; an engine served under two
        names reports the first."""
        self._snapshot.models = models
        for name, client in _unique_clients(models):
            self._observe(name, client)
        for engine in models.pool.loaded():  # loaded at start, before there was a listener
            for name in engine.names:
                self.model_loads.labels(name).inc()
        models.pool.listener = _PoolObserver(self)

    def _observe(self, name: str, client: Client) -> None:
        if isinstance(client, LLM_CLIENTS):
            client.set_observer(_GenerationObserver(self, name))
        elif isinstance(client, EncoderClient):
            client.set_observer(_EncoderObserver(self, name))

    def detach(self) -> None:
        models = self._snapshot.models
        if models is not None:
            models.pool.listener = PoolListener()
        self._snapshot.models = None

    def observe_http(self, method: str, route: str, status: int, duration_s: float) -> None:
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_duration.labels(method, route).observe(duration_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _unique_clients(models: ModelTable) -> Iterator[tuple[str, LLMClient | EncoderClient]]:
    seen: set[int] = set()
    for model in models:
        if id(model.client) not in seen:
            seen.add(id(model.client))
            yield model.name, model.client


class _PoolObserver(PoolListener):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def on_loaded(self, names: list[str], client: Client, seconds: float, resident_bytes: int) -> None:
        self._metrics._observe(names[0], client)
        for name in names:
            self._metrics.model_loads.labels(name).inc()
            self._metrics.model_load_seconds.labels(name).observe(seconds)

    def on_unloaded(self, names: list[str], reason: str) -> None:
        for name in names:
            self._metrics.model_unloads.labels(name, reason).inc()
            if reason == "evicted":
                self._metrics.model_evictions.labels(name).inc()


class _GenerationObserver:
    def __init__(self, metrics: Metrics, model: str) -> None:
        m = metrics
        self._prompt = m.prompt_tokens.labels(model)
        self._generation = m.generation_tokens.labels(model)
        self._success = m.request_success
        self._ttft, self._itl, self._e2e = m.ttft.labels(model), m.itl.labels(model), m.e2e.labels(model)
        self._queue = m.queue_time.labels(model)
        self._iteration = m.iteration_tokens.labels(model)
        self._mask = m.structured_mask.labels(model)
        self._model = model

    def on_output(self, output: RequestOutput, elapsed_s: float, gap_s: float | None) -> None:
        num_new = len(output.new_token_ids)
        if gap_s is None:
            self._ttft.observe(elapsed_s)
            self._prompt.inc(output.num_prompt_tokens)
            add_tokens(num_prompt=output.num_prompt_tokens)
            if output.first_scheduled_time is not None and output.arrival_time is not None:
                self._queue.observe(max(0.0, output.first_scheduled_time - output.arrival_time))
        elif num_new:
            self._itl.observe(gap_s)
        self._generation.inc(num_new)
        add_tokens(num_completion=num_new)
        if output.finish_reason is not None:
            self._e2e.observe(elapsed_s)
            self._success.labels(self._model, output.finish_reason).inc()

    def on_abort(self, elapsed_s: float) -> None:
        self._e2e.observe(elapsed_s)
        self._success.labels(self._model, "abort").inc()

    def on_step(self, num_tokens: int) -> None:
        self._iteration.observe(num_tokens)

    def on_mask(self, seconds: float, num_rows: int) -> None:
        self._mask.observe(seconds)


class _EncoderObserver:
    def __init__(self, metrics: Metrics, model: str) -> None:
        m = metrics
        self._prompt = m.prompt_tokens.labels(model)
        self._batch_size = m.encoder_batch_size.labels(model)
        self._batch_tokens = m.encoder_batch_tokens.labels(model)
        self._batch_duration = m.encoder_batch_duration.labels(model)
        self._tokenization = m.encoder_tokenization.labels(model)
        self._queue = m.encoder_queue.labels(model)
        self._inference = m.encoder_inference.labels(model)

    def on_tokenize(self, duration_s: float) -> None:
        self._tokenization.observe(duration_s)

    def on_request(self, num_tokens: int, queue_s: float, inference_s: float) -> None:
        self._prompt.inc(num_tokens)
        add_tokens(num_prompt=num_tokens)
        self._queue.observe(queue_s)
        self._inference.observe(inference_s)

    def on_batch(self, num_items: int, num_tokens: int, duration_s: float) -> None:
        self._batch_size.observe(num_items)
        self._batch_tokens.observe(num_tokens)
        self._batch_duration.observe(duration_s)


class _SnapshotCollector(Collector):
    """Gauges and engine-side counters read from the engines at scrape time."""

    def __init__(self) -> None:
        self.models: ModelTable | None = None

    def describe(self) -> list[Metric]:
        return []  # unknown until the models load; describing nothing keeps registration lazy

    def collect(self) -> Iterator[Metric]:
        families = {
            "running": GaugeMetricFamily(
                PREFIX + "num_requests_running", "LLM requests in the running batch.", labels=["model"]
            ),
            "waiting": GaugeMetricFamily(
                PREFIX + "num_requests_waiting", "LLM requests waiting to run.", labels=["model"]
            ),
            "kv": GaugeMetricFamily(
                PREFIX + "kv_cache_usage_perc",
                "Share of KV-cache blocks in use (1 = full).",
                labels=["model"],
            ),
            "queries": CounterMetricFamily(
                PREFIX + "prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                labels=["model"],
            ),
            "hits": CounterMetricFamily(
                PREFIX + "prefix_cache_hits", "Prompt tokens found in the prefix cache.", labels=["model"]
            ),
            "encoder_queue": GaugeMetricFamily(
                PREFIX + "encoder_queue_size", "Encoder inputs waiting for a batch.", labels=["model"]
            ),
            "resident": GaugeMetricFamily(
                PREFIX + "model_resident_bytes",
                "Planned memory of each loaded model (weights, activations, runtime, KV cache); 0 when "
                "unloaded.",
                labels=["model"],
            ),
        }
        models = self.models
        # Per engine, under its first name (as every engine metric): summing the series is the total.
        for engine in models.pool.engines() if models is not None else ():
            families["resident"].add_metric([engine.names[0]], engine.resident_bytes)
        for name, client in _unique_clients(models) if models is not None else ():
            if isinstance(client, LLM_CLIENTS):
                stats = client.stats()
                families["running"].add_metric([name], stats.num_running)
                families["waiting"].add_metric([name], stats.num_waiting)
                families["kv"].add_metric([name], stats.kv_cache_usage)
                families["queries"].add_metric([name], stats.num_prefix_queries)
                families["hits"].add_metric([name], stats.num_prefix_hits)
            elif isinstance(client, EncoderClient):
                families["encoder_queue"].add_metric([name], client.num_queued)
        yield from families.values()
