"""The load generator: one asyncio loop and one httpx client; per level, C workers take request
numbers from a queue, each sending its next request as soon as its last answer ends.

Request bodies are encoded before a level's clock starts, and a stream is parsed line by line as its
bytes arrive (``SSEParser``), so the generator's own CPU time stays small next to a server sharing
the machine. Every request becomes one JSON-ready sample (times in ms, rounded to microseconds):
``stats`` computes every figure from the samples alone.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from inferd.bench import prompts as prompt_sets

if TYPE_CHECKING:
    import httpx

ERROR_BYTES = 300  # of an error answer or event, kept in the sample
JSON_HEADERS = {"content-type": "application/json"}
CONNECT_TIMEOUT_S = 30.0
# The "kind" of each command's models in a /v1/models listing, as inferd writes it.
MODEL_KINDS = {"chat": "chat", "embed": "embedding", "rerank": "rerank"}
ROUTES = {
    ("chat", "openai"): "/v1/chat/completions",
    ("embed", "openai"): "/v1/embeddings",
    ("embed", "tei"): "/embed",
    ("rerank", "cohere"): "/v1/rerank",
    ("rerank", "tei"): "/rerank",
}


class BenchError(Exception):
    """A reason to stop before (or instead of) measuring, in one line a person can act on."""


@dataclass
class Settings:
    """What a run was asked to do; saved in the report (the API key never is)."""

    kind: str  # chat, embed or rerank
    url: str
    api: str  # openai, tei or cohere
    model: str | None = None
    concurrency: list[int] = field(default_factory=lambda: [1])
    requests: int | None = None  # per level; None: requests_for(c)
    warmup: int = 0
    timeout_s: float = 600.0
    # chat
    max_tokens: int | None = None
    ignore_eos: bool = False
    temperature: float | None = None
    cold: bool = True
    slo_ttft_ms: float | None = None
    slo_itl_ms: float | None = None
    prompts_file: str | None = None
    # embed and rerank
    batch: int | None = None
    documents: int | None = None
    top_n: int | None = None
    texts_file: str | None = None
    queries_file: str | None = None

    @property
    def path(self) -> str:
        return ROUTES[(self.kind, self.api)]

    def requests_for(self, concurrency: int) -> int:
        """Per level: --requests, else four rounds of the level's workers and at least 16."""
        return self.requests or max(16, 4 * concurrency)


def base_url(url: str) -> str:
    """The server's root: an OpenAI client's ``.../v1`` base is accepted too."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass(frozen=True, slots=True)
class Prepared:
    body: bytes
    meta: dict


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _snippet(data: bytes) -> str:
    return data[:ERROR_BYTES].decode("utf-8", errors="replace")


async def _first_bytes(response: httpx.Response) -> str:
    """The opening of an error answer, without reading an endless one to its end."""
    data = b""
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) >= ERROR_BYTES:
            break
    return _snippet(data)


def _transport_error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:ERROR_BYTES]


def _stale_connection(exc: Exception, status: int | None, attempt: int) -> bool:
    """Whether to send a request once more: its first attempt ended with the connection closed
    before any answer, which is how a kept-alive connection the server has dropped fails (some
    servers close one after a few requests; llama.cpp's did once in 16). A second such failure is
    the server's own, and is reported."""
    import httpx

    return attempt == 0 and status is None and isinstance(exc, httpx.RemoteProtocolError)


# ---------------------------------------------------------------------------------------------- chat


class SSEParser:
    """Splits a byte stream into the payloads of its ``data:`` lines as the bytes arrive, holding
    only the unfinished last line; the first other non-empty line is kept (for an error text)."""

    def __init__(self) -> None:
        self._rest = b""
        self.other: bytes | None = None

    def feed(self, chunk: bytes) -> list[bytes]:
        lines = (self._rest + chunk if self._rest else chunk).split(b"\n")
        self._rest = lines.pop()
        return self._payloads(lines)

    def flush(self) -> list[bytes]:
        rest, self._rest = self._rest, b""
        return self._payloads([rest]) if rest else []

    def _payloads(self, lines: list[bytes]) -> list[bytes]:
        out = []
        for line in lines:
            line = line.rstrip(b"\r")
            if line.startswith(b"data:"):
                out.append(line[5:].strip())
            elif line and not line.startswith((b":", b"event:", b"id:", b"retry:")) and self.other is None:
                self.other = line[:ERROR_BYTES]
        return out


class ChatStream:
    """What one streamed chat request saw; times in seconds since it was sent."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.deltas: list[float] = []  # arrival of each event carrying non-empty text
        self.done_at: float | None = None  # arrival of [DONE]
        self.output_tokens: int | None = None
        self.prompt_tokens: int | None = None
        self.cached_tokens: int | None = None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.retried = False  # sent again: the server closed its kept-alive connection unanswered

    def event(self, payload: bytes, now: float) -> None:
        """One ``data:`` payload. Text is content or reasoning (``reasoning_content`` /
        ``reasoning``): a reasoning model's first thoughts are its first tokens."""
        if payload == b"[DONE]":
            self.done_at = now
            return
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.fail(f"bad event: {_snippet(payload)}")
            return
        if not isinstance(event, dict):
            self.fail(f"bad event: {_snippet(payload)}")
            return
        if event.get("error") or event.get("object") == "error":
            self.fail(f"stream error: {_snippet(payload)}")
        usage = event.get("usage")
        if isinstance(usage, dict):
            self.output_tokens = _int(usage.get("completion_tokens"), self.output_tokens)
            self.prompt_tokens = _int(usage.get("prompt_tokens"), self.prompt_tokens)
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict):
                self.cached_tokens = _int(details.get("cached_tokens"), self.cached_tokens)
        text = False
        for choice in event.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
                text = True
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        if text:
            self.deltas.append(now)

    def fail(self, message: str) -> None:
        """Keeps the first error: what went wrong first explains the rest."""
        if self.error is None:
            self.error = message


def _int(value: Any, default: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _inputs(given: list | None, file: str | None, load, builtin) -> list:
    """The caller's inputs, else those of the file the command named, else the built-in set."""
    if given is not None:
        return given
    return load(Path(file)) if file else builtin()


class _Workload:
    """What every workload shares: the route and the encoding of its bodies. A caller that drives
    the load itself (benchmarks/llm_bench.py, embed_bench.py) may name another ``path`` (a server
    that serves the API elsewhere, such as Infinity's ``/embeddings``) and ``extra_body``: fields
    added to every body, replacing the workload's own of the same name (a server's extensions or
    settings: ``ignore_eos``, a ``response_format``, ``encoding_format``)."""

    def __init__(
        self, settings: Settings, model: str | None, path: str | None, extra_body: dict | None
    ) -> None:
        self.settings = settings
        self.model = model
        self.path = path or settings.path
        self.extra_body = extra_body or {}

    def _encode(self, body: dict) -> bytes:
        return orjson.dumps({**body, **self.extra_body})


class ChatWorkload(_Workload):
    """Streamed ``POST /v1/chat/completions``; prompt i of a level is prompt i mod the set's size
    (``prompts``, chats given by the caller; else ``--prompts`` or the built-in set)."""

    def __init__(
        self,
        settings: Settings,
        model: str | None,
        run_id: str,
        *,
        prompts: list[list[dict]] | None = None,
        path: str | None = None,
        extra_body: dict | None = None,
    ) -> None:
        super().__init__(settings, model, path, extra_body)
        self.run_id = run_id
        self.prompts = _inputs(prompts, settings.prompts_file, prompt_sets.load_prompts, prompt_sets.builtin_prompts)

    def prepare(self, tag: str, n: int, warmup: bool = False) -> list[Prepared]:
        """Warm-up prompts always carry a marker, so they are never the measured prompts."""
        s = self.settings
        out = []
        for i in range(n):
            p = i % len(self.prompts)
            marker = prompt_sets.cold_marker(self.run_id, tag, i) if s.cold or warmup else None
            messages = prompt_sets.with_marker(self.prompts[p], marker) if marker else self.prompts[p]
            body: dict = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}}
            if self.model is not None:
                body["model"] = self.model
            if s.max_tokens is not None:
                body["max_tokens"] = s.max_tokens
            if s.temperature is not None:
                body["temperature"] = s.temperature
            if s.ignore_eos:
                body["ignore_eos"] = True
            out.append(Prepared(self._encode(body), {"prompt": p, "marker": marker}))
        return out

    async def send(
        self, client: httpx.AsyncClient, prep: Prepared, level_t0: float, timeout_s: float
    ) -> dict:
        st = ChatStream()
        sent = time.perf_counter()
        try:
            await asyncio.wait_for(self._stream(client, prep.body, st, sent), timeout_s)
        except asyncio.TimeoutError:
            if st.done_at is None:  # a server that keeps the connection open after [DONE] is fine
                st.fail(f"timed out after {timeout_s:g} s")
        end = time.perf_counter() - sent
        e2e = st.done_at if st.done_at is not None else end
        deltas = [_ms(t) for t in st.deltas]
        return {
            **prep.meta,
            "start_ms": _ms(sent - level_t0),
            "status": st.status,
            "ttft_ms": deltas[0] if deltas else None,
            "e2e_ms": _ms(e2e),
            "deltas_ms": deltas,
            "output_tokens": st.output_tokens,
            "prompt_tokens": st.prompt_tokens,
            "cached_tokens": st.cached_tokens,
            "finish_reason": st.finish_reason,
            "error": st.error,
            "retried": st.retried,
        }

    async def _stream(self, client: httpx.AsyncClient, body: bytes, st: ChatStream, sent: float) -> None:
        import httpx

        for attempt in (0, 1):
            parser = SSEParser()
            try:
                async with client.stream("POST", self.path, content=body, headers=JSON_HEADERS) as r:
                    st.status = r.status_code
                    if not 200 <= r.status_code < 300:
                        st.fail(f"HTTP {r.status_code}: {await _first_bytes(r)}")
                        return
                    async for chunk in r.aiter_bytes():
                        if st.done_at is not None:
                            continue  # read to the end, so the connection is reused
                        now = time.perf_counter() - sent
                        for payload in parser.feed(chunk):
                            st.event(payload, now)
                            if st.done_at is not None:
                                break
                    end = time.perf_counter() - sent
                    if st.done_at is None:
                        for payload in parser.flush():
                            st.event(payload, end)
            except httpx.HTTPError as exc:
                if _stale_connection(exc, st.status, attempt):
                    st.retried = True
                    continue
                if st.done_at is None:
                    st.fail(_transport_error(exc))
                return
            break
        if st.done_at is None and st.finish_reason is None:
            other = f": {_snippet(parser.other)}" if parser.other else ""
            st.fail(f"stream ended before [DONE]{other}")


# ---------------------------------------------------------------------------------------------- embed, rerank


def _count_error(rows: Any, expected: int, what: str) -> str | None:
    """None when the answer holds the ``expected`` rows asked for."""
    if isinstance(rows, list) and len(rows) == expected:
        return None
    got = len(rows) if isinstance(rows, list) else "no list of"
    return f"asked for {expected} {what}, got {got}"


class _PostWorkload(_Workload):
    """One JSON request, one JSON answer; latency is from sending to the answer's last byte. Texts
    are ``texts`` given by the caller, else ``--texts`` or the built-in passages."""

    def __init__(
        self,
        settings: Settings,
        model: str | None,
        *,
        texts: list[str] | None = None,
        path: str | None = None,
        extra_body: dict | None = None,
    ) -> None:
        super().__init__(settings, model, path, extra_body)
        self.texts = _inputs(texts, settings.texts_file, prompt_sets.load_lines, prompt_sets.builtin_passages)

    def check(self, answer: Any, meta: dict) -> tuple[str | None, int | None]:
        """An error text when the answer is not what was asked for; input tokens when it says."""
        raise NotImplementedError

    async def send(
        self, client: httpx.AsyncClient, prep: Prepared, level_t0: float, timeout_s: float
    ) -> dict:
        import httpx

        error: str | None = None
        status: int | None = None
        tokens: int | None = None
        retried = False
        sent = time.perf_counter()
        for attempt in (0, 1):
            try:
                r = await asyncio.wait_for(
                    client.post(self.path, content=prep.body, headers=JSON_HEADERS), timeout_s
                )
            except asyncio.TimeoutError:
                error = f"timed out after {timeout_s:g} s"
            except httpx.HTTPError as exc:
                if _stale_connection(exc, None, attempt):
                    retried = True
                    continue
                error = _transport_error(exc)
            break
        latency = time.perf_counter() - sent
        if error is None:
            status = r.status_code
            if not 200 <= status < 300:
                error = f"HTTP {status}: {_snippet(r.content)}"
            else:
                try:
                    answer = orjson.loads(r.content)
                except orjson.JSONDecodeError:
                    error = f"not JSON: {_snippet(r.content)}"
                else:
                    error, tokens = self.check(answer, prep.meta)
        return {
            **prep.meta,
            "start_ms": _ms(sent - level_t0),
            "status": status,
            "latency_ms": _ms(latency),
            "prompt_tokens": tokens,
            "error": error,
            "retried": retried,
        }


class EmbedWorkload(_PostWorkload):
    """``--api openai``: ``POST /v1/embeddings {model, input}``; ``--api tei``: ``POST /embed {inputs}``.
    Request i embeds texts i*B .. i*B+B-1 (mod the set's size)."""

    def prepare(self, tag: str, n: int, warmup: bool = False) -> list[Prepared]:
        batch = self.settings.batch or 1
        out = []
        for i in range(n):
            first = (i * batch) % len(self.texts)
            texts = [self.texts[(first + k) % len(self.texts)] for k in range(batch)]
            if warmup:
                texts = [f"warm-up: {t}" for t in texts]
            if self.settings.api == "tei":
                body: dict = {"inputs": texts}
            else:
                body = {"input": texts} | ({"model": self.model} if self.model is not None else {})
            out.append(Prepared(self._encode(body), {"first_text": first, "texts": batch}))
        return out

    def check(self, answer: Any, meta: dict) -> tuple[str | None, int | None]:
        tokens = None
        if self.settings.api == "tei":
            rows = answer if isinstance(answer, list) else None
        else:
            rows = answer.get("data") if isinstance(answer, dict) else None
            usage = answer.get("usage") if isinstance(answer, dict) else None
            if isinstance(usage, dict):
                tokens = _int(usage.get("prompt_tokens"), None)
        return _count_error(rows, meta["texts"], "embeddings"), tokens


class RerankWorkload(_PostWorkload):
    """``--api cohere``: ``POST /v1/rerank {model, query, documents, top_n}``; ``--api tei``:
    ``POST /rerank {query, texts}``. Request i ranks texts i*D .. i*D+D-1 against query i (mod the
    sets' sizes); queries are ``queries`` given by the caller, else ``--queries`` or the built-in ones."""

    def __init__(
        self,
        settings: Settings,
        model: str | None,
        *,
        texts: list[str] | None = None,
        queries: list[str] | None = None,
        path: str | None = None,
        extra_body: dict | None = None,
    ) -> None:
        super().__init__(settings, model, texts=texts, path=path, extra_body=extra_body)
        self.queries = _inputs(queries, settings.queries_file, prompt_sets.load_lines, prompt_sets.builtin_queries)

    def prepare(self, tag: str, n: int, warmup: bool = False) -> list[Prepared]:
        docs = self.settings.documents or 1
        out = []
        for i in range(n):
            q = i % len(self.queries)
            query = self.queries[q]
            first = (i * docs) % len(self.texts)
            texts = [self.texts[(first + k) % len(self.texts)] for k in range(docs)]
            if warmup:
                query = f"warm-up: {query}"
            if self.settings.api == "tei":
                body: dict = {"query": query, "texts": texts}
                expect = docs
            else:
                top_n = min(self.settings.top_n or docs, docs)
                body = {"query": query, "documents": texts, "top_n": top_n}
                if self.model is not None:
                    body["model"] = self.model
                expect = top_n
            out.append(
                Prepared(
                    self._encode(body),
                    {"query": q, "first_text": first, "documents": docs, "results": expect},
                )
            )
        return out

    def check(self, answer: Any, meta: dict) -> tuple[str | None, int | None]:
        if self.settings.api == "tei":
            rows = answer if isinstance(answer, list) else None
        else:
            rows = answer.get("results") if isinstance(answer, dict) else None
        return _count_error(rows, meta["results"], "results"), None


def make_workload(settings: Settings, model: str | None, run_id: str):
    if settings.kind == "chat":
        return ChatWorkload(settings, model, run_id)
    if settings.kind == "embed":
        return EmbedWorkload(settings, model)
    return RerankWorkload(settings, model)


# ---------------------------------------------------------------------------------------------- levels


async def run_level(
    client: httpx.AsyncClient,
    workload,
    prepared: list[Prepared],
    concurrency: int,
    timeout_s: float,
    advance: Callable[[], None] = lambda: None,
) -> tuple[float, list[dict]]:
    """Every prepared request, through ``concurrency`` workers; the level's wall time in seconds
    (from the first send to the last answer's end) and the samples in request order."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(prepared)):
        queue.put_nowait(i)
    samples: list[dict] = [{}] * len(prepared)
    t0 = time.perf_counter()

    async def worker() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            samples[i] = await workload.send(client, prepared[i], t0, timeout_s)
            advance()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prepared)))))
    return round(time.perf_counter() - t0, 6), samples


async def default_model(client: httpx.AsyncClient, kind: str) -> str | None:
    """The first model of ``GET /v1/models`` (the first of the benchmarked kind when the listing
    says kinds, as inferd's does); None when the API has no listing."""
    r = await client.get("/v1/models")
    if r.status_code in (401, 403):
        raise BenchError(f"GET /v1/models: HTTP {r.status_code}: {_snippet(r.content)} (set --api-key)")
    if not 200 <= r.status_code < 300:
        return None
    try:
        data = orjson.loads(r.content).get("data")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    cards = (
        [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        if isinstance(data, list)
        else []
    )
    for card in cards:
        if card.get("kind") == MODEL_KINDS[kind]:
            return card["id"]
    return cards[0]["id"] if cards else None


class _Bars:
    """A rich progress bar per level on stderr (rich draws it live only on a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description:>12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=Console(stderr=True), transient=False,
            )  # fmt: skip

    def __enter__(self) -> _Bars:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def level(self, label: str, total: int) -> Callable[[], None]:
        if self.progress is None:
            return lambda: None
        task = self.progress.add_task(label, total=total)
        return lambda: self.progress.advance(task)


async def run(settings: Settings, api_key: str | None, command: str, progress: bool = True) -> dict:
    """Warm-up, then every concurrency level; the report (see ``report.new_report``)."""
    import httpx

    from inferd.bench.report import new_report

    peak = max([*settings.concurrency, min(settings.warmup, max(settings.concurrency))])
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=peak, max_keepalive_connections=peak)
    timeout = httpx.Timeout(settings.timeout_s, connect=min(settings.timeout_s, CONNECT_TIMEOUT_S))
    run_id = secrets.token_hex(4)
    url = base_url(settings.url)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout) as client:
        model = settings.model
        if model is None and settings.api != "tei":  # TEI's routes take no model
            try:
                model = await default_model(client, settings.kind)
            except httpx.HTTPError as exc:
                raise BenchError(f"cannot reach {url}: {_transport_error(exc)}") from None
        workload = make_workload(settings, model, run_id)
        report = new_report(asdict(settings), command, model, run_id)
        with _Bars(progress) as bars:
            if settings.warmup:
                c = min(settings.warmup, max(settings.concurrency))
                prepared = workload.prepare("warmup", settings.warmup, warmup=True)
                wall, samples = await run_level(
                    client, workload, prepared, c, settings.timeout_s, bars.level("warm-up", len(prepared))
                )
                errors = [s["error"] for s in samples if s["error"] is not None]
                report["warmup"] = {
                    "requests": len(samples),
                    "concurrency": c,
                    "wall_s": wall,
                    "errors": len(errors),
                    "first_error": errors[0] if errors else None,
                }
                if len(errors) == len(samples):
                    raise BenchError(f"every warm-up request failed: {errors[0]}")
            for index, c in enumerate(settings.concurrency):
                n = settings.requests_for(c)
                prepared = workload.prepare(f"L{index}c{c}", n)
                wall, samples = await run_level(
                    client, workload, prepared, c, settings.timeout_s, bars.level(f"c={c}", n)
                )
                report["levels"].append({"concurrency": c, "requests": n, "wall_s": wall, "samples": samples})
    return report
