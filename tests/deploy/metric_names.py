"""The one list of metric names the deployment assets may use (dashboard, HPA, adapter rule).

test_dashboard.py checks it against what inferd.api.metrics.Metrics exports; when a name changes
there, change it here and in the dashboard's m_* constant variables.
"""

from __future__ import annotations

COUNTER = "counter"
GAUGE = "gauge"
HISTOGRAM = "histogram"

METRICS: dict[str, str] = {
    # LLM engine, label `model` (vLLM's names under the inferd: prefix)
    "inferd:num_requests_running": GAUGE,
    "inferd:num_requests_waiting": GAUGE,
    "inferd:kv_cache_usage_perc": GAUGE,
    "inferd:cache_config_info": GAUGE,  # 1, the KV layout in labels (block_size, num_gpu_blocks, ...)
    "inferd:prefix_cache_queries_total": COUNTER,
    "inferd:prefix_cache_hits_total": COUNTER,
    "inferd:spec_decode_num_draft_tokens_total": COUNTER,
    "inferd:spec_decode_num_accepted_tokens_total": COUNTER,
    "inferd:prompt_tokens_total": COUNTER,
    "inferd:generation_tokens_total": COUNTER,
    "inferd:request_success_total": COUNTER,
    "inferd:time_to_first_token_seconds": HISTOGRAM,
    "inferd:inter_token_latency_seconds": HISTOGRAM,
    "inferd:e2e_request_latency_seconds": HISTOGRAM,
    "inferd:request_queue_time_seconds": HISTOGRAM,
    "inferd:iteration_tokens": HISTOGRAM,
    "inferd:structured_mask_seconds": HISTOGRAM,  # grammar masks per engine step (structured output)
    # encoders, label `model` (TEI's set; the durations per request, the batch one per batch)
    "inferd:encoder_queue_size": GAUGE,
    "inferd:encoder_batch_size": HISTOGRAM,
    "inferd:encoder_batch_tokens": HISTOGRAM,
    "inferd:encoder_batch_inference_duration_seconds": HISTOGRAM,
    "inferd:encoder_tokenization_duration_seconds": HISTOGRAM,
    "inferd:encoder_queue_duration_seconds": HISTOGRAM,
    "inferd:encoder_inference_duration_seconds": HISTOGRAM,
    # the model pool, label `model` (`reason` too on unloads)
    "inferd:model_loads_total": COUNTER,
    "inferd:model_unloads_total": COUNTER,
    "inferd:model_evictions_total": COUNTER,
    "inferd:model_load_seconds": HISTOGRAM,
    "inferd:model_resident_bytes": GAUGE,
    # HTTP, labels `method`, `route` and `status` (the duration has no `status`)
    "inferd:http_requests_total": COUNTER,
    "inferd:http_request_duration_seconds": HISTOGRAM,
}

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def series_kind(series: str) -> tuple[str, str] | None:
    """(metric, kind) for a series name: a metric itself or a histogram's _bucket/_sum/_count."""
    if series in METRICS:
        return series, METRICS[series]
    for suffix in HISTOGRAM_SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and METRICS.get(base) == HISTOGRAM:
            return base, f"{HISTOGRAM}{suffix}"
    return None
