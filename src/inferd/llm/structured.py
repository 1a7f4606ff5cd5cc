"""Grammar-constrained decoding through llguidance: one matcher per guided request, and each step
the bitmask of the tokens its grammar allows next.

llguidance (github.com/guidance-ai/llguidance) compiles JSON schemas, Lark grammars and regexes
against the model's tokenizer in a few milliseconds, so a new schema with every request costs
nothing worth caching. Its view of the tokenizer costs about a second to build on a 49k vocabulary:
it is built on the first guided request, never at model load.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from inferd.errors import InvalidRequestError
from inferd.llm.params import Guide
from inferd.llm.sampler import AllowedTokens, SamplingState

# llguidance's error texts end with an excerpt of the grammar and caret lines under it, made for a
# terminal; after a regex or a JSON schema is wrapped into a grammar they quote text the client
# never wrote, so the client's message keeps only the lines before them.
_EXCERPT_LINE = re.compile(r"^\s*\d+ \| ")
_CARET_LINE = re.compile(r"^\s*\^+\s*$")
_MAX_MESSAGE_CHARS = 600
# Compiled grammars kept between the API's check and the engine's start (a few MB each at most).
_READY_GRAMMARS = 32


@dataclass(slots=True)
class GuideState:
    """One request's grammar: its matcher, fed only the tokens after the start marker."""

    matcher: object  # llguidance.LLMatcher
    start_after: list[int]
    is_active: bool  # the marker has appeared (or there is none): the grammar applies
    param: str  # the request field the grammar came from

    def advance(self, output_token_ids: list[int]) -> bool:
        """Take the output's newest token; True once the grammar is complete (nothing but EOS may
        follow), which finishes the request. A matcher that fails raises InvalidRequestError."""
        if not self.is_active:
            # The marker's own tokens are free text; the grammar starts with the next token.
            self.is_active = output_token_ids[-len(self.start_after) :] == self.start_after
            return False
        token_id = output_token_ids[-1]
        # A matcher already in error (a limit hit while computing a mask) allows EOS and even
        # takes it: is_error, not consume_token's answer, tells that the output is not the grammar's.
        # Every failure seen is the grammar's (one that allows nothing more, as a schema that only
        # refers to itself; one past llguidance's limits, as a regex "a{300000}"): the client's error.
        if not self.matcher.consume_token(token_id) or self.matcher.is_error():
            raise InvalidRequestError(
                f"the output cannot follow the grammar (at output token {len(output_token_ids)}): "
                f"{_first_line(self.matcher.get_error())}",
                param=self.param,
            )
        return self.matcher.is_stopped()


class GuideManager:
    """A model's grammar machinery: validation, a matcher per guided request, and the masks.

    Thread-safe where it must be: ``check`` runs on the API's worker threads, everything else on
    the engine's threads."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        # llguidance allows every id it is given as EOS wherever the grammar may end, and none of
        # them elsewhere; ids past the vocabulary (a config that disagrees with the weights) never are.
        self.eos_token_ids = sorted(t for t in eos_token_ids if 0 <= t < vocab_size)
        self._lock = threading.Lock()
        self._ll_tokenizer = None
        self._executor = None  # llguidance.LLExecutor, built with the tokenizer
        # Grammars compiled by ``check`` for the requests about to be added (most recent last).
        self._ready: OrderedDict[str, object] = OrderedDict()
        self._ready_lock = threading.Lock()
        self._no_eos_row: np.ndarray | None = None  # the mask of a guide before its start marker

    def check(self, guide: Guide) -> None:
        """Raise InvalidRequestError(param=guide.param) for a grammar llguidance rejects, or one
        that allows no output at all.

        The grammar is compiled here, on the API's worker thread, and kept for ``start``: compiling
        grows with the schema (~17 ms for a 39 KB schema, ~0.2 s at the 64K cap on this project's
        AVX2 EPYC), and on the engine thread it would stall every running stream for that long. Its
        first mask is computed here too: a grammar that cannot begin (``{"$ref": "#"}``) is refused
        before it is queued, and the copies ``start`` makes reuse the lexer states it built (the
        first mask of the regex "a{1000000}": 0.4 s here, then 0.08 s on the engine thread, on this
        project's EPYC)."""
        matcher = self._compile(guide)
        matcher.compute_bitmask()
        if matcher.is_error():
            raise InvalidRequestError(
                f"the grammar allows no output: {_first_line(matcher.get_error())}", param=guide.param
            )
        with self._ready_lock:
            self._ready[guide.grammar] = matcher
            self._ready.move_to_end(guide.grammar)
            while len(self._ready) > _READY_GRAMMARS:
                self._ready.popitem(last=False)

    def start(self, guide: Guide) -> GuideState:
        """A fresh matcher for one request; InvalidRequestError when its grammar does not compile.
        A grammar ``check`` compiled is copied (microseconds: the n choices of a request share one
        compilation); any other compiles here."""
        with self._ready_lock:
            compiled = self._ready.get(guide.grammar)
        matcher = compiled.deep_copy() if compiled is not None else self._compile(guide)
        return GuideState(matcher, list(guide.start_after), not guide.start_after, guide.param)

    def _compile(self, guide: Guide):
        from llguidance import LLMatcher

        matcher = LLMatcher(self._tokenizer(), guide.grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(
                f"invalid grammar: {readable_error(matcher.get_error())}", param=guide.param
            )
        return matcher

    def prepare_masks(self, rows: list[tuple[int, GuideState, SamplingState]]) -> AllowedTokens:
        """The tokens each of ``rows`` ((row in the batch, guide, sampler state)) may take next.
        Matchers are only read, so a failed step may run again. A guide still waiting for its
        start marker allows anything but EOS: a reply that ended inside the reasoning would end
        without the grammar's output, so it reaches the marker or max_tokens.

        llguidance's executor fills the rows in parallel where there are cores to spare. Filling
        them on a thread of their own while the forward runs was measured on a 2-core EPYC (AVX2)
        with SmolLM2: no gain within the noise (a mask takes ~0.2 ms a row, a decode step of 1-8
        streams 75-250 ms, and the forward already holds both cores), so it runs in line."""
        from llguidance.numpy import fill_next_token_bitmask_par

        bitmask = np.empty((len(rows), (self.vocab_size + 31) // 32), dtype=np.int32)
        active = [(guide.matcher, i) for i, (_, guide, _) in enumerate(rows) if guide.is_active]
        if active:
            fill_next_token_bitmask_par(self._executor, active, bitmask)
        for i, (_, guide, state) in enumerate(rows):
            if not guide.is_active:
                bitmask[i] = self._all_but_eos()
            self._block_stops(bitmask[i].view(np.uint32), state)
        return AllowedTokens([row for row, _, _ in rows], bitmask)

    def _all_but_eos(self) -> np.ndarray:
        """The mask row that allows every token of the vocabulary but EOS (built once)."""
        if self._no_eos_row is None:
            bits = np.zeros((self.vocab_size + 31) // 32 * 32, dtype=bool)
            bits[: self.vocab_size] = True
            bits[self.eos_token_ids] = False
            self._no_eos_row = np.packbits(bits, bitorder="little").view(np.int32)
        return self._no_eos_row

    def _block_stops(self, words: np.ndarray, state: SamplingState) -> None:
        """ignore_eos and min_tokens inside a grammar: they block EOS (and, under min_tokens, the stop
        token ids) only while the grammar allows some other token. The grammar wins: when EOS is all
        it allows, EOS stays allowed — a row with nothing allowed would sample from NaNs."""
        params = state.params
        blocked = list(self.eos_token_ids) if params.ignore_eos else []
        if len(state.output_token_ids) < params.min_tokens:
            blocked = [*self.eos_token_ids, *(t for t in params.stop_token_ids if 0 <= t < self.vocab_size)]
        if not blocked:
            return
        reduced = words.copy()
        for token_id in blocked:
            reduced[token_id >> 5] &= ~np.uint32(1 << (token_id & 31))
        if reduced.any():
            words[:] = reduced

    def _tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = self._build_tokenizer()
            return self._ll_tokenizer

    def _build_tokenizer(self):
        import llguidance
        import llguidance.hf

        eos = self.eos_token_ids or None
        try:
            spelled = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=eos)
        except ValueError as exc:  # a slow (Python) tokenizer: llguidance reads only fast ones
            raise InvalidRequestError(
                f"this model's tokenizer cannot be used for structured output: {exc}", param="response_format"
            ) from None
        wrapper = llguidance.TokenizerWrapper(_TextTokenizer(self._hf_tokenizer, spelled, self.eos_token_ids))
        tokenizer = llguidance.LLTokenizer(wrapper, n_vocab=self.vocab_size, eos_token=eos)
        self._executor = llguidance.LLExecutor()
        return tokenizer


class _TextTokenizer:
    """The model's tokenizer as llguidance's TokenizerWrapper takes it, except that text never
    becomes an added token.

    llguidance treats every added token (``<|im_end|>``, ``<think>``, ``<tool_call>``, ...) as a
    token a grammar names by id, never as text, but it tokenizes the bytes a grammar forces (a
    schema's ``"<think>"`` constant, a regex, a one-item choice) with the Hugging Face tokenizer,
    which turns that text into the added token: the mask then allows only that token and the
    matcher refuses it (dottxt-ai/outlines#1771 reports the same). Tokenized with every added
    token special and special tokens split, such text is spelled with ordinary tokens."""

    def __init__(self, hf_tokenizer, spelled, eos_token_ids: list[int]) -> None:
        from tokenizers import Tokenizer

        state = json.loads(hf_tokenizer.backend_tokenizer.to_str())
        for token in state["added_tokens"]:
            token["special"] = True
        self._backend = Tokenizer.from_str(json.dumps(state))
        self._backend.encode_special_tokens = True  # not saved in the JSON: set on the copy
        self._backend.no_padding()
        self._backend.no_truncation()
        # What llguidance read from the tokenizer, as bytes (none for ids past it, up to the model's
        # vocabulary); the wrapper marks the special ones.
        self.tokens = [spelled.decode_bytes([i]) for i in range(spelled.vocab_size)]
        self.special_token_ids = sorted(t for t in hf_tokenizer.added_tokens_decoder if t < len(self.tokens))
        self.eos_token_id = eos_token_ids[0] if eos_token_ids else hf_tokenizer.eos_token_id
        self.bos_token_id = None

    def __call__(self, text: bytes) -> list[int]:
        return self._backend.encode(text.decode(), add_special_tokens=False).ids


def readable_error(message: str) -> str:
    """llguidance's error text as one line, without its excerpt of the grammar."""
    lines = []
    for line in message.splitlines():
        if _EXCERPT_LINE.match(line):
            break
        if line.strip() and not _CARET_LINE.match(line):
            lines.append(line.strip())
    text = " ".join(lines) or message.strip()
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 1] + "…"


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown error"
