"""Every figure of a level, computed from its raw samples only.

The run and ``inferd bench render`` both call these functions on the same JSON-ready samples (times
already rounded to microseconds), so a report re-renders to exactly the table the run printed, and
a change of SLO can be applied to an old report. Times are milliseconds; a sample's ``error`` is
None when the request succeeded.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

PERCENTILES = (50, 90, 99)
MAX_ERRORS_SHOWN = 3


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100), interpolated linearly between closest ranks (numpy's
    default, so figures compare with other tools'); None when there are no values."""
    if not values:
        return None
    xs = sorted(values)
    return _sorted_percentile(xs, q)


def _sorted_percentile(xs: Sequence[float], q: float) -> float:
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution(values: Iterable[float]) -> dict:
    """Count, mean and the PERCENTILES of ``values`` (None each when there are none)."""
    xs = sorted(values)
    out: dict = {"count": len(xs), "mean": _round(sum(xs) / len(xs)) if xs else None}
    for q in PERCENTILES:
        out[f"p{q}"] = _round(_sorted_percentile(xs, q)) if xs else None
    return out


def gaps(times: Sequence[float]) -> list[float]:
    """The gaps between consecutive arrival times: one stream's inter-token latencies."""
    return [b - a for a, b in itertools.pairwise(times)]


def pooled_itl(samples: Iterable[dict]) -> list[float]:
    """Every successful stream's gaps in one list: each gap weighs the same, so long answers count
    in proportion to their length (as in vLLM's and llm_bench's ITL). Gaps never span two streams."""
    out: list[float] = []
    for s in samples:
        if s["error"] is None:
            out += gaps(s["deltas_ms"])
    return out


def mean_itl(times: Sequence[float]) -> float | None:
    """One stream's mean gap between content deltas (its time per output delta after the first,
    TPOT when each delta is one token); None with fewer than two deltas."""
    if len(times) < 2:
        return None
    return (times[-1] - times[0]) / (len(times) - 1)


def tokens_from_usage(ok: Sequence[dict]) -> bool:
    """Tokens are counted from the server's usage only when every successful stream reported it;
    otherwise one token per content delta for all of them, so a level never mixes the two."""
    return bool(ok) and all(s["output_tokens"] is not None for s in ok)


def output_tokens(sample: dict, from_usage: bool) -> int:
    return sample["output_tokens"] if from_usage else len(sample["deltas_ms"])


def meets_slo(sample: dict, slo_ttft_ms: float | None, slo_itl_ms: float | None) -> bool:
    """A request is good when it succeeded, its first content came within the TTFT SLO and its
    mean inter-delta gap is within the ITL SLO. A stream with no content fails a TTFT SLO; one with
    a single delta has no gap to fail an ITL SLO."""
    if sample["error"] is not None:
        return False
    if slo_ttft_ms is not None and (sample["ttft_ms"] is None or sample["ttft_ms"] > slo_ttft_ms):
        return False
    if slo_itl_ms is not None:
        itl = mean_itl(sample["deltas_ms"])
        if itl is not None and itl > slo_itl_ms:
            return False
    return True


def goodput(
    samples: Sequence[dict], wall_s: float, slo_ttft_ms: float | None, slo_itl_ms: float | None
) -> dict | None:
    """The share of all requests (failed ones included) that met every SLO given, and the output
    tokens per second of the level's wall time that they account for; None without SLOs."""
    if slo_ttft_ms is None and slo_itl_ms is None:
        return None
    ok = [s for s in samples if s["error"] is None]
    from_usage = tokens_from_usage(ok)
    good = [s for s in samples if meets_slo(s, slo_ttft_ms, slo_itl_ms)]
    tokens = sum(output_tokens(s, from_usage) for s in good)
    return {
        "slo_ttft_ms": slo_ttft_ms,
        "slo_itl_ms": slo_itl_ms,
        "good_requests": len(good),
        "share": _round(len(good) / len(samples)) if samples else None,
        "output_tokens": tokens,
        "output_tokens_per_s": _rate(tokens, wall_s),
        "requests_per_s": _rate(len(good), wall_s),
    }


def first_errors(samples: Iterable[dict], limit: int = MAX_ERRORS_SHOWN) -> list[dict]:
    """The first ``limit`` distinct error texts with how many requests failed with each."""
    counts: dict[str, int] = {}
    for s in samples:
        if s["error"] is not None:
            counts[s["error"]] = counts.get(s["error"], 0) + 1
    return [{"error": text, "count": n} for text, n in list(counts.items())[:limit]]


def chat_summary(
    level: dict,
    *,
    max_tokens: int | None = None,
    slo_ttft_ms: float | None = None,
    slo_itl_ms: float | None = None,
) -> dict:
    """One chat level's figures: throughput over its wall time, TTFT, pooled ITL, end-to-end
    latency, prefix-cache hits the server reported, and goodput under the SLOs given."""
    samples, wall = level["samples"], level["wall_s"]
    ok = [s for s in samples if s["error"] is None]
    from_usage = tokens_from_usage(ok)
    counts = [output_tokens(s, from_usage) for s in ok]
    tokens = sum(counts)
    cached = [s["cached_tokens"] for s in ok if s["cached_tokens"] is not None]
    prompt = [s["prompt_tokens"] for s in ok if s["prompt_tokens"] is not None]
    return {
        **_counts(samples, wall),
        "output_tokens": tokens,
        "tokens_from": "usage" if from_usage else "deltas",
        "output_tokens_per_s": _rate(tokens, wall),
        # Answers shorter than max_tokens: the server stopped early (EOS, a stop string, or
        # ignore_eos not honoured). Only known when the server counted the tokens.
        "short_answers": sum(1 for n in counts if n < max_tokens) if from_usage and max_tokens else None,
        "empty_answers": sum(1 for s in ok if s["ttft_ms"] is None),
        "prompt_tokens": sum(prompt) if prompt else None,
        "cached_tokens": sum(cached) if cached else None,
        "ttft_ms": distribution(s["ttft_ms"] for s in ok if s["ttft_ms"] is not None),
        "itl_ms": distribution(pooled_itl(samples)),
        "e2e_ms": distribution(s["e2e_ms"] for s in ok),
        "goodput": goodput(samples, wall, slo_ttft_ms, slo_itl_ms),
        "first_errors": first_errors(samples),
    }


def embed_summary(level: dict) -> dict:
    """One embedding level's figures: passages (texts embedded) per second and request latency."""
    samples, wall = level["samples"], level["wall_s"]
    ok = [s for s in samples if s["error"] is None]
    passages = sum(s["texts"] for s in ok)
    tokens = [s["prompt_tokens"] for s in ok if s["prompt_tokens"] is not None]
    return {
        **_counts(samples, wall),
        "passages": passages,
        "passages_per_s": _rate(passages, wall),
        "prompt_tokens": sum(tokens) if tokens and len(tokens) == len(ok) else None,
        "latency_ms": distribution(s["latency_ms"] for s in ok),
        "first_errors": first_errors(samples),
    }


def rerank_summary(level: dict) -> dict:
    """One rerank level's figures: query-document pairs and queries per second, request latency."""
    samples, wall = level["samples"], level["wall_s"]
    ok = [s for s in samples if s["error"] is None]
    pairs = sum(s["documents"] for s in ok)
    return {
        **_counts(samples, wall),
        "pairs": pairs,
        "pairs_per_s": _rate(pairs, wall),
        "queries_per_s": _rate(len(ok), wall),
        "latency_ms": distribution(s["latency_ms"] for s in ok),
        "first_errors": first_errors(samples),
    }


def _counts(samples: Sequence[dict], wall_s: float) -> dict:
    ok = sum(1 for s in samples if s["error"] is None)
    return {
        "requests": len(samples),
        "ok": ok,
        "errors": len(samples) - ok,
        "wall_s": wall_s,
        "requests_per_s": _rate(ok, wall_s),
    }


def _rate(count: float, wall_s: float) -> float | None:
    return _round(count / wall_s) if wall_s > 0 else None


def _round(x: float) -> float:
    return round(x, 4)
