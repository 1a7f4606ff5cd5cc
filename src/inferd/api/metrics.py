"""Prometheus metrics: one registry per app, fed by engine observers, HTTP middleware and scrapes.

The engines know nothing of Prometheus: they call plain observer methods (``GenerationObserver``,
``EncoderObserver``) and expose ``stats()`` snapshots; this module turns both into metrics.

The LLM engine's metrics can be exported under inferd's names, vLLM's, or both (``--metrics-names``):
one name table (``VLLM_NAMES``) maps them, so tools that read vLLM's names (the Gateway API Inference
Extension's endpoint picker, vLLM's Grafana dashboards) read inferd unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from inferd.api.context import add_tokens
from inferd.api.model_table import LLM_CLIENTS, Client, ModelTable, PoolListener
from inferd.encoder.client import EncoderClient
from inferd.llm.client import LLMClient
from inferd.llm.outputs import RequestOutput

PREFIX = "inferd:"
# vLLM's label names for its cache layout (num_gpu_blocks whatever the device).
CACHE_INFO_LABELS = ("block_size", "num_gpu_blocks", "cache_dtype", "enable_prefix_caching")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

MetricsNames = Literal["inferd", "vllm", "both"]

# The LLM engine metrics vLLM exports too: inferd's name (after the prefix) → vLLM's names (after
# ``vllm:``). The first is vLLM's current name; any further one is an older name still read by
# older endpoint pickers and dashboards. inferd-only LLM metrics (structured_mask_seconds) keep
# inferd's name in every mode, as do the encoder, model-pool and HTTP metrics.
VLLM_NAMES: dict[str, tuple[str, ...]] = {
    "num_requests_running": ("num_requests_running",),
    "num_requests_waiting": ("num_requests_waiting",),
    "kv_cache_usage_perc": ("kv_cache_usage_perc", "gpu_cache_usage_perc"),
    "prefix_cache_queries": ("prefix_cache_queries",),
    "prefix_cache_hits": ("prefix_cache_hits",),
    "prompt_tokens": ("prompt_tokens",),
    "generation_tokens": ("generation_tokens",),
    "request_success": ("request_success",),
    "time_to_first_token_seconds": ("time_to_first_token_seconds",),
    "inter_token_latency_seconds": ("inter_token_latency_seconds",),
    "e2e_request_latency_seconds": ("e2e_request_latency_seconds",),
    "request_queue_time_seconds": ("request_queue_time_seconds",),
    "iteration_tokens": ("iteration_tokens_total",),  # a histogram, whose name ends in _total in vLLM
    "cache_config_info": ("cache_config_info",),
    "spec_decode_num_draft_tokens": ("spec_decode_num_draft_tokens",),
    "spec_decode_num_accepted_tokens": ("spec_decode_num_accepted_tokens",),
}


@dataclass(frozen=True, eq=False)  # compared by identity: there are two
class _Naming:
    """How one naming scheme spells a metric and its model label."""

    prefix: str
    model_label: str
    # Labels with one value on every series: vLLM's ``engine`` (inferd runs one engine per model).
    fixed: tuple[tuple[str, str], ...] = ()
    renames: dict[str, tuple[str, ...]] | None = None  # None: inferd's own names

    def names(self, name: str) -> tuple[str, ...]:
        suffixes = self.renames[name] if self.renames is not None else (name,)
        return tuple(self.prefix + suffix for suffix in suffixes)

    def label_names(self, rest: Sequence[str]) -> list[str]:
        return [self.model_label, *(key for key, _ in self.fixed), *rest]

    def label_values(self, model: str, rest: Sequence[str]) -> list[str]:
        return [model, *(value for _, value in self.fixed), *rest]


_INFERD = _Naming(PREFIX, "model")
_VLLM = _Naming("vllm:", "model_name", (("engine", "0"),), VLLM_NAMES)
_MODES: dict[str, tuple[_Naming, ...]] = {"inferd": (_INFERD,), "vllm": (_VLLM,), "both": (_INFERD, _VLLM)}


def _llm_namings(mode: MetricsNames, name: str) -> tuple[_Naming, ...]:
    """The namings an LLM metric is exported under: inferd's where vLLM has no such metric."""
    chosen = [n if n.renames is None or name in n.renames else _INFERD for n in _MODES[mode]]
    return tuple(dict.fromkeys(chosen))


class _Fan:
    """Several labelled children fed as one (a metric exported under two names)."""

    __slots__ = ("_children",)

    def __init__(self, children: list) -> None:
        self._children = children

    def inc(self, amount: float = 1) -> None:
        for child in self._children:
            child.inc(amount)

    def observe(self, value: float) -> None:
        for child in self._children:
            child.observe(value)


class _Family:
    """One LLM metric under each of its names; ``labels(model, *rest)`` as prometheus_client's."""

    def __init__(self, members: list[tuple[_Naming, Counter | Histogram]]) -> None:
        self._members = members

    def labels(self, model: str, *rest: str):
        children = [metric.labels(*naming.label_values(model, rest)) for naming, metric in self._members]
        return children[0] if len(children) == 1 else _Fan(children)


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

    def __init__(self, names: MetricsNames = "inferd") -> None:
        self.registry = CollectorRegistry()
        self._snapshot = _SnapshotCollector(names)
        self.registry.register(self._snapshot)
        made: dict[str, Counter | Histogram] = {}

        def make(kind: type[Counter] | type[Histogram], name: str, doc: str, labels: Sequence[str], **kw):
            # One object per exported name: the encoders' prompt tokens share the LLM's inferd counter.
            if name not in made:
                made[name] = kind(name, doc, labels, registry=self.registry, **kw)
            return made[name]

        def counter(name: str, doc: str, labels: tuple[str, ...] = ("model",)) -> Counter:
            return make(Counter, PREFIX + name, doc, labels)

        def histogram(name: str, doc: str, buckets, labels: tuple[str, ...] = ("model",)) -> Histogram:
            return make(Histogram, PREFIX + name, doc, labels, buckets=buckets)

        def llm(kind: type[Counter] | type[Histogram], name: str, doc: str, rest=(), **kw) -> _Family:
            """An LLM engine metric under every name ``names`` asks for."""
            return _Family(
                [
                    (naming, make(kind, full, doc, naming.label_names(rest), **kw))
                    for naming in _llm_namings(names, name)
                    for full in naming.names(name)
                ]
            )

        self.http_requests = counter(
            "http_requests", "HTTP requests by route template and status.", ("method", "route", "status")
        )
        self.http_duration = histogram(
            "http_request_duration_seconds", "HTTP request latency.", _HTTP_BUCKETS, ("method", "route")
        )
        self.encoder_prompt_tokens = counter("prompt_tokens", "Prompt (input) tokens processed.")
        self.prompt_tokens = llm(Counter, "prompt_tokens", "Prompt (input) tokens processed.")
        self.generation_tokens = llm(Counter, "generation_tokens", "Tokens generated.")
        self.request_success = llm(
            Counter, "request_success", "Finished LLM requests by reason.", ("finished_reason",)
        )
        self.ttft = llm(
            Histogram, "time_to_first_token_seconds", "Time to first token.", buckets=_TTFT_BUCKETS
        )
        self.itl = llm(
            Histogram, "inter_token_latency_seconds", "Time between output tokens.", buckets=_ITL_BUCKETS
        )
        self.e2e = llm(
            Histogram, "e2e_request_latency_seconds", "LLM request latency.", buckets=_LATENCY_BUCKETS
        )
        self.queue_time = llm(
            Histogram,
            "request_queue_time_seconds",
            "Time LLM requests waited to be scheduled.",
            buckets=_LATENCY_BUCKETS,
        )
        self.iteration_tokens = llm(
            Histogram, "iteration_tokens", "Tokens per LLM engine step.", buckets=_TOKEN_BUCKETS
        )
        self.structured_mask = llm(
            Histogram,
            "structured_mask_seconds",
            "Time an LLM engine step spent filling grammar masks (structured output).",
            buckets=_MASK_BUCKETS,
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
        self._prompt = m.encoder_prompt_tokens.labels(model)
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

    def __init__(self, names: MetricsNames = "inferd") -> None:
        self.models: ModelTable | None = None
        self._names = names

    def describe(self) -> list[Metric]:
        return []  # unknown until the models load; describing nothing keeps registration lazy

    def _llm(
        self,
        kind: type[GaugeMetricFamily] | type[CounterMetricFamily],
        name: str,
        doc: str,
        labels: Sequence[str] = (),
    ) -> _SnapshotFamily:
        return _SnapshotFamily(
            [
                (naming, kind(full, doc, labels=naming.label_names(labels)))
                for naming in _llm_namings(self._names, name)
                for full in naming.names(name)
            ]
        )

    def collect(self) -> Iterator[Metric]:
        running = self._llm(GaugeMetricFamily, "num_requests_running", "LLM requests in the running batch.")
        waiting = self._llm(GaugeMetricFamily, "num_requests_waiting", "LLM requests waiting to run.")
        kv = self._llm(
            GaugeMetricFamily, "kv_cache_usage_perc", "Share of KV-cache blocks in use (1 = full)."
        )
        queries = self._llm(
            CounterMetricFamily, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        hits = self._llm(CounterMetricFamily, "prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        drafts = self._llm(
            CounterMetricFamily,
            "spec_decode_num_draft_tokens",
            "Draft tokens speculative decoding proposed and verified.",
        )
        accepted = self._llm(
            CounterMetricFamily,
            "spec_decode_num_accepted_tokens",
            "Draft tokens the model chose too (kept without a step of their own).",
        )
        cache_info = self._llm(
            GaugeMetricFamily,
            "cache_config_info",
            "The KV cache's layout, in labels (always 1).",
            labels=CACHE_INFO_LABELS,
        )
        encoder_queue = GaugeMetricFamily(
            PREFIX + "encoder_queue_size", "Encoder inputs waiting for a batch.", labels=["model"]
        )
        resident = GaugeMetricFamily(
            PREFIX + "model_resident_bytes",
            "Planned memory of each loaded model (weights, activations, runtime, KV cache); 0 when unloaded.",
            labels=["model"],
        )
        models = self.models
        # Per engine, under its first name (as every engine metric): summing the series is the total.
        for engine in models.pool.engines() if models is not None else ():
            resident.add_metric([engine.names[0]], engine.resident_bytes)
        for name, client in _unique_clients(models) if models is not None else ():
            if isinstance(client, LLM_CLIENTS):
                stats = client.stats()
                running.add(name, stats.num_running)
                waiting.add(name, stats.num_waiting)
                kv.add(name, stats.kv_cache_usage)
                queries.add(name, stats.num_prefix_queries)
                hits.add(name, stats.num_prefix_hits)
                drafts.add(name, stats.num_draft_tokens)
                accepted.add(name, stats.num_accepted_tokens)
                layout = (stats.block_size, stats.num_blocks, stats.cache_dtype, stats.enable_prefix_caching)
                cache_info.add(name, 1, [str(v) for v in layout])
            elif isinstance(client, EncoderClient):
                encoder_queue.add_metric([name], client.num_queued)
        for family in (running, waiting, kv, queries, hits, drafts, accepted, cache_info):
            yield from family.metrics()
        yield encoder_queue
        yield resident


class _SnapshotFamily:
    """One scraped LLM metric under each of its names, every name given the same value."""

    def __init__(self, members: list[tuple[_Naming, GaugeMetricFamily | CounterMetricFamily]]) -> None:
        self._members = members

    def add(self, model: str, value: float, labels: Sequence[str] = ()) -> None:
        for naming, metric in self._members:
            metric.add_metric(naming.label_values(model, labels), value)

    def metrics(self) -> Iterator[Metric]:
        for _, metric in self._members:
            yield metric
