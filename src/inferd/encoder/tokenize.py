"""Tokenisation before queueing: lengths are known, and checked against the limit, up front."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from inferd.encoder.params import TruncationSide
from inferd.errors import InputTooLongError, InvalidRequestError

# transformers warns about every over-long input; we report those to the client instead.
logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)


@dataclass(frozen=True, slots=True)
class Encoded:
    input_ids: list[int]
    token_type_ids: list[int] | None = None


class InputTokenizer:
    """Turns texts, pairs and raw token ids into model inputs that respect ``max_input_tokens``."""

    def __init__(self, path: Path, max_input_tokens: int, *, do_lower_case: bool = False) -> None:
        from transformers import AutoTokenizer

        self.max_input_tokens = max_input_tokens
        self.do_lower_case = do_lower_case
        # Hugging Face tokenizers re-configure their Rust backend whenever a call's truncation
        # differs from the last one, and that races with encodes on other threads ("Already
        # borrowed"). So each instance keeps one configuration for life: one never truncates, one
        # truncates on each side. Each is configured here, before any request can share it.
        self._tokenizer = AutoTokenizer.from_pretrained(str(path))
        self._tokenizer("warm-up", truncation=False)
        self._by_side = {}
        for side in ("right", "left"):
            tokenizer = AutoTokenizer.from_pretrained(str(path), truncation_side=side)
            tokenizer("warm-up", truncation=True, max_length=max_input_tokens)
            self._by_side[side] = tokenizer
        self.vocab_size = len(self._tokenizer)
        self._uses_types = "token_type_ids" in self._tokenizer.model_input_names
        self.pad_token_id = self._tokenizer.pad_token_id or 0

    def encode_texts(
        self, texts: list[str], *, truncate: bool, side: TruncationSide, param: str = "input"
    ) -> list[Encoded]:
        texts = [t.lower() for t in texts] if self.do_lower_case else texts
        encodings = self._tokenizer(texts, truncation=False, return_attention_mask=False)
        return self._fit(encodings, texts, truncate=truncate, side=side, param=param)

    def encode_pairs(
        self, query: str, docs: list[str], *, truncate: bool, side: TruncationSide, param: str = "documents"
    ) -> list[Encoded]:
        """(query, document) pairs as the tokenizer would make them, with the query tokenised once:
        the pair template (special tokens, type ids) is applied to the query's and each document's
        own encodings. Only pairs over the limit go through the tokenizer's pair truncation."""
        query = query.lower() if self.do_lower_case else query
        docs = [d.lower() for d in docs] if self.do_lower_case else docs
        backend = self._tokenizer.backend_tokenizer
        # encode_batch, not encode: it releases the GIL while it works (the query may be long).
        (query_encoding,) = backend.encode_batch([query], add_special_tokens=False)
        num_special = backend.num_special_tokens_to_add(True)
        room = self.max_input_tokens - num_special
        if len(query_encoding.ids) > room and not truncate:
            raise self._too_long(len(query_encoding.ids) + num_special, 0, "query")
        doc_encodings = backend.encode_batch(docs, add_special_tokens=False)
        long = [i for i, doc in enumerate(doc_encodings) if len(query_encoding.ids) + len(doc.ids) > room]
        if long and not truncate:
            length = len(query_encoding.ids) + len(doc_encodings[long[0]].ids) + num_special
            raise self._too_long(length, long[0], param)
        pairs = [backend.post_process(query_encoding, doc, add_special_tokens=True) for doc in doc_encodings]
        out = [Encoded(p.ids, p.type_ids if self._uses_types else None) for p in pairs]
        if long:
            self._truncate_pairs(out, query, docs, long, side)
        return out

    def _truncate_pairs(
        self, out: list[Encoded], query: str, docs: list[str], long: list[int], side: TruncationSide
    ) -> None:
        """Replace the over-long pairs ``long`` of ``out`` by the tokenizer's own pair truncation."""
        cut = self._by_side[side](
            [query] * len(long),
            [docs[i] for i in long],
            truncation=True,
            max_length=self.max_input_tokens,
            return_attention_mask=False,
        )
        types = cut.get("token_type_ids")
        for j, i in enumerate(long):
            out[i] = Encoded(cut["input_ids"][j], types[j] if types is not None else None)

    def check_token_ids(
        self, ids_lists: list[list[int]], *, truncate: bool, side: TruncationSide, param: str = "input"
    ) -> list[Encoded]:
        """Raw token ids are the model's whole input, used as given (no special tokens added)."""
        out = []
        for i, ids in enumerate(ids_lists):
            if not ids:
                raise InvalidRequestError(f"{param}[{i}] is an empty token list", param=param)
            bad = next((t for t in ids if t < 0 or t >= self.vocab_size), None)
            if bad is not None:
                raise InvalidRequestError(
                    f"token id {bad} in {param}[{i}] is outside the vocabulary (0..{self.vocab_size - 1})",
                    param=param,
                )
            if len(ids) > self.max_input_tokens:
                if not truncate:
                    raise self._too_long(len(ids), i, param)
                ids = ids[: self.max_input_tokens] if side == "right" else ids[-self.max_input_tokens :]
            out.append(Encoded(list(ids)))
        return out

    def truncate_texts(self, texts: list[str], max_tokens: int) -> list[str]:
        """Each text cut after its first ``max_tokens`` tokens (no special tokens counted), in one
        batch call."""
        encodings = self._tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        return [
            text if len(e.offsets) <= max_tokens else text[: e.offsets[max_tokens - 1][1]]
            for text, e in zip(texts, encodings)
        ]

    def _fit(self, encodings, *texts: list[str], truncate: bool, side: TruncationSide, param: str):
        ids_lists = encodings["input_ids"]
        types = encodings.get("token_type_ids")
        long = [i for i, ids in enumerate(ids_lists) if len(ids) > self.max_input_tokens]
        if long and not truncate:
            raise self._too_long(len(ids_lists[long[0]]), long[0], param)
        if long:
            redo = self._by_side[side](
                *[[t[i] for i in long] for t in texts],
                truncation=True,
                max_length=self.max_input_tokens,
                return_attention_mask=False,
            )
            for j, i in enumerate(long):
                ids_lists[i] = redo["input_ids"][j]
                if types is not None:
                    types[i] = redo["token_type_ids"][j]
        return [Encoded(ids, types[i] if types is not None else None) for i, ids in enumerate(ids_lists)]

    def _too_long(self, length: int, index: int, param: str) -> InputTooLongError:
        where = param if param == "query" else f"{param}[{index}]"
        return InputTooLongError(
            f"{where} has {length} tokens, more than this model's limit of "
            f"{self.max_input_tokens}; shorten it or set truncate to true",
            limit=self.max_input_tokens,
            length=length,
            param=param,
        )
