"""Grammar-constrained decoding through llguidance: one matcher per guided request, and each step
the bitmask of the tokens its grammar allows next.

llguidance (github.com/guidance-ai/llguidance) compiles JSON schemas, Lark grammars and regexes
against the model's tokenizer in a few milliseconds, so a new schema with every request costs
nothing worth caching. Its view of the tokenizer costs about a second to build on a 49k vocabulary:
it is built on the first guided request, never at model load.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from inferd.errors import EngineError, InvalidRequestError
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

    def advance(self, output_token_ids: list[int]) -> bool:
        """Take the output's newest token; True once the grammar is complete (nothing but EOS may
        follow), which finishes the request. A token the grammar refuses raises EngineError."""
        if not self.is_active:
            # The marker's own tokens are free text; the grammar starts with the next token.
            self.is_active = output_token_ids[-len(self.start_after) :] == self.start_after
            return False
        token_id = output_token_ids[-1]
        # A matcher already in error (a limit hit while computing a mask) allows EOS and even
        # takes it: is_error, not consume_token's answer, tells that the output is not the grammar's.
        if not self.matcher.consume_token(token_id) or self.matcher.is_error():
            raise EngineError(
                f"the grammar refused token {token_id}: {_first_line(self.matcher.get_error())}"
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

    def check(self, guide: Guide) -> None:
        """Raise InvalidRequestError(param="response_format") for a grammar llguidance rejects.

        The grammar is compiled here, on the API's worker thread, and kept for ``start``: compiling
        grows with the schema (~17 ms for a 39 KB schema, ~0.2 s at the 64K cap on this project's
        AVX2 EPYC), and on the engine thread it would stall every running stream for that long."""
        matcher = self._compile(guide.grammar)
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
        matcher = compiled.deep_copy() if compiled is not None else self._compile(guide.grammar)
        return GuideState(matcher, list(guide.start_after), not guide.start_after)

    def _compile(self, grammar: str):
        from llguidance import LLMatcher

        matcher = LLMatcher(self._tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(
                f"invalid grammar: {readable_error(matcher.get_error())}", param="response_format"
            )
        return matcher

    def prepare_masks(self, rows: list[tuple[int, GuideState, SamplingState]]) -> AllowedTokens:
        """The tokens each of ``rows`` ((row in the batch, guide, sampler state), active guides
        only) may take next. Matchers are only read, so a failed step may run again.

        llguidance's executor fills the rows in parallel where there are cores to spare. Filling
        them on a thread of their own while the forward runs was measured on a 2-core EPYC (AVX2)
        with SmolLM2: no gain within the noise (a mask takes ~0.2 ms a row, a decode step of 1-8
        streams 75-250 ms, and the forward already holds both cores), so it runs in line."""
        from llguidance.numpy import fill_next_token_bitmask_par

        bitmask = np.empty((len(rows), (self.vocab_size + 31) // 32), dtype=np.int32)
        fill_next_token_bitmask_par(
            self._executor, [(guide.matcher, i) for i, (_, guide, _) in enumerate(rows)], bitmask
        )
        for i, (_, _, state) in enumerate(rows):
            self._block_stops(bitmask[i].view(np.uint32), state)
        return AllowedTokens([row for row, _, _ in rows], bitmask)

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

        try:
            tokenizer = llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_token_ids or None
            )
        except ValueError as exc:  # a slow (Python) tokenizer: llguidance reads only fast ones
            raise InvalidRequestError(
                f"this model's tokenizer cannot be used for structured output: {exc}", param="response_format"
            ) from None
        self._executor = llguidance.LLExecutor()
        return tokenizer


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
