"""Prompt-lookup speculative decoding: drafts copied from the request's own tokens.

An answer that quotes its context (RAG, summaries, code edits, JSON echoing its input) repeats runs of
tokens the prompt already holds. The drafter looks for the latest earlier occurrence of the request's
last n tokens (n from ``max_ngram`` down to ``min_ngram``) and proposes the tokens that followed it.
The engine then computes the request's last token and the drafts in one forward, as consecutive query
rows; greedy verification keeps each draft the model would have chosen itself and the first token it
would not (or one past the last draft). On the batch-invariant bf16 path every row's logits are the
ones plain decoding computes for that position, so the output is token for token, and logprob for
logprob, what decoding without drafts gives; a step costs the extra rows, which one stream (reading
every weight once per step whatever the rows) gets nearly free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


@dataclass(frozen=True, slots=True)
class NgramDrafter:
    """Proposes up to ``num_tokens`` drafts by the longest suffix match of ``min_ngram`` to
    ``max_ngram`` tokens; the latest occurrence wins (the most recent context is the likeliest to be
    continued)."""

    num_tokens: int
    max_ngram: int = 4
    min_ngram: int = 2

    def propose(self, token_ids: list[int], limit: int) -> list[int]:
        """At most ``min(limit, num_tokens)`` draft tokens to follow ``token_ids`` (maybe none)."""
        count = min(limit, self.num_tokens)
        if count <= 0 or len(token_ids) <= self.min_ngram:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            # windows starting at 0 .. len - n - 1: each has at least one token after it
            windows = sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                return tokens[start : start + count].tolist()
        return []
