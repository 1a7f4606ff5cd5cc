"""inferd bench's figures on hand-made samples: percentiles, ITL pooling, goodput, the SSE parser."""

import pytest

from inferd.bench import stats
from inferd.bench.load import ChatStream, SSEParser, base_url
from inferd.bench.prompts import builtin_passages, builtin_prompts, cold_marker, with_marker


def chat_sample(deltas, tokens=None, error=None, e2e=None, cached=None):
    return {
        "ttft_ms": deltas[0] if deltas else None,
        "deltas_ms": deltas,
        "e2e_ms": e2e if e2e is not None else (deltas[-1] + 1 if deltas else 1.0),
        "output_tokens": tokens,
        "prompt_tokens": 10 if tokens is not None else None,
        "cached_tokens": cached,
        "error": error,
    }


def test_percentile_interpolates_between_closest_ranks_like_numpy():
    xs = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert stats.percentile(xs, 50) == 2.5
    assert stats.percentile(xs, 90) == pytest.approx(3.7, abs=1e-12)
    assert stats.percentile(xs, 99) == pytest.approx(3.97, abs=1e-12)
    assert stats.percentile(xs, 0) == 1.0 and stats.percentile(xs, 100) == 4.0
    assert stats.percentile([7.0], 99) == 7.0
    assert stats.percentile([], 50) is None
    assert xs == [4.0, 1.0, 3.0, 2.0]  # not sorted in place


def test_distribution_of_nothing_is_empty_not_zero():
    assert stats.distribution([]) == {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None}
    d = stats.distribution([10.0, 20.0, 30.0, 40.0, 50.0])
    assert d == {"count": 5, "mean": 30.0, "p50": 30.0, "p90": 46.0, "p99": 49.6}


def test_itl_pools_gaps_within_streams_only_and_skips_failed_streams():
    samples = [
        chat_sample([10.0, 15.0, 25.0], tokens=3),
        chat_sample([100.0, 101.0], tokens=2),  # its first delta is 75 ms after the other's last: no gap
        chat_sample([0.0, 1000.0], tokens=2, error="HTTP 500: boom"),
        chat_sample([], tokens=0),  # an empty answer has no gap
    ]
    assert sorted(stats.pooled_itl(samples)) == [1.0, 5.0, 10.0]
    summary = stats.chat_summary({"samples": samples, "wall_s": 2.0})
    assert summary["itl_ms"] == {"count": 3, "mean": 5.3333, "p50": 5.0, "p90": 9.0, "p99": 9.9}
    assert stats.mean_itl([10.0, 15.0, 25.0]) == 7.5
    assert stats.mean_itl([10.0]) is None


def test_chat_summary_counts_tokens_latency_and_errors():
    samples = [
        chat_sample([10.0, 15.0, 25.0], tokens=4, e2e=30.0, cached=8),
        chat_sample([20.0, 30.0], tokens=4, e2e=40.0, cached=0),
        chat_sample([50.0], tokens=2, e2e=60.0, cached=0),  # stopped early
        chat_sample([], error="HTTP 404: no such model"),
        chat_sample([], error="HTTP 404: no such model"),
    ]
    m = stats.chat_summary({"samples": samples, "wall_s": 2.0}, max_tokens=4)
    assert (m["requests"], m["ok"], m["errors"]) == (5, 3, 2)
    assert m["requests_per_s"] == 1.5
    assert m["tokens_from"] == "usage" and m["output_tokens"] == 10 and m["output_tokens_per_s"] == 5.0
    assert m["short_answers"] == 1 and m["empty_answers"] == 0
    assert m["cached_tokens"] == 8 and m["prompt_tokens"] == 30
    assert m["ttft_ms"]["p50"] == 20.0 and m["ttft_ms"]["count"] == 3
    assert m["e2e_ms"]["p50"] == 40.0 and m["e2e_ms"]["p90"] == 56.0
    assert m["goodput"] is None
    assert m["first_errors"] == [{"error": "HTTP 404: no such model", "count": 2}]


def test_tokens_fall_back_to_deltas_for_the_whole_level_when_one_stream_lacks_usage():
    samples = [chat_sample([1.0, 2.0, 3.0], tokens=30), chat_sample([1.0, 2.0], tokens=None)]
    m = stats.chat_summary({"samples": samples, "wall_s": 1.0}, max_tokens=30)
    assert m["tokens_from"] == "deltas" and m["output_tokens"] == 5
    assert m["short_answers"] is None  # unknown without the server's count


def test_goodput_share_counts_every_request_and_tokens_of_good_ones():
    samples = [
        chat_sample([10.0, 15.0, 25.0], tokens=3),  # TTFT 10, mean ITL 7.5: good
        chat_sample([60.0, 61.0], tokens=2),  # TTFT 60: too slow to start
        chat_sample([], error="ReadTimeout: "),  # failed: never good
        chat_sample([20.0, 40.0], tokens=2),  # TTFT 20, mean ITL 20: too slow between deltas
        chat_sample([30.0], tokens=1),  # one delta: no gap to fail the ITL SLO
        chat_sample([], tokens=0),  # no content at all: fails a TTFT SLO
    ]
    both = stats.goodput(samples, 2.0, slo_ttft_ms=50.0, slo_itl_ms=8.0)
    assert both == {
        "slo_ttft_ms": 50.0,
        "slo_itl_ms": 8.0,
        "good_requests": 2,
        "share": 0.3333,
        "output_tokens": 4,
        "output_tokens_per_s": 2.0,
        "requests_per_s": 1.0,
    }
    ttft_only = stats.goodput(samples, 2.0, slo_ttft_ms=50.0, slo_itl_ms=None)
    assert ttft_only["good_requests"] == 3 and ttft_only["output_tokens"] == 6
    itl_only = stats.goodput(samples, 2.0, slo_ttft_ms=None, slo_itl_ms=8.0)
    # The empty answer passes an ITL-only SLO; the slow-start one does too (gap 1 ms).
    assert itl_only["good_requests"] == 4 and itl_only["output_tokens"] == 6
    assert stats.goodput(samples, 2.0, None, None) is None
    assert (
        stats.goodput(samples, 2.0, 50.0, 8.0)
        == stats.chat_summary({"samples": samples, "wall_s": 2.0}, slo_ttft_ms=50.0, slo_itl_ms=8.0)[
            "goodput"
        ]
    )


def test_embed_and_rerank_rates():
    ok = {"latency_ms": 10.0, "error": None}
    embed = stats.embed_summary(
        {"samples": [{**ok, "texts": 4, "prompt_tokens": 40}, {**ok, "texts": 4, "prompt_tokens": 44},
                     {"latency_ms": 1.0, "texts": 4, "prompt_tokens": None, "error": "HTTP 413: too big"}],
         "wall_s": 0.5}
    )  # fmt: skip
    assert (embed["passages"], embed["passages_per_s"], embed["requests_per_s"]) == (8, 16.0, 4.0)
    assert embed["prompt_tokens"] == 84 and embed["errors"] == 1 and embed["latency_ms"]["count"] == 2
    rerank = stats.rerank_summary({"samples": [{**ok, "documents": 16}] * 3, "wall_s": 1.5})
    assert (rerank["pairs"], rerank["pairs_per_s"], rerank["queries_per_s"]) == (48, 32.0, 2.0)


def test_sse_parser_joins_lines_split_across_reads():
    parser = SSEParser()
    assert parser.feed(b'data: {"a"') == []
    assert parser.feed(b": 1}\r\n\r\n: keep-alive comment\n\ndata: [DO") == [b'{"a": 1}']
    assert parser.feed(b"NE]\n\n") == [b"[DONE]"]
    assert parser.other is None
    odd = SSEParser()
    assert odd.feed(b"Internal Server Error") == [] and odd.flush() == []
    assert odd.other == b"Internal Server Error"


def test_chat_stream_counts_text_deltas_usage_and_error_events():
    st = ChatStream()
    st.event(b'{"choices":[{"delta":{"role":"assistant","content":""}}]}', 0.010)
    st.event(b'{"choices":[{"delta":{"reasoning_content":"hmm"}}]}', 0.020)
    st.event(b'{"choices":[{"delta":{"content":"Hi"},"finish_reason":"length"}]}', 0.030)
    st.event(
        b'{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,'
        b'"prompt_tokens_details":{"cached_tokens":8}}}',
        0.031,
    )
    assert st.deltas == [0.020, 0.030]  # the empty role delta is not a token; reasoning is
    assert (st.output_tokens, st.prompt_tokens, st.cached_tokens, st.finish_reason) == (2, 9, 8, "length")
    assert st.error is None
    st.event(b'{"error":{"message":"grammar failed","type":"invalid_request_error"}}', 0.04)
    st.event(b'{"error":{"message":"second"}}', 0.05)
    assert st.error.startswith('stream error: {"error":{"message":"grammar failed"')
    st.event(b"[DONE]", 0.06)
    assert st.done_at == 0.06


def test_cold_markers_differ_per_run_level_and_request_from_their_second_character():
    markers = {
        cold_marker(run, tag, i) for run in ("r1", "r2") for tag in ("L0c1", "warmup") for i in range(50)
    }
    assert len(markers) == 200
    assert len({m[:3] for m in markers}) > 100  # they part at once, not after a shared run id
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    marked = with_marker(chat, "[abc]")
    assert marked == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "[abc] hello"}]
    assert chat[1]["content"] == "hello"  # the prompt set is not changed
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert with_marker(parts, "[m]")[0]["content"] == [{"type": "text", "text": "[m] hi"}]


def test_builtin_sets_and_base_url():
    prompts = builtin_prompts()
    assert len(prompts) == 64 and len({p[0]["content"] for p in prompts}) == 64
    passages = builtin_passages()
    assert len(passages) == 128 and max(len(p.split()) for p in passages) < 150
    assert base_url("http://h:1/v1/") == "http://h:1" and base_url("http://h:1/api") == "http://h:1/api"
