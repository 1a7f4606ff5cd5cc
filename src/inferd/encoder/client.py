"""EncoderClient: the async interface the API layer uses for one encoder model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from inferd.compute import compute
from inferd.config.engine import EncoderConfig
from inferd.config.model_spec import ModelKind
from inferd.encoder.engine import BatchObserver, EncoderEngine
from inferd.encoder.models.base import EncoderInfo
from inferd.encoder.models.registry import load_encoder_model
from inferd.encoder.params import EmbedOutput, EmbedParams, RerankOutput, RerankParams
from inferd.encoder.quantize import quantize
from inferd.encoder.request import EncodeRequest, Item
from inferd.encoder.tokenize import Encoded
from inferd.errors import EngineUnavailableError, InvalidRequestError

T = TypeVar("T")

# Told a request's token count before it is queued; raises to refuse it.
Admit = Callable[[int], None]
# Tokenising this many characters or more moves to a worker thread, off the event loop; less takes
# well under a millisecond, cheaper inline than the hand-off.
_INLINE_TOKENIZE_CHARS = 16_384


class EncoderObserver(BatchObserver, Protocol):
    """Told about each request's phases (on the event loop) and each batch (on the model thread)."""

    def on_tokenize(self, duration_s: float) -> None: ...

    def on_request(self, num_tokens: int, queue_s: float, inference_s: float) -> None:
        """A request's items all came back: ``queue_s`` until the model began its first batch,
        ``inference_s`` from then until its last row."""


class _NoObserver:
    def on_tokenize(self, duration_s: float) -> None:
        pass

    def on_request(self, num_tokens: int, queue_s: float, inference_s: float) -> None:
        pass

    def on_batch(self, num_items: int, num_tokens: int, duration_s: float) -> None:
        pass


class EncoderClient:
    """Validates, tokenises and queues requests for one model, then post-processes its outputs."""

    def __init__(self, engine: EncoderEngine) -> None:
        self._engine = engine
        self._tokenizer = engine.model.tokenizer
        self.info: EncoderInfo = engine.model.info
        self.config: EncoderConfig = engine.config
        self._observer: EncoderObserver = _NoObserver()

    @classmethod
    def start(cls, path: Path, files_kind: ModelKind, config: EncoderConfig) -> EncoderClient:
        """Load the model at ``path`` and start its engine (blocking: call it off the event loop)."""
        model = compute.run(load_encoder_model, path, files_kind, config, num_threads=config.num_threads)
        engine = EncoderEngine(model, config)
        engine.start()
        return cls(engine)

    def close(self) -> None:
        self._engine.stop()

    @property
    def can_embed(self) -> bool:
        return self.info.dimensions is not None

    @property
    def is_running(self) -> bool:
        return self._engine.is_running

    @property
    def has_failed(self) -> bool:
        """An engine thread crashed: this model cannot serve until the server restarts."""
        return self._engine.error is not None

    @property
    def num_queued(self) -> int:
        return len(self._engine.queue)

    def set_observer(self, observer: EncoderObserver) -> None:
        self._observer = observer
        self._engine.observer = observer

    async def embed(
        self, inputs: list[str] | list[list[int]], params: EmbedParams, admit: Admit | None = None
    ) -> EmbedOutput:
        """Embeddings of ``inputs`` (texts, or token-id lists used as the whole model input).
        ``admit`` is told the request's token count once it is known, before anything is queued,
        and may refuse it by raising (a tokens-per-minute budget)."""
        self._check_count(inputs, "input")
        self._check_dimensions(params.dimensions)
        if inputs and isinstance(inputs[0], str):
            texts = _non_empty(inputs, "input")
            prefix = self._prompt(params)
            # Counted before the prompt is prepended: a long prompt × many inputs is never built.
            size = len(prefix) * len(texts) + sum(map(len, texts))
            self._check_chars(size, "input")
            encoded = await self._off_loop(size, lambda: self._encode_texts(texts, prefix, params))
        else:
            encoded = self._tokenizer.check_token_ids(
                inputs, truncate=params.truncate, side=params.truncation_side
            )
        vectors = await self._run(encoded, admit)
        vectors = self._finish(vectors, params)
        return EmbedOutput(quantize(vectors, params.embedding_type), _num_tokens(encoded))

    def _encode_texts(self, texts: list[str], prefix: str, params: EmbedParams) -> list[Encoded]:
        texts = [prefix + t for t in texts] if prefix else texts
        return self._tokenizer.encode_texts(texts, truncate=params.truncate, side=params.truncation_side)

    async def rerank(
        self,
        query: str,
        documents: list[str],
        params: RerankParams,
        param: str = "documents",
        admit: Admit | None = None,
    ) -> RerankOutput:
        """One relevance score per document, in document order; ``param`` names the documents'
        field in errors (``texts`` for TEI); ``admit`` as in ``embed``."""
        config = self.config
        size = check_rerank_inputs(
            query,
            documents,
            param,
            max_documents=config.max_client_batch_size,
            max_chars=config.max_request_chars,
        )
        if self.info.scoring == "cross-encoder":
            encoded = await self._off_loop(size, lambda: self._encode_pairs(query, documents, params, param))
            logits = await self._run(encoded, admit)
            scores = logits if params.raw_scores else 1.0 / (1.0 + np.exp(-logits))
        else:
            encoded = await self._off_loop(
                size, lambda: self._encode_query_and_documents(query, documents, params, param)
            )
            vectors = _unit(await self._run(encoded, admit))
            scores = vectors[1:] @ vectors[0]
        return RerankOutput(scores.astype(np.float32), _num_tokens(encoded))

    def _encode_pairs(
        self, query: str, documents: list[str], params: RerankParams, param: str
    ) -> list[Encoded]:
        documents = self._cut_documents(documents, params)
        return self._tokenizer.encode_pairs(
            query, documents, truncate=params.truncate, side=params.truncation_side, param=param
        )

    def _cut_documents(self, documents: list[str], params: RerankParams) -> list[str]:
        if params.max_tokens_per_doc is None:
            return documents
        return self._tokenizer.truncate_texts(documents, params.max_tokens_per_doc)

    def _encode_query_and_documents(
        self, query: str, documents: list[str], params: RerankParams, param: str
    ) -> list[Encoded]:
        side = params.truncation_side
        documents = self._cut_documents(documents, params)
        query_ids = self._tokenizer.encode_texts([query], truncate=params.truncate, side=side, param="query")
        return query_ids + self._tokenizer.encode_texts(
            documents, truncate=params.truncate, side=side, param=param
        )

    async def _run(self, encoded: list[Encoded], admit: Admit | None = None) -> np.ndarray:
        if self._engine.error is not None:
            raise EngineUnavailableError("the encoder engine has crashed; the server needs a restart")
        if admit is not None:
            admit(_num_tokens(encoded))
        request = EncodeRequest(asyncio.get_running_loop(), len(encoded))
        items = [Item(request, i, e.input_ids, e.token_type_ids) for i, e in enumerate(encoded)]
        submitted = time.monotonic()
        self._engine.submit(items)
        try:
            result = await request.future
        except asyncio.CancelledError:
            # The client went away: the queue drops these items before they reach the model.
            request.is_cancelled = True
            raise
        started = request.started_at or submitted
        self._observer.on_request(_num_tokens(encoded), started - submitted, time.monotonic() - started)
        return result

    async def _off_loop(self, size: int, work: Callable[[], T]) -> T:
        """Tokenise (``work``, ``size`` characters), on a worker thread when the input is large."""
        start = time.monotonic()
        result = work() if size < _INLINE_TOKENIZE_CHARS else await asyncio.to_thread(work)
        self._observer.on_tokenize(time.monotonic() - start)
        return result

    def _check_chars(self, num_chars: int, param: str) -> None:
        check_chars(num_chars, param, self.config.max_request_chars)

    def _finish(self, vectors: np.ndarray, params: EmbedParams) -> np.ndarray:
        if params.dimensions is not None:
            # A copy: a column slice is not contiguous, and orjson writes only contiguous arrays.
            vectors = np.ascontiguousarray(vectors[:, : params.dimensions])
        normalize = self.info.normalizes if params.normalize is None else params.normalize
        return _unit(vectors) if normalize else vectors

    def _prompt(self, params: EmbedParams) -> str:
        if params.prompt is not None:
            return params.prompt
        name = params.prompt_name or self.info.default_prompt_name
        if name is None:
            return ""
        if name not in self.info.prompts:
            known = ", ".join(sorted(self.info.prompts)) or "none"
            raise InvalidRequestError(
                f"prompt_name {name!r} is not one of this model's prompts ({known})", param="prompt_name"
            )
        return self.info.prompts[name]

    def _check_count(self, inputs: list, param: str) -> None:
        check_count(inputs, param, self.config.max_client_batch_size)

    def _check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is not None and dimensions > (self.info.dimensions or 0):
            raise InvalidRequestError(
                f"dimensions {dimensions} is larger than this model's {self.info.dimensions}",
                param="dimensions",
            )


def check_rerank_inputs(
    query: str, documents: list[str], param: str, *, max_documents: int, max_chars: int
) -> int:
    """What every reranker refuses before any work (an empty query, no or too many documents, an
    empty one, too much text); returns the characters to tokenise, the query counted once per
    document as a cross-encoder reads it."""
    if not query:
        raise InvalidRequestError("query must be a non-empty string", param="query")
    check_count(documents, param, max_documents)
    _non_empty(documents, param)
    size = len(query) * len(documents) + sum(map(len, documents))
    check_chars(size, param, max_chars)
    return size


def check_count(inputs: list, param: str, limit: int) -> None:
    if not inputs:
        raise InvalidRequestError(f"{param} must not be empty", param=param)
    if len(inputs) > limit:
        raise InvalidRequestError(
            f"{param} has {len(inputs)} items, more than the limit of {limit} per request", param=param
        )


def check_chars(num_chars: int, param: str, limit: int) -> None:
    if num_chars > limit:
        raise InvalidRequestError(
            f"the request has {num_chars} characters to tokenise (prompt and query counted once "
            f"per input), more than this server's limit of {limit}",
            param=param,
        )


def _non_empty(texts: list[str], param: str) -> list[str]:
    for i, text in enumerate(texts):
        if not text:
            raise InvalidRequestError(f"{param}[{i}] is an empty string", param=param)
    return texts


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def _num_tokens(encoded: list[Encoded]) -> int:
    return sum(len(e.input_ids) for e in encoded)
