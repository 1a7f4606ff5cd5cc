"""LLMRerankClient: a causal LM served as a reranker by the LLM engine, as Qwen3-Reranker is used.

The model reads one prompt per (query, document): a system line that allows only "yes" or "no",
the instruction, the query and the document in the user's turn, then the assistant's turn opened
with an empty think block. A document's score is the model's preference for "yes" over "no" as
the next token, ``exp(l_yes) / (exp(l_yes) + exp(l_no))`` from the logits at the prompt's last
position. The engine only prefills those prompts (``SamplingParams.score_token_ids``); the query
part comes first and is tokenised once, so every document of a request (and every request with
the same query) shares its KV blocks through the prefix cache.

The client offers the rerank routes what ``EncoderClient`` offers them (``rerank``, ``info``,
``can_embed``, ``is_running``, ``close``), with the same validation and errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from inferd.api.context import current_cache_salt
from inferd.config.engine import EncoderConfig, LLMConfig
from inferd.encoder.client import check_rerank_inputs
from inferd.encoder.params import RerankOutput, RerankParams
from inferd.errors import EngineUnavailableError, InputTooLongError, InvalidRequestError, ModelLoadError
from inferd.llm.client import GenerationObserver, LLMClient
from inferd.llm.outputs import EngineStats

Admit = Callable[[int], None]

# Qwen3-Reranker's prompt (its model card's format): the query part, then each document's part,
# then the suffix that opens the assistant's turn with an empty think block.
_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".'
)
_QUERY_PART = (
    "<|im_start|>system\n"
    + _SYSTEM
    + "<|im_end|>\n<|im_start|>user\n<Instruct>: {instruction}\n<Query>: {query}\n"
)
_DOCUMENT_MARKER = "<Document>:"
_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
ANSWER_TOKENS = ("yes", "no")
# Tokenising this many characters or more moves to a worker thread (as in EncoderClient).
_INLINE_TOKENIZE_CHARS = 16_384
_DEFAULT_LIMITS = EncoderConfig()


@dataclass(frozen=True, slots=True)
class LLMRerankInfo:
    """The facts the API reports of a reranker (EncoderInfo's fields), for an LLM reranker."""

    max_input_tokens: int
    scoring: Literal["llm"] = "llm"
    dimensions: int | None = None
    normalizes: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None


class LLMRerankClient:
    """Scores (query, document) pairs with a causal LM's "yes"/"no" logits through an LLMClient."""

    def __init__(
        self,
        llm: LLMClient,
        *,
        instruction: str = DEFAULT_INSTRUCTION,
        max_client_batch_size: int = _DEFAULT_LIMITS.max_client_batch_size,
        max_request_chars: int = _DEFAULT_LIMITS.max_request_chars,
    ) -> None:
        self.llm = llm
        self.instruction = instruction
        self._tokenizer = _own_tokenizer(llm.tokenizer)
        self.answer_ids = tuple(_single_token(self._tokenizer, word) for word in ANSWER_TOKENS)
        try:
            llm.engine.check_token_ids(self.answer_ids, "score_token_ids")
        except InvalidRequestError as exc:
            raise ModelLoadError(f"this model cannot serve as an LLM reranker: {exc.message}") from None
        self._suffix_ids = self._encode(_SUFFIX)
        self._num_marker_tokens = len(self._encode(_DOCUMENT_MARKER))
        config = llm.engine.config
        # Every document is one engine request: a request never holds more than the queue can.
        self._max_documents = min(max_client_batch_size, config.max_num_seqs + config.max_queued_requests)
        self._max_request_chars = max_request_chars
        self.info = LLMRerankInfo(max_input_tokens=llm.max_model_len)

    @property
    def can_embed(self) -> bool:
        return False

    @property
    def is_running(self) -> bool:
        return self.llm.is_running

    @property
    def has_failed(self) -> bool:
        return self.llm.has_failed

    def close(self) -> None:
        self.llm.close()

    def stats(self) -> EngineStats:
        return self.llm.stats()

    def set_observer(self, observer: GenerationObserver) -> None:
        self.llm.set_observer(observer)

    def fail_all(self, error: BaseException) -> None:
        self.llm.fail_all(error)

    async def rerank(
        self,
        query: str,
        documents: list[str],
        params: RerankParams,
        param: str = "documents",
        admit: Admit | None = None,
    ) -> RerankOutput:
        """One relevance score per document, in document order: P("yes"), or with ``raw_scores``
        the logit difference l_yes - l_no. ``param`` names the documents' field in errors
        (``texts`` for TEI); ``admit`` is told the token count before anything is queued."""
        if not self.llm.is_running:
            raise EngineUnavailableError("the LLM engine is not running")
        size = check_rerank_inputs(
            query, documents, param, max_documents=self._max_documents, max_chars=self._max_request_chars
        )
        work = lambda: self.prepare_prompts(query, documents, params, param)  # noqa: E731
        prompts = work() if size < _INLINE_TOKENIZE_CHARS else await asyncio.to_thread(work)
        num_tokens = sum(map(len, prompts))
        if admit is not None:
            admit(num_tokens)
        logprobs = await self.llm.score(prompts, self.answer_ids, cache_salt=current_cache_salt())
        # log_softmax shifts both logits alike: the difference of the log-probabilities is l_yes - l_no.
        margin = np.array([yes - no for yes, no in logprobs], dtype=np.float64)
        scores = margin if params.raw_scores else np.exp(-np.logaddexp(0.0, -margin))  # a stable sigmoid
        return RerankOutput(scores.astype(np.float32), num_tokens)

    def prepare_prompts(
        self, query: str, documents: list[str], params: RerankParams, param: str = "documents"
    ) -> list[list[int]]:
        """Each document's prompt ids: the query part's ids (tokenised once), the document's, the
        suffix's. Raises InputTooLongError for a prompt past the model's context unless
        ``params.truncate``, which cuts the document's text (never the query or the template)."""
        query_ids = self._encode(_QUERY_PART.format(instruction=self.instruction, query=query))
        room = self.info.max_input_tokens - len(query_ids) - len(self._suffix_ids)
        if room <= self._num_marker_tokens:
            length = len(query_ids) + self._num_marker_tokens + 1 + len(self._suffix_ids)
            raise InputTooLongError(
                f"query has {len(query_ids)} tokens with the prompt template, which leaves no room for a "
                f"document within this model's limit of {self.info.max_input_tokens}; shorten it",
                limit=self.info.max_input_tokens,
                length=length,
                param="query",
            )
        texts = [f"{_DOCUMENT_MARKER} {document}" for document in documents]
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        prompts = []
        for i, encoding in enumerate(encodings):
            document_ids = self._fit(encoding, room, params, len(query_ids), f"{param}[{i}]", param)
            prompts.append(query_ids + document_ids + self._suffix_ids)
        return prompts

    def _fit(
        self, encoding, room: int, params: RerankParams, num_query: int, where: str, param: str
    ) -> list[int]:
        """A document part's ids within ``room`` tokens: the marker's tokens, then as much of the
        document's own as ``max_tokens_per_doc`` and ``truncate`` allow."""
        marker_end = len(_DOCUMENT_MARKER)
        # Tokens that end inside the marker are the marker's; the rest are the document's text.
        num_marker = next(
            (k for k, (_, end) in enumerate(encoding.offsets) if end > marker_end), len(encoding.ids)
        )
        marker, text = encoding.ids[:num_marker], encoding.ids[num_marker:]
        if params.max_tokens_per_doc is not None:
            text = text[: params.max_tokens_per_doc]
        room -= len(marker)
        if len(text) > room:
            if not params.truncate:
                length = num_query + len(marker) + len(text) + len(self._suffix_ids)
                raise InputTooLongError(
                    f"{where} has {length} tokens with the query and the prompt template, more than "
                    f"this model's limit of {self.info.max_input_tokens}; shorten it or set truncate to true",
                    limit=self.info.max_input_tokens,
                    length=length,
                    param=param,
                )
            text = text[:room] if params.truncation_side == "right" else text[len(text) - room :]
        return marker + text

    def _encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids


def start_llm_reranker(
    path: Path,
    llm_config: LLMConfig,
    loop: asyncio.AbstractEventLoop,
    *,
    limits: EncoderConfig | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
) -> LLMRerankClient:
    """Load the causal LM at ``path`` on the LLM engine and serve it as a reranker (blocking: call
    it off the event loop). ``limits`` gives the rerank caps (documents per request, characters);
    None keeps EncoderConfig's defaults. Raises ModelLoadError for a model whose tokenizer does not
    spell "yes" and "no" as one token each."""
    llm = LLMClient.start(path, llm_config, loop)
    limits = limits or _DEFAULT_LIMITS
    try:
        return LLMRerankClient(
            llm,
            instruction=instruction,
            max_client_batch_size=limits.max_client_batch_size,
            max_request_chars=limits.max_request_chars,
        )
    except BaseException:
        llm.close()
        raise


def _own_tokenizer(tokenizer):
    """A copy of the model's fast tokenizer for this client alone, never truncating or padding: the
    generation path shares the original, and reconfiguring a shared one races with its encodes."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelLoadError("an LLM reranker needs a fast tokenizer (tokenizer.json)")
    own = Tokenizer.from_str(backend.to_str())
    own.no_truncation()
    own.no_padding()
    return own


def _single_token(tokenizer, word: str) -> int:
    token_id = tokenizer.token_to_id(word)
    ids = tokenizer.encode(word, add_special_tokens=False).ids
    if token_id is None or ids != [token_id]:
        raise ModelLoadError(
            f"this model cannot serve as an LLM reranker: its tokenizer does not spell {word!r} as one "
            f"token (it encodes as {ids}), and the score is read from the logits of the tokens "
            f"{' and '.join(repr(w) for w in ANSWER_TOKENS)}"
        )
    return token_id
