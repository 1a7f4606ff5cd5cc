"""Structured output: a request's constraint (OpenAI's response_format, vLLM's structured_outputs or
its older guided_* fields) as an llguidance grammar, checked before the request is queued.

llguidance's grammar formats: https://github.com/guidance-ai/llguidance (docs/syntax.md for Lark,
docs/json_schema.md for JSON schemas and their ``x-guidance`` options). A vLLM ``grammar`` may be
Lark or GBNF (llama.cpp's); llguidance's own converter tells them apart and turns GBNF into Lark.
"""

from __future__ import annotations

import copy
import re
from re import _parser  # type: ignore[attr-defined]  # the stdlib's regex parser (sre_parse)
from typing import Any

from llguidance import LLMatcher, grammar_from

from inferd.errors import InvalidRequestError
from inferd.llm.client import LLMClient
from inferd.llm.params import Guide
from inferd.llm.structured import readable_error
from inferd.protocol.limits import MAX_REGEX_REPEAT
from inferd.protocol.openai_sampling import Constraint, SamplingFields

# Whitespace the JSON may hold at each place JSON allows it: any of JSON's four characters, but at
# most 32 in a row — enough for pretty-printed JSON seven levels deep, and a model that would pad
# with newlines for ever (OpenAI warns of exactly that in JSON mode) must write the JSON instead.
_WHITESPACE = r"[\x20\x0A\x0D\x09]{1,32}"

# llguidance places its errors in the grammar a regex or choice list was wrapped into, which the
# client never saw: the position is dropped.
_WRAPPER_POSITION = re.compile(r"^at \d+\(\d+\): ")

_WHAT = {
    "json_schema": "the JSON schema cannot be used",
    "regex": "invalid regular expression",
    "choice": "invalid choices",
    "grammar": "invalid grammar",
}


def response_guide(
    body: SamplingFields, client: LLMClient, start_after: tuple[int, ...] = ()
) -> Guide | None:
    """The grammar of the request's structured-output constraint, checked against the model's
    vocabulary; None when the request sets none. Blocking CPU work: run it off the event loop."""
    constraint = one_constraint(body)
    if constraint is None:
        return None
    grammar = prepare_grammar(constraint)
    guide = Guide(grammar, start_after, constraint.param)
    try:
        client.check_guide(guide)  # compiles once, against the vocabulary, and keeps it for the engine
    except InvalidRequestError as exc:
        # Only a refused grammar is compiled a second time, without the vocabulary, for a message
        # in the constraint's own terms; one refused only with the vocabulary keeps the engine's.
        check_grammar(constraint, grammar)
        raise InvalidRequestError(f"{constraint.param}: {exc.message}", param=constraint.param) from None
    return guide


def check_constraint(body: SamplingFields) -> None:
    """Refuse an invalid structured-output constraint where none will apply (a forced tool call
    replaces the reply it would shape): the request is the client's to get right all the same."""
    constraint = one_constraint(body)
    if constraint is not None:
        check_grammar(constraint, prepare_grammar(constraint))


def one_constraint(body: SamplingFields) -> Constraint | None:
    constraints = body.constraints()
    if len(constraints) > 1:
        names = ", ".join(c.param for c in constraints)
        raise InvalidRequestError(
            f"a request may set one structured-output constraint, but this one sets {names}",
            param=constraints[1].param,
        )
    return constraints[0] if constraints else None


def prepare_grammar(constraint: Constraint) -> str:
    """``constraint`` as an llguidance grammar (JSON text), not yet compiled."""
    if constraint.kind == "json_schema":
        for pattern in schema_patterns(constraint.value):
            check_regex_repeats(pattern, constraint.param)
        return json_schema_grammar(
            constraint.value,
            strict=constraint.strict,
            whitespace_pattern=constraint.whitespace_pattern,
            is_compact=constraint.is_compact,
            is_closed=constraint.is_closed,
        )
    if constraint.kind == "regex":
        check_regex_repeats(constraint.value, constraint.param)
        return LLMatcher.grammar_from_regex(constraint.value)
    if constraint.kind == "choice":
        return grammar_from("choice", constraint.value)  # each choice a Lark string literal
    for pattern in _LARK_REGEX.findall(constraint.value):  # a Lark grammar's regex terminals
        check_regex_repeats(pattern, constraint.param)
    try:
        return grammar_from("grammar", constraint.value)  # Lark as it is, GBNF converted to Lark
    except ValueError as exc:  # GBNF that does not parse, too deep nesting included
        raise InvalidRequestError(
            f"{constraint.param}: invalid grammar: {exc}", param=constraint.param
        ) from None


def json_schema_grammar(
    schema: dict[str, Any],
    *,
    strict: bool = False,
    whitespace_pattern: str | None = None,
    is_compact: bool = False,
    is_closed: bool = False,
) -> str:
    """The grammar of JSON that validates against ``schema``.

    ``strict``: a keyword llguidance cannot enforce (``uniqueItems``, ``contains``, ``if``/``then``,
    an unknown ``format``, ...) makes the grammar invalid, so the request is refused naming it.
    Otherwise llguidance's ``lenient`` mode ignores such keywords (and takes ``oneOf`` as
    ``anyOf``): the output keeps every constraint llguidance knows but may break the ignored ones.
    The schema's own top-level ``x-guidance`` options come between these defaults and the
    request's explicit options (``strict``, whitespace), which win.
    """
    defaults: dict[str, Any] = {"lenient": not strict}
    own = schema.get("x-guidance")
    if not (isinstance(own, dict) and own.keys() & {"whitespace_flexible", "whitespace_pattern"}):
        # Not when the schema chose its whitespace: a pattern overrules whitespace_flexible.
        defaults["whitespace_pattern"] = _WHITESPACE
    overrides: dict[str, Any] = {"lenient": False} if strict else {}
    if is_compact:
        overrides |= {"whitespace_flexible": False, "whitespace_pattern": None}
    elif whitespace_pattern is not None:
        overrides["whitespace_pattern"] = whitespace_pattern
    if is_closed:
        schema = close_objects(schema)
    return LLMatcher.grammar_from_json_schema(schema, defaults=defaults, overrides=overrides)


def check_grammar(constraint: Constraint, grammar: str) -> None:
    """Compile ``grammar`` without a vocabulary (a millisecond for usual schemas) to refuse what
    llguidance cannot use with a message in the constraint's own terms."""
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if not is_error:
        return
    detail = readable_error(messages[0])
    if constraint.kind in ("regex", "choice"):
        detail = _WRAPPER_POSITION.sub("", detail)
    message = f"{constraint.param}: {_WHAT[constraint.kind]}: {detail}"
    if constraint.strict and not LLMatcher.validate_grammar(prepare_grammar(_lenient(constraint))):
        message += (
            "; under strict: true every keyword must be enforced (with strict false or absent, "
            "keywords that cannot be are ignored)"
        )
    raise InvalidRequestError(message, param=constraint.param)


# A regex terminal of a Lark grammar: /.../ on one line, escapes allowed.
_LARK_REGEX = re.compile(r"/((?:\\.|[^/\\\n])+)/")


def check_regex_repeats(pattern: str, param: str) -> None:
    """Refuse a regex whose counted repetitions multiply past MAX_REGEX_REPEAT. llguidance's lexer
    pays for each repeated literal: "a{100000}" costs ~90 ms a token on this project's AVX2 EPYC, a
    stall of every stream in the batch at each step (its parser limits do not bound it); "a{1000}"
    costs 0.5 ms. Unbounded repeats count their minimum. Read with Python's regex parser: a pattern
    it cannot read is left to llguidance, which refuses what it cannot compile."""
    try:
        worst = _repeat_product(_parser.parse(pattern))
    except (re.error, RecursionError, OverflowError, ValueError):
        return
    if worst > MAX_REGEX_REPEAT:
        raise InvalidRequestError(
            f"{param}: the regular expression {pattern[:60]!r} repeats {worst:,} times (counted "
            f"repetitions multiplied through their nesting); the limit is {MAX_REGEX_REPEAT:,}",
            param=param,
        )


def _repeat_product(tree) -> int:
    """The largest product of repetition counts along any nesting path of a parsed regex."""
    worst = 1
    for op, value in tree:
        if op in (_parser.MAX_REPEAT, _parser.MIN_REPEAT):
            low, high, sub = value
            count = low if high == _parser.MAXREPEAT else high
            worst = max(worst, max(count, 1) * _repeat_product(sub))
        elif op is _parser.SUBPATTERN:
            worst = max(worst, _repeat_product(value[-1]))
        elif op is _parser.BRANCH:
            worst = max([worst, *(_repeat_product(branch) for branch in value[1])])
        elif op in (_parser.ASSERT, _parser.ASSERT_NOT):
            worst = max(worst, _repeat_product(value[1]))
    return worst


def schema_patterns(schema: Any) -> list[str]:
    """Every regex a JSON schema holds: ``pattern`` values and ``patternProperties`` keys, at schema
    positions only."""
    patterns: list[str] = []
    stack = [schema]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        if isinstance(node.get("pattern"), str):
            patterns.append(node["pattern"])
        if isinstance(node.get("patternProperties"), dict):
            patterns.extend(k for k in node["patternProperties"] if isinstance(k, str))
        for key in (*_ONE, *_LIST):
            value = node.get(key)
            stack.extend(value if isinstance(value, list) else [value])
        stack.extend(sub for key in _MAP if isinstance(node.get(key), dict) for sub in node[key].values())
    return patterns


def _lenient(constraint: Constraint) -> Constraint:
    return Constraint(constraint.param, constraint.kind, constraint.value)


# Where a JSON schema holds subschemas: one or a list of them, or a map from names to them.
_ONE = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames")
_LIST = ("allOf", "anyOf", "oneOf", "prefixItems", "additionalItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def close_objects(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` where each object schema that lists properties but leaves
    ``additionalProperties`` out allows no others (vLLM's ``disable_additional_properties``).
    Walks schema positions only: a property that happens to be called "properties" is no schema."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue  # a boolean schema
        if ("properties" in node or "patternProperties" in node) and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for key in (*_ONE, *_LIST):
            value = node.get(key)
            stack.extend(value if isinstance(value, list) else [value])  # older drafts' items: a list
        stack.extend(sub for key in _MAP if isinstance(node.get(key), dict) for sub in node[key].values())
    return schema
