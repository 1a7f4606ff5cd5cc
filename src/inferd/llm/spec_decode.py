"""Prompt-lookup speculative decoding: drafts copied from the request's own tokens.

An answer that quotes its context (RAG, summaries, code edits, JSON echoing its input) repeats runs of
tokens the prompt already holds. The drafter looks for the latest earlier occurrence of the request's
last n tokens (n from ``max_ngram`` down to ``min_ngram``) and proposes the tokens that followed it.
The engine then computes the request's last token and the drafts in one forward, as consecutive query
rows; greedy verification keeps each draft the model would have chosen itself and the first token it
would not (or one past the last draft). On the batch-invariant bf16 path every row's logits are the
ones plain decoding computes for that position, so the output is token for token, and logprob for
logprob, what decoding without drafts gives; a step costs the extra rows, which one stream (reading
every weight once per step whatever its rows) gets nearly free.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class NgramIndex:
    """One request's n-grams (of min_ngram..max_ngram tokens) that are followed by a token, each
    mapped to where its latest such occurrence starts; extended with the tokens appended since the
    last look, so a step costs a few dict operations whatever the context's length."""

    min_ngram: int
    max_ngram: int
    indexed: int = 0  # token_ids[:indexed] have been read
    latest: dict[tuple[int, ...], int] = field(default_factory=dict)

    def extend(self, token_ids: list[int]) -> None:
        for end in range(max(self.indexed, 1), len(token_ids)):
            # the n-grams ending just before position `end`, which token `end` follows
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self.latest[tuple(token_ids[end - n : end])] = end - n
        self.indexed = len(token_ids)


@dataclass(frozen=True, slots=True)
class NgramDrafter:
    """Proposes up to ``num_tokens`` drafts by the longest suffix match of ``min_ngram`` to
    ``max_ngram`` tokens; the latest occurrence wins (the most recent context is the likeliest to be
    continued)."""

    num_tokens: int
    max_ngram: int = 4
    min_ngram: int = 2

    def index(self) -> NgramIndex:
        """A request's own index, to pass to every ``propose`` for it."""
        return NgramIndex(self.min_ngram, self.max_ngram)

    def propose(self, index: NgramIndex, token_ids: list[int], limit: int) -> list[int]:
        """At most ``min(limit, num_tokens)`` draft tokens to follow ``token_ids`` (maybe none)."""
        count = min(limit, self.num_tokens)
        if count <= 0:
            return []
        index.extend(token_ids)
        for n in range(min(self.max_ngram, len(token_ids) - 1), self.min_ngram - 1, -1):
            start = index.latest.get(tuple(token_ids[-n:]))
            if start is not None:
                return token_ids[start + n : start + n + count]
        return []
