"""Reasoning models that think in ``<think>…</think>`` (Qwen3, QwQ, DeepSeek-R1 and its distills):
the thinking goes to ``reasoning_content`` (and ``reasoning``, the newer name), the rest to ``content``.

A model reasons when ``<think>`` and ``</think>`` are single tokens of its vocabulary and its chat
template mentions ``</think>``. Where its reply starts is read from the rendered prompt's last think
token: an open ``<think>`` (DeepSeek-R1's newer templates open it) means the reply starts inside the
reasoning; a ``</think>`` followed only by whitespace (Qwen3 with ``enable_thinking: false`` renders
an empty block) means the model will not think; otherwise the model opens the block itself, or not.
A grammar (a response format, forced tools) applies from just after ``</think>``; when a request has
one and the model is free to skip thinking, the chat layer opens the block in the prompt, so the
grammar is always reached.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

OPEN, CLOSE = "<think>", "</think>"


class ReplyStart(enum.Enum):
    """Where the reply starts, as the prompt leaves it."""

    THINKING = "thinking"  # inside an open <think> block
    ANSWER = "answer"  # after a closed (empty) block: the model will not think
    EITHER = "either"  # the model opens a block, or answers directly


@dataclass(frozen=True, slots=True)
class ThinkTokens:
    open_id: int
    close_id: int


def think_tokens(tokenizer) -> ThinkTokens | None:
    """The think tokens of a reasoning model (see the module's rule); None for other models."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = "".join(template.values())
    if not template or CLOSE not in template:
        return None
    vocab = tokenizer.get_added_vocab()
    if OPEN not in vocab or CLOSE not in vocab:
        return None
    return ThinkTokens(vocab[OPEN], vocab[CLOSE])


def reply_start(tokens: ThinkTokens, prompt_ids: list[int], decode) -> ReplyStart:
    """Where a reply to ``prompt_ids`` starts; ``decode`` turns the ids after a last ``</think>``
    into text (only whitespace there means an empty block closed the model's thinking)."""
    for i in range(len(prompt_ids) - 1, -1, -1):
        if prompt_ids[i] == tokens.open_id:
            return ReplyStart.THINKING
        if prompt_ids[i] == tokens.close_id:
            after = prompt_ids[i + 1 :]  # an empty block ends the prompt: a newline or two after it
            return ReplyStart.ANSWER if len(after) < 8 and not decode(after).strip() else ReplyStart.EITHER
    return ReplyStart.EITHER


@dataclass(slots=True)
class SplitText:
    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    """Splits a reply's text, delta by delta, into reasoning and content.

    Text that may still become a think marker is held back; the markers themselves are dropped,
    and so is the whitespace between ``</think>`` and the answer (Qwen3 writes two newlines there)."""

    def __init__(self, start: ReplyStart) -> None:
        self._state = {ReplyStart.THINKING: "thinking", ReplyStart.ANSWER: "answer"}.get(start, "opening")
        self._buffer = ""
        self.has_reasoning = start is ReplyStart.THINKING

    def feed(self, text: str) -> SplitText:
        out = SplitText()
        self._buffer += text
        while self._buffer and self._step(out, final=False):
            pass
        return out

    def finish(self) -> SplitText:
        out = SplitText()
        while self._buffer and self._step(out, final=True):
            pass
        return out

    def _step(self, out: SplitText, final: bool) -> bool:
        buffer = self._buffer
        if self._state == "opening":  # a block may open the reply, after whitespace at most
            head = buffer.lstrip()
            if head.startswith(OPEN):
                self._buffer, self._state, self.has_reasoning = head[len(OPEN) :], "thinking", True
            elif OPEN.startswith(head) and not final:
                return False
            else:
                self._state = "answer"
            return True
        if self._state == "thinking":
            at = buffer.find(CLOSE)
            if at >= 0:
                out.reasoning += buffer[:at]
                self._buffer, self._state = buffer[at + len(CLOSE) :], "answer_start"
                return True
            keep = 0 if final else partial_marker(buffer, CLOSE)
            out.reasoning += buffer[: len(buffer) - keep]
            self._buffer = buffer[len(buffer) - keep :]
            return False
        if self._state == "answer_start":
            self._buffer = buffer.lstrip()
            if not self._buffer:
                return False
            self._state = "answer"
            return True
        out.content += buffer
        self._buffer = ""
        return False


def partial_marker(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that begins ``marker``: text to hold back."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
