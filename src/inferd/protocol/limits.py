"""Hard caps on what one request body may hold, checked while it is parsed.

They bound the work a body can cause before any model-aware check runs (a 16 MiB body of one-byte
list items is millions of items). The model-aware limits (context length, ``max_client_batch_size``,
``max_n``, the engines' queues) are checked afterwards and are usually the tighter ones. OpenAI's
documented limits are used where it has them (stop sequences, tools, embedding inputs).
"""

from __future__ import annotations

from itertools import chain
from typing import Any

from pydantic import BeforeValidator

MAX_STOP_STRINGS = 4  # OpenAI's limit
# The detokeniser's hold-back check costs the square of a stop string's length on every token.
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 300  # OpenAI's limit
MAX_MESSAGES = 2048
MAX_CONTENT_PARTS = 256  # per message
MAX_TOOL_CALLS = 128  # per message
MAX_TOOLS = 128  # OpenAI's limit
MAX_TOOLS_CHARS = 512 * 1024  # all tool definitions together, as JSON
MAX_TEMPLATE_KWARGS = 64
# Nesting of free-form JSON (tool definitions, tool calls, extra message fields, template variables):
# the chat template code recurses over it, two frames a level, and a RecursionError is a 500.
MAX_MODEL_NAME_CHARS = 1024
MAX_JSON_DEPTH = 64
# Inputs of one embedding, completion or rerank request, and ids given to /detokenize. Above the
# default max_client_batch_size (2048), which the encoder checks against afterwards.
MAX_BATCH_INPUTS = 16384
MAX_COMPLETION_PROMPTS = 2048
MAX_DETOKENIZE_TOKENS = 131072
# Structured output (response_format, vLLM's structured_outputs and guided_*): each is compiled into a
# grammar and checked against the vocabulary before the request is queued, in time that grows with
# its size; llguidance's own fuel limits bound what a small but costly grammar can do.
# A JSON schema, as JSON: llguidance builds a 64K-character schema's matcher in ~0.2 s (EPYC, AVX2).
MAX_SCHEMA_CHARS = 64 * 1024
MAX_REGEX_CHARS = 16 * 1024
# Counted repetitions of a regex (guided regex, JSON-schema patterns), multiplied through their
# nesting: llguidance's lexer pays for each repeated literal at every token (api/serving/structured.py).
MAX_REGEX_REPEAT = 1000
MAX_GRAMMAR_CHARS = 32 * 1024  # GBNF is converted to Lark in Python: a quarter second at this size
MAX_CHOICES = 1024
MAX_CHOICE_CHARS = 1024  # each choice
MAX_WHITESPACE_PATTERN_CHARS = 256
MAX_SCHEMA_NAME_CHARS = 64  # OpenAI's limit on json_schema.name
MAX_SCHEMA_DESCRIPTION_CHARS = 4096
# No vocabulary comes near it; a larger id would overflow the engines' int32/int64 tensors.
MAX_TOKEN_ID = 2**31 - 1
SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI's (int64); torch generators take nothing wider


def at_most(limit: int, what: str) -> BeforeValidator:
    """Refuse a list or mapping longer than ``limit`` before its items are validated.

    pydantic checks ``max_length`` only after validating every item and reports every bad item on
    its own: seconds of event-loop time and millions of error objects for one hostile body.
    """

    def check(value: Any) -> Any:
        if isinstance(value, (list, dict)) and len(value) > limit:
            raise ValueError(f"at most {limit} {what} are allowed, got {len(value)}")
        return value

    return BeforeValidator(check)


def at_most_nested(limit: int) -> BeforeValidator:
    """Refuse free-form JSON nested deeper than ``limit`` lists and objects."""

    def check(value: Any) -> Any:
        if is_nested_deeper(value, limit):
            raise ValueError(f"JSON nested deeper than {limit} levels is not allowed")
        return value

    return BeforeValidator(check)


def is_nested_deeper(value: Any, limit: int) -> bool:
    """Whether lists and objects nest deeper than ``limit`` in ``value``: walked level by level in
    comprehensions, not recursively (a deep value must not exhaust the stack here either)."""
    level, depth = ([value] if type(value) in _CONTAINERS else []), 0
    while level:
        depth += 1
        if depth > limit:
            return True
        items = chain.from_iterable(node.values() if type(node) is dict else node for node in level)
        level = [item for item in items if type(item) in _CONTAINERS]
    return False


_CONTAINERS = frozenset((dict, list))


def check_token_ids(value: Any, limit: int) -> list[int]:
    """A list of at most ``limit`` token ids, each an int in [0, MAX_TOKEN_ID], checked in C-speed
    passes (type set, min, max) instead of pydantic's per-item validation and per-item errors."""
    if not isinstance(value, list):
        raise ValueError("must be a list of token ids")
    if len(value) > limit:
        raise ValueError(f"at most {limit} token ids are allowed, got {len(value)}")
    if value and not is_token_ids(value):
        raise ValueError(f"token ids must be integers from 0 to {MAX_TOKEN_ID}")
    return value


def is_token_ids(value: list) -> bool:
    """A non-empty list of ints (not bools) in [0, MAX_TOKEN_ID]."""
    return bool(value) and set(map(type, value)) == {int} and min(value) >= 0 and max(value) <= MAX_TOKEN_ID
