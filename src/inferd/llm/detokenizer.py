"""Streaming detokenization: generated token ids in, final text deltas out, stop strings cut.

The byte- and space-level work is the tokenizers library's own incremental decoder
(``tokenizers.decoders.DecodeStream``): it holds a token back while its bytes end inside a UTF-8
character and otherwise returns the text a token adds in context (SentencePiece "▁" and byte-level
"Ġ" included). This module adds what the stream does not know about: prompt context, stop strings,
and emitting what is still held at the end.
"""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from inferd.llm.params import SamplingParams

# Prompt tokens replayed into the stream (their text discarded) so the first output token decodes as
# it does after the prompt: a SentencePiece decoder drops the space of a sequence's first "▁", and a
# token-id prompt may end inside a multi-byte character. A few tokens cover both.
_NUM_CONTEXT_TOKENS = 5

# tokenizers raises a bare Exception whose message starts like this when a decoder rewrites text it
# already produced for earlier tokens, so the stream cannot express the change as an appended delta.
_INVALID_PREFIX = "Invalid prefix encountered"


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas for streaming.

    ``push`` returns the text a token made final; text that may be the start of a stop string is held
    back until the stop completes (then ``stopped_on`` is set, and the stop string and anything after
    it are dropped unless ``include_stop_str_in_output``) or is ruled out. ``flush`` returns what is
    still held when generation ends for another reason.

    With an empty prompt the deltas concatenate to ``tokenizer.decode(output_ids)``. With a prompt,
    they concatenate to the text the output adds after the prompt, as vLLM and OpenAI report it: a
    SentencePiece model's first output token "▁Paris" streams as " Paris", where decoding the output
    ids alone would give "Paris".
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        assert all(params.stop), "empty stop strings are rejected at the API"
        self._backend = _backend_tokenizer(tokenizer)
        self._skip_special_tokens = params.skip_special_tokens
        self._stop = params.stop
        self._include_stop = params.include_stop_str_in_output
        self._stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        self._ids: list[int] = []  # context tokens, then output tokens
        self._num_decoded = 0  # how many of _ids the stream has turned into text
        self._pending = ""  # decoded output text not yet returned (held back for stop strings)
        self._chunks: list[str] = []  # text returned so far
        self.stopped_on: str | None = None
        for token_id in prompt_token_ids[-_NUM_CONTEXT_TOKENS:]:
            self._step(token_id)
        self._num_context = len(self._ids)

    @property
    def text(self) -> str:
        """All output text returned so far (held-back text excluded)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it made final ('' when none)."""
        assert self.stopped_on is None, "the engine stops pushing once a stop string matched"
        piece = self._step(token_id)
        return "" if piece is None else self._release(piece, is_final=False)

    def flush(self) -> str:
        """At finish: the held-back text, plus any bytes the stream still held (as U+FFFD, the way a
        full decode shows an unfinished character)."""
        if self.stopped_on is not None:
            return ""
        return self._release(self._decode_undecoded(), is_final=True)

    def _step(self, token_id: int) -> str | None:
        self._ids.append(token_id)
        try:
            piece = self._stream.step(self._backend, token_id)
        except Exception as error:
            if _INVALID_PREFIX not in str(error):
                raise
            # Text already sent cannot be taken back: restart the stream at this token.
            self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
            piece = self._stream.step(self._backend, token_id)
        if piece is not None:
            self._num_decoded = len(self._ids)
        return piece

    def _decode_undecoded(self) -> str:
        """Text of the tokens the stream is still holding, decoded after their last decoded token."""
        if self._num_decoded == len(self._ids) or self._num_context == len(self._ids):
            return ""
        anchor = max(0, self._num_decoded - 1)
        head = self._decode(self._ids[anchor : self._num_decoded])
        whole = self._decode(self._ids[anchor:])
        if whole.startswith(head):
            return whole[len(head) :]
        return self._decode(self._ids[self._num_decoded :])

    def _decode(self, token_ids: list[int]) -> str:
        return self._backend.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _release(self, piece: str, is_final: bool) -> str:
        """Add decoded text; return the part that is final now, cutting at a completed stop string."""
        self._pending += piece
        match = _find_stop(self._pending, self._stop)
        if match is not None:
            start, stop = match
            self.stopped_on = stop
            end = start + len(stop) if self._include_stop else start
            return self._emit(end, drop_rest=True)
        held = 0 if is_final else _partial_stop_length(self._pending, self._stop)
        return self._emit(len(self._pending) - held, drop_rest=False)

    def _emit(self, end: int, drop_rest: bool) -> str:
        delta = self._pending[:end]
        self._pending = "" if drop_rest else self._pending[end:]
        if delta:
            self._chunks.append(delta)
        return delta


def _backend_tokenizer(tokenizer: Any) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer (or the tokenizer itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not isinstance(backend, Tokenizer):
        raise TypeError(
            f"streaming needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}"
        )
    return backend


def _find_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """The stop string that text completes first (earliest end; at equal ends, the earliest start),
    so the cut does not depend on how the text was split into tokens."""
    best: tuple[int, int, str] | None = None
    for stop in stops:
        start = text.find(stop)
        if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
            best = (start + len(stop), start, stop)
    return None if best is None else (best[1], best[2])


def _partial_stop_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of text that is a proper beginning of some stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
