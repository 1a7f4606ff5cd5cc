"""LLMClient: the async interface the API layer uses; the engine loop runs on its own thread."""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Protocol

from inferd.compute import compute
from inferd.config.engine import LLMConfig
from inferd.errors import (
    EngineError,
    EngineUnavailableError,
    InvalidRequestError,
    OverloadedError,
    SlowReaderError,
)
from inferd.llm.engine import LLMEngine, is_request_error
from inferd.llm.outputs import SCORE, EngineStats, RequestOutput
from inferd.llm.params import Guide, SamplingParams
from inferd.llm.precision import load_engine

log = logging.getLogger(__name__)
_ids = itertools.count()
_STATS_INTERVAL_S = 10.0
# Default prompt character cap per token of context: text runs 3-5 characters a token, so a prompt
# this long could only fit in pathological cases, and tokenising it (~1 s per MB here) is bounded.
_CHARS_PER_CONTEXT_TOKEN = 32
# Longer texts (token lists) go through the tokenizer's batch calls, which release the GIL.
_INLINE_ENCODE_CHARS = 16_384
_INLINE_DECODE_TOKENS = 4_096
# Scoring prompts with more tokens than this in all are checked on a worker thread (a Python pass
# over every id: ~25 ms per 500k).
_INLINE_CHECK_TOKENS = 65_536


class GenerationObserver(Protocol):
    """Told about each output and each engine step (for metrics); must be quick and never raise."""

    def on_output(self, output: RequestOutput, elapsed_s: float, gap_s: float | None) -> None:
        """On the event loop: ``elapsed_s`` since the request was sent, ``gap_s`` since its previous
        output (None for the first)."""

    def on_abort(self, elapsed_s: float) -> None:
        """On the event loop: the request ended before finishing (client gone, engine crashed)."""

    def on_step(self, num_tokens: int) -> None:
        """On the engine thread: a step computed ``num_tokens`` tokens."""

    def on_mask(self, seconds: float, num_rows: int) -> None:
        """On the engine thread: a step spent ``seconds`` filling the grammar masks of ``num_rows``
        rows (structured output); not called for steps without one."""


class _NoObserver:
    def on_output(self, output: RequestOutput, elapsed_s: float, gap_s: float | None) -> None:
        pass

    def on_abort(self, elapsed_s: float) -> None:
        pass

    def on_step(self, num_tokens: int) -> None:
        pass

    def on_mask(self, seconds: float, num_rows: int) -> None:
        pass


class _EngineLoop:
    """Runs ``engine.step()`` while there is work; takes adds and aborts through an inbox."""

    def __init__(self, engine: LLMEngine, publish) -> None:
        self.engine = engine
        self._publish = publish
        self.observer: GenerationObserver = _NoObserver()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="inferd-llm-engine", daemon=True)
        self.is_running = False
        self.error: BaseException | None = None

    def start(self) -> None:
        self.is_running = True
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._inbox.put(("stop",))
        self._thread.join(timeout)

    def send(self, *message) -> None:
        self._inbox.put(message)

    def _run(self) -> None:
        num_threads = self.engine.config.num_threads
        last_log = time.monotonic()
        try:
            while self._drain(block=not self.engine.has_work):
                # The step's tensor work runs on the process's one compute thread (see inferd.compute).
                outputs = compute.run(self.engine.step, num_threads=num_threads)
                if self.engine.num_step_tokens:
                    self.observer.on_step(self.engine.num_step_tokens)
                if self.engine.num_mask_rows:
                    self.observer.on_mask(self.engine.mask_seconds, self.engine.num_mask_rows)
                if outputs:
                    self._publish(outputs)
                if time.monotonic() - last_log >= _STATS_INTERVAL_S:
                    log.info("LLM engine: %s", self.engine.stats_line())
                    last_log = time.monotonic()
        except BaseException as exc:  # the loop itself broke: fail everyone, say so once
            log.exception("the LLM engine loop crashed")
            # Set before publishing: a request registered after the failure is published sees it.
            self.error = exc
            self.is_running = False
            self._publish(exc)
        finally:
            self.is_running = False

    def _drain(self, block: bool) -> bool:
        """Apply queued adds/aborts; False once asked to stop."""
        while True:
            try:
                message = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            kind = message[0]
            if kind == "stop":
                return False
            if kind == "add":
                self._add(*message[1:])
            elif kind == "abort":
                self.engine.abort(message[1])

    def _add(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, cache_salt: str | None
    ) -> None:
        try:
            self.engine.add_request(request_id, prompt_token_ids, params, cache_salt=cache_salt)
        except BaseException as exc:  # a request that cannot start fails alone, even on a panic
            if not is_request_error(exc):
                raise
            log.warning("request %s could not start: %s", request_id, exc)
            self._publish([self.engine.failed_output(request_id, prompt_token_ids, exc)])


class LLMClient:
    """Generation requests in, per-request async streams of RequestOutput deltas out."""

    def __init__(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._backend = _plain_backend(engine.tokenizer)
        # The wrapper's decode tidies spaces around punctuation for some tokenizers; the backend's does not.
        self._cleans_up = bool(getattr(engine.tokenizer, "clean_up_tokenization_spaces", False))
        self.max_model_len = engine.max_model_len
        self._loop = loop
        self._collectors: dict[str, asyncio.Queue] = {}
        self._engine_loop = _EngineLoop(engine, self._publish_threadsafe)

    @classmethod
    def start(cls, path: Path, config: LLMConfig, loop: asyncio.AbstractEventLoop) -> LLMClient:
        """Load the model and start the engine loop (blocking: call it off the event loop)."""
        engine = compute.run(load_engine, path, config, num_threads=config.num_threads)
        client = cls(engine, loop)
        client._engine_loop.start()
        return client

    def close(self) -> None:
        self._engine_loop.stop()

    def fail_all(self, error: BaseException) -> None:
        """End every request in flight with ``error`` (on the event loop): a forced unload."""
        for request_id in list(self._collectors):
            self._engine_loop.send("abort", request_id)
        self._dispatch(error)

    @property
    def is_running(self) -> bool:
        return self._engine_loop.is_running

    @property
    def has_failed(self) -> bool:
        """The engine loop crashed: this model cannot serve until the server restarts."""
        return self._engine_loop.error is not None

    def set_observer(self, observer: GenerationObserver) -> None:
        self._engine_loop.observer = observer

    def stats(self) -> EngineStats:
        """The engine's load now (read across threads without a lock: a snapshot, not a fact)."""
        kv = self.engine.kv_cache
        num_running = len(self.engine.scheduler.running)
        return EngineStats(
            num_running=num_running,
            num_waiting=max(0, len(self._collectors) - num_running),
            kv_cache_usage=kv.usage,
            num_prefix_queries=kv.num_prefix_queries,
            num_prefix_hits=kv.num_prefix_hits,
            block_size=kv.block_size,
            num_blocks=kv.pool.num_blocks,
            cache_dtype=self.engine.config.cache_dtype,
            enable_prefix_caching=kv.enable_prefix_caching,
            num_draft_tokens=self.engine.num_draft_tokens,
            num_accepted_tokens=self.engine.num_accepted_tokens,
        )

    def check_capacity(self, num_requests: int) -> None:
        """Raise OverloadedError when ``num_requests`` more would overflow the waiting queue."""
        config = self.engine.config
        limit = config.max_num_seqs + config.max_queued_requests
        if num_requests > limit:  # never fits, however long the client waits
            raise InvalidRequestError(
                f"the request needs {num_requests} sequences (prompts × n), more than this server "
                f"holds at once ({limit})",
                param="n",
            )
        if len(self._collectors) + num_requests > limit:
            waiting = max(0, len(self._collectors) - config.max_num_seqs)
            raise OverloadedError(
                f"the LLM queue is full ({waiting} requests waiting, limit {config.max_queued_requests}); "
                "retry later"
            )

    def render_chat(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        template_kwargs: dict | None = None,
    ) -> list[int]:
        """The prompt's token ids from the model's chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(
                "this model has no chat template; send a plain prompt to /v1/completions", param="messages"
            )
        from jinja2 import TemplateError

        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **(template_kwargs or {}),
            )
        except TemplateError as exc:
            raise InvalidRequestError(
                f"the chat template rejected the messages: {exc}", param="messages"
            ) from None
        return self.encode(text, add_special_tokens=False)

    @property
    def max_prompt_chars(self) -> int:
        """Most characters a prompt may have before it is tokenised: the setting, else
        ``_CHARS_PER_CONTEXT_TOKEN`` per token of the context."""
        return self.engine.config.max_prompt_chars or _CHARS_PER_CONTEXT_TOKEN * self.max_model_len

    def check_prompt_chars(self, num_chars: int, param: str = "prompt") -> None:
        """Refuse a prompt that is too long before any work is spent on it."""
        limit = self.max_prompt_chars
        if num_chars > limit:
            raise InvalidRequestError(
                f"the prompt has {num_chars} characters, more than this server's limit of {limit}",
                param=param,
            )

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        self.check_prompt_chars(len(text))
        if self._backend is not None:
            if len(text) < _INLINE_ENCODE_CHARS:
                return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
            # encode holds the GIL for the whole text (~1 s a MB here), stalling the event loop's
            # thread too; encode_batch releases it while the Rust side works.
            return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, token_ids: list[int]) -> str:
        """The text of ``token_ids``; an id outside the vocabulary is an InvalidRequestError."""
        self.engine.check_token_ids(token_ids, "tokens")
        if self._backend is not None and len(token_ids) >= _INLINE_DECODE_TOKENS and not self._cleans_up:
            return self._backend.decode_batch([token_ids], skip_special_tokens=False)[0]  # GIL released
        return self.tokenizer.decode(token_ids)

    def check_guide(self, guide: Guide) -> None:
        """Raise InvalidRequestError(param="response_format") for a grammar llguidance rejects.
        Blocking (the first call builds the grammar engine's view of the tokenizer, ~1 s on a 49k
        vocabulary): call it on a worker thread, before submitting."""
        self.engine.check_guide(guide)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise the typed error a request would fail with, before anything is streamed."""
        self.engine.check_prompt(prompt_token_ids, params)

    def submit(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        *,
        cache_salt: str | None = None,
    ) -> GenerationStream:
        """Hand the request to the engine now and return its stream of deltas. Submitting before
        the response starts lets the prefill run while the server writes headers and the first
        chunk. Closing the stream early (or dropping it) aborts the request. Requests share
        prefix-cache blocks only with requests of the same ``cache_salt`` (e.g. the API key's)."""
        if not self.is_running:
            raise EngineUnavailableError("the LLM engine is not running")
        self.check_request(prompt_token_ids, params)
        self.check_capacity(1)
        return self._send(prompt_token_ids, params, request_id, cache_salt)

    def _send(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None,
        cache_salt: str | None,
    ) -> GenerationStream:
        """Register a checked request's collector and hand the request to the engine loop."""
        request_id = request_id or f"req-{next(_ids)}"
        collector: asyncio.Queue = asyncio.Queue()
        self._collectors[request_id] = collector
        if self._engine_loop.error is not None:  # crashed since the check above
            collector.put_nowait(self._engine_loop.error)
        stream = GenerationStream(self, request_id, collector, self._engine_loop.observer)
        self._engine_loop.send("add", request_id, prompt_token_ids, params, cache_salt)
        return stream

    async def score(
        self, prompts: list[list[int]], token_ids: Sequence[int], *, cache_salt: str | None = None
    ) -> list[tuple[float, ...]]:
        """For each prompt, the log-probabilities of ``token_ids`` at its last position (log_softmax
        over the whole vocabulary, fp32), in prompt order; nothing is generated.

        Every prompt is one engine request, all submitted at once, so prompts that share a prefix
        (one query, many documents) reuse its KV blocks through the prefix cache. Each prompt is
        checked first and none is submitted unless all can run; a queue without room for all of
        them raises OverloadedError, as generation does. Cancelling the call aborts them all."""
        if not self.is_running:
            raise EngineUnavailableError("the LLM engine is not running")
        params = SamplingParams(score_token_ids=tuple(token_ids))

        def check() -> None:
            for prompt in prompts:
                self.check_request(prompt, params)

        if sum(map(len, prompts)) > _INLINE_CHECK_TOKENS:
            await asyncio.to_thread(check)
        else:
            check()
        self.check_capacity(len(prompts))
        streams = [self._send(prompt, params, None, cache_salt) for prompt in prompts]
        try:
            return [await _score_of(stream) for stream in streams]
        finally:
            for stream in streams:  # finished ones are closed already; the rest are aborted
                stream.close()

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        *,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Deltas until finished, submitted at the first iteration. Leaving the iteration early
        (disconnect) aborts the request."""
        stream = self.submit(prompt_token_ids, params, request_id, cache_salt=cache_salt)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def _publish_threadsafe(self, outputs) -> None:
        self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs) -> None:
        if isinstance(outputs, BaseException):
            for collector in self._collectors.values():
                collector.put_nowait(outputs)
            return
        limit = self.engine.config.max_buffered_outputs
        for output in outputs:
            collector = self._collectors.get(output.request_id)
            if collector is None:
                continue
            if collector.qsize() >= limit:
                self._cut_slow_reader(output.request_id, collector, limit)
            else:
                collector.put_nowait(output)

    def _cut_slow_reader(self, request_id: str, collector: asyncio.Queue, limit: int) -> None:
        """The request's client left ``limit`` outputs unread: abort the request (its KV blocks are
        freed) and leave only an error in its buffer, rather than let a client that never reads
        (2-3 KB a token with top logprobs) hold a buffer that grows while its socket lives."""
        log.warning("request %s: its client left %d outputs unread; aborting it", request_id, limit)
        del self._collectors[request_id]
        self._engine_loop.send("abort", request_id)
        while not collector.empty():
            collector.get_nowait()
        collector.put_nowait(
            SlowReaderError(
                f"the client fell behind: {limit} generated outputs were waiting unread, so the "
                "request was aborted; read the stream as it arrives"
            )
        )


class GenerationStream:
    """One submitted request's RequestOutput deltas, as an async iterator that ends with the
    finished one. ``close()`` before then aborts the request in the engine; so does dropping an
    unfinished stream, so that a response abandoned before it started streaming frees its blocks."""

    def __init__(self, client: LLMClient, request_id: str, collector: asyncio.Queue, observer) -> None:
        self.request_id = request_id
        self._client = client
        self._collector = collector
        self._observer = observer
        self._start = time.monotonic()
        self._last: float | None = None
        self._open = True  # registered with the client, not finished, not aborted

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if not self._open:
            raise StopAsyncIteration
        output = await self._collector.get()
        if isinstance(output, (SlowReaderError, EngineUnavailableError)):  # cut: slow client, or unloaded
            self.close()
            raise output
        if isinstance(output, BaseException):
            self.close()
            raise EngineError("the LLM engine crashed; the server needs a restart") from output
        now = time.monotonic()
        self._observer.on_output(output, now - self._start, None if self._last is None else now - self._last)
        self._last = now
        if output.error is not None:
            self.close()
            raise output.error
        if output.is_finished:
            self._open = False
            self._client._collectors.pop(self.request_id, None)
        return output

    def close(self) -> None:
        """Abort the request unless it has finished; safe to call more than once."""
        if not self._open:
            return
        self._open = False
        self._client._collectors.pop(self.request_id, None)
        self._observer.on_abort(time.monotonic() - self._start)
        self._client._engine_loop.send("abort", self.request_id)

    def __del__(self) -> None:
        self.close()


async def _score_of(stream: GenerationStream) -> tuple[float, ...]:
    async for output in stream:
        if output.finish_reason == SCORE and output.score_logprobs is not None:
            return output.score_logprobs
    raise EngineError(f"scoring request {stream.request_id} ended without a score")


def _plain_backend(tokenizer):
    """The fast tokenizer's own ``tokenizers.Tokenizer`` when calling it gives what the transformers
    wrapper gives (no truncation or padding configured in tokenizer.json), else None.

    The wrapper encodes even one text through ``encode_batch``, which hands the work to the
    tokenizers thread pool; while the compute thread's OpenMP workers hold both cores, that
    hand-off waited up to 5 ms on this project's 2-core machine (median 0.1 ms), on the request
    path before the prompt reaches the engine. ``encode`` runs on the calling thread."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    if backend.truncation is not None or backend.padding is not None:
        return None
    return backend

