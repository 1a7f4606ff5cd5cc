"""inferd.bench.load driven by a caller (as benchmarks/llm_bench.py and embed_bench.py drive it): its
own prompts, texts and queries, another route and extra body fields, through run_level against a
mock server."""

import asyncio

import httpx
import orjson

from inferd.bench import stats
from inferd.bench.load import ChatWorkload, EmbedWorkload, RerankWorkload, Settings, run_level

SSE = (
    b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n'
    b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
    b'data: {"choices":[{"delta":{"content":" there"},"finish_reason":"length"}]}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
    b"data: [DONE]\n\n"
)


def serve(prepared, workload, concurrency, answer):
    """Every prepared request through run_level against ``answer(request)``; the requests the server
    saw (path, body) and the level's samples."""
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, orjson.loads(request.content)))
        return answer(request)

    async def level():
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench.test") as client:
            return await run_level(client, workload, prepared, concurrency, 5.0)

    _, samples = asyncio.run(level())
    return seen, samples


def test_chat_workload_takes_the_callers_prompts_route_and_extra_body():
    chats = [[{"role": "user", "content": f"prompt {i}"}] for i in range(3)]
    settings = Settings("chat", "http://bench.test", "openai", max_tokens=2, temperature=0.0)
    extra = {"ignore_eos": True, "response_format": {"type": "json_object"}, "temperature": 0.5}
    workload = ChatWorkload(
        settings, "m", "run1", prompts=chats, path="/api/chat/completions", extra_body=extra
    )
    prepared = workload.prepare("L0c2", 4)
    seen, samples = serve(prepared, workload, 2, lambda r: httpx.Response(200, content=SSE))

    assert {path for path, _ in seen} == {"/api/chat/completions"}
    bodies = sorted((b for _, b in seen), key=lambda b: b["messages"][0]["content"])
    texts = [b["messages"][0]["content"] for b in bodies]
    # Prompt i mod 3, each behind its own cold marker: no two requests alike.
    assert sorted(t.split("] ", 1)[1] for t in texts) == ["prompt 0", "prompt 0", "prompt 1", "prompt 2"]
    assert len(set(texts)) == 4
    for body in bodies:
        assert body["model"] == "m" and body["max_tokens"] == 2 and body["stream"] is True
        assert body["ignore_eos"] is True and body["response_format"] == {"type": "json_object"}
        assert body["temperature"] == 0.5  # an extra field replaces the workload's own
    assert chats[0] == [{"role": "user", "content": "prompt 0"}]  # the caller's prompts are not changed

    assert [s["prompt"] for s in samples] == [0, 1, 2, 0]
    assert all(s["error"] is None and s["output_tokens"] == 2 and len(s["deltas_ms"]) == 2 for s in samples)
    summary = stats.chat_summary({"samples": samples, "wall_s": 1.0}, max_tokens=2)
    assert summary["output_tokens"] == 8 and summary["short_answers"] == 0


def test_warm_up_prompts_of_a_callers_set_are_marked_apart_from_measured_ones():
    chats = [[{"role": "user", "content": "same"}]]
    settings = Settings("chat", "http://bench.test", "openai", cold=False)
    workload = ChatWorkload(settings, None, "run1", prompts=chats)
    measured = orjson.loads(workload.prepare("L0c1", 1)[0].body)
    warm = orjson.loads(workload.prepare("warm", 1, warmup=True)[0].body)
    assert measured["messages"] == chats[0] and "model" not in measured
    assert warm["messages"][0]["content"].endswith("] same") and warm["messages"] != measured["messages"]


def test_embed_and_rerank_workloads_take_the_callers_texts_queries_route_and_extra_body():
    texts = [f"passage {i}" for i in range(4)]
    embed = EmbedWorkload(
        Settings("embed", "http://bench.test", "openai", batch=2),
        "e",
        texts=texts,
        path="/embeddings",
        extra_body={"encoding_format": "float"},
    )

    def embeddings(request):
        n = len(orjson.loads(request.content)["input"])
        return httpx.Response(200, json={"data": [{"index": i, "embedding": [0.0]} for i in range(n)]})

    seen, samples = serve(embed.prepare("L0", 2), embed, 1, embeddings)
    assert seen == [
        ("/embeddings", {"input": texts[:2], "model": "e", "encoding_format": "float"}),
        ("/embeddings", {"input": texts[2:], "model": "e", "encoding_format": "float"}),
    ]
    assert [(s["first_text"], s["texts"], s["error"]) for s in samples] == [(0, 2, None), (2, 2, None)]

    rerank = RerankWorkload(
        Settings("rerank", "http://bench.test", "cohere", documents=2),
        "r",
        texts=texts,
        queries=["q0", "q1"],
        path="/rerank",
        extra_body={"return_documents": False},
    )

    def results(request):
        return httpx.Response(200, json={"results": [{"index": 0}, {"index": 1}]})

    seen, samples = serve(rerank.prepare("L0", 2), rerank, 1, results)
    assert seen == [
        ("/rerank", {"query": q, "documents": d, "top_n": 2, "model": "r", "return_documents": False})
        for q, d in (("q0", texts[:2]), ("q1", texts[2:]))
    ]
    assert all(s["error"] is None and s["documents"] == 2 for s in samples)

    tei = RerankWorkload(Settings("rerank", "http://bench.test", "tei", documents=2), None, texts=texts)
    assert tei.path == "/rerank" and orjson.loads(tei.prepare("L0", 1)[0].body) == {
        "query": tei.queries[0],
        "texts": texts[:2],
    }


def _drops_first(answer):
    """A server that closes the first connection unanswered (a dropped kept-alive connection)."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return answer(request)

    return handler


def test_a_request_whose_connection_was_dropped_unanswered_is_sent_once_more():
    chat = Settings("chat", "http://bench.test", "openai", max_tokens=2)
    workload = ChatWorkload(chat, "m", "run1", prompts=[[{"role": "user", "content": "x"}]])
    _, samples = serve(workload.prepare("L0", 2), workload, 1, _drops_first(lambda r: httpx.Response(200, content=SSE)))
    assert [s["error"] for s in samples] == [None, None]
    assert [s["retried"] for s in samples] == [True, False]

    embed = Settings("embed", "http://bench.test", "openai", batch=1)
    workload = EmbedWorkload(embed, "m", texts=["a", "b"])
    rows = {"data": [{"index": 0, "embedding": [0.0]}]}
    _, samples = serve(workload.prepare("L0", 2), workload, 1, _drops_first(lambda r: httpx.Response(200, json=rows)))
    assert [s["error"] for s in samples] == [None, None]
    assert [s["retried"] for s in samples] == [True, False]


def test_a_server_that_drops_every_connection_is_reported_not_retried_forever():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    chat = Settings("chat", "http://bench.test", "openai", max_tokens=2)
    workload = ChatWorkload(chat, "m", "run1", prompts=[[{"role": "user", "content": "x"}]])
    seen, samples = serve(workload.prepare("L0", 2), workload, 1, lambda r: handler(r))
    assert len(seen) == 4  # each request sent twice, no more
    assert all(s["error"].startswith("RemoteProtocolError") and s["retried"] for s in samples)
