"""Tool calling on chat: the model family's call format, the prompt, the grammar that enforces
``tool_choice``, and the parser that turns a reply's text into OpenAI ``tool_calls``.

A model's family is read from its chat template (first match wins):

- ``[TOOL_CALLS]`` in the template: Mistral, ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``;
- ``<tool_call>``: Hermes / Qwen, one ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
  block per call;
- ``<|python_tag|>`` or ``"parameters"``: Llama 3.1+, ``{"name": ..., "parameters": {...}}``, calls
  separated by ``;``, optionally after ``<|python_tag|>``;
- anything else (a template that does not know tools, or one whose format inferd does not parse):
  generic. inferd describes the tools in a system message it adds (appended to the first
  system message when there is one) and asks for the Hermes block form, written as text; earlier
  calls and tool results are rendered as that text, tool results as user turns.

Formats follow the templates the families publish (Qwen2.5/Qwen3, Hermes-2-Pro/Hermes-3,
Llama-3.1/3.2, Mistral-7B-Instruct-v0.3) and vLLM's parsers of the same names.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llguidance import LLMatcher

from inferd.api.serving.reasoning import partial_marker
from inferd.api.serving.structured import close_objects
from inferd.errors import InvalidRequestError
from inferd.llm.params import Guide
from inferd.llm.structured import readable_error

# OpenAI's rule for function names, plus "." (namespaced tools, e.g. MCP servers').
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_EMPTY_OBJECT = {"type": "object", "properties": {}, "additionalProperties": False}
# JSON the way the templates write it (Python's json.dumps, Jinja's tojson): ", " and ": ", no
# other whitespace. Free whitespace lets a weak model pad a call with newlines until max_tokens.
_COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True, slots=True)
class ToolFormat:
    """How one model family writes tool calls."""

    name: str
    marker: str  # opens a group of calls
    close: str  # closes a group; "" = the group ends at the first text that is no call
    args_key: str  # the key of the arguments in a call's JSON object
    skipped: str  # what may stand between the calls of a group
    bare_start: bool = False  # a reply that begins with "{" is a call without the marker
    short_ids: bool = False  # Mistral's templates accept only 9-character alphanumeric call ids


HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>", "arguments", " \t\r\n")
LLAMA3 = ToolFormat("llama3", "<|python_tag|>", "", "parameters", " \t\r\n;", bare_start=True)
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", "]", "arguments", " \t\r\n,[", short_ids=True)
GENERIC = ToolFormat("generic", "<tool_call>", "</tool_call>", "arguments", " \t\r\n")


def detect_format(chat_template: str | dict | None) -> ToolFormat:
    """The family whose call format the model's chat template teaches (see the module's rule)."""
    if isinstance(chat_template, dict):  # named templates: transformers renders "tool_use" for tools
        chat_template = chat_template.get("tool_use") or chat_template.get("default")
    text = chat_template or ""
    if "[TOOL_CALLS]" in text:
        return MISTRAL
    if "<tool_call>" in text:
        return HERMES
    if "<|python_tag|>" in text or '"parameters"' in text:
        return LLAMA3
    return GENERIC


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    parameters: dict[str, Any]  # JSON schema of the arguments: always an object
    definition: dict[str, Any]  # the request's function object, for the generic system message


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a request's tools and tool_choice ask for.

    ``choice``: "none" (tools are rendered, nothing is enforced or parsed: the reply is text),
    "auto" (free text; a call, once started, must be valid), "required" (at least one call) or
    "named" (one call of ``named``). ``parallel``: more than one call is allowed."""

    format: ToolFormat
    tools: tuple[Tool, ...]
    choice: str
    named: str | None = None
    parallel: bool = True

    @property
    def is_forced(self) -> bool:
        return self.choice in ("required", "named")


def prepare_tool_plan(
    tools: list[dict] | None, tool_choice: Any, parallel: bool, chat_template: str | dict | None
) -> ToolPlan | None:
    """The request's tools checked (400s name the field) and its choice resolved; None without tools."""
    choice, named = _choice(tool_choice)
    if not tools:
        if choice in ("required", "named"):
            raise InvalidRequestError("tool_choice needs tools to choose from", param="tool_choice")
        return None
    checked = tuple(_tool(i, t) for i, t in enumerate(tools))
    names = [t.name for t in checked]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise InvalidRequestError(f"two tools are named {name!r}", param=f"tools[{i}].function.name")
    if named is not None and named not in names:
        raise InvalidRequestError(
            f"tool_choice names {named!r}, which is not among the tools", param="tool_choice"
        )
    return ToolPlan(detect_format(chat_template), checked, choice, named, parallel)


def _choice(tool_choice: Any) -> tuple[str, str | None]:
    if tool_choice is None:
        return "auto", None
    if isinstance(tool_choice, str):
        return tool_choice, None
    return "named", tool_choice.function.name


def _tool(index: int, tool: object) -> Tool:
    where = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise InvalidRequestError("only tools of type 'function' are supported", param=f"{where}.type")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise InvalidRequestError("a function tool needs a 'function' object", param=f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequestError(
            "a function's name must be 1 to 64 letters, digits, '_', '-' or '.'",
            param=f"{where}.function.name",
        )
    parameters = function.get("parameters")
    if parameters is None:
        return Tool(name, _EMPTY_OBJECT, function)
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise InvalidRequestError(
            f"the parameters of {name!r} must be a JSON schema of an object",
            param=f"{where}.function.parameters",
        )
    # Closed as OpenAI's strict mode and xgrammar's strict default have them: the schema's default
    # lets a weak model add keys until max_tokens, and a call of the closed form is valid all the same.
    parameters = close_objects({"type": "object"} | parameters)
    _check_schema(name, parameters, f"{where}.function.parameters")
    return Tool(name, parameters, function)


def _check_schema(name: str, schema: dict, param: str) -> None:
    error = LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(_compact(schema)))
    if error:
        message = f"the parameters of tool {name!r} cannot be enforced: {readable_error(error)}"
        raise InvalidRequestError(message, param=param)


def _compact(schema: dict) -> dict:
    return {"x-guidance": _COMPACT_JSON} | schema


# --- the prompt -------------------------------------------------------------------------------


def prepare_tool_messages(messages: list[dict], plan: ToolPlan) -> tuple[list[dict], list[dict] | None]:
    """The messages and tools to render. A template that knows tools gets the request's tools and
    earlier calls with their arguments as objects (Qwen's and Llama's templates write them with
    ``tojson``, which would quote a string); the generic format gets them as text."""
    if plan.format is GENERIC:
        return _generic_messages(messages, plan.tools), None
    return [_with_parsed_arguments(m) for m in messages], [
        {"type": "function", "function": t.definition} for t in plan.tools
    ]


def _with_parsed_arguments(message: dict) -> dict:
    calls = message.get("tool_calls")
    if not calls:
        return message
    return message | {"tool_calls": [_parsed_call(c) for c in calls]}


def _parsed_call(call: dict) -> dict:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    return call | {"function": function | {"arguments": arguments}} if isinstance(arguments, dict) else call


def generic_system_prompt(tools: tuple[Tool, ...]) -> str:
    """The generic format's instructions: the tools' definitions and the form of a call."""
    definitions = "\n".join(json.dumps(t.definition, ensure_ascii=False) for t in tools)
    return (
        "You may call the following tools (JSON Schema of each function):\n"
        f"{definitions}\n\n"
        "To call a tool, reply with one block per call, exactly in this form:\n"
        '<tool_call>\n{"name": "<function name>", "arguments": <arguments as a JSON object>}\n</tool_call>'
    )


def _generic_messages(messages: list[dict], tools: tuple[Tool, ...]) -> list[dict]:
    prompt = generic_system_prompt(tools)
    out: list[dict] = []
    if messages and messages[0]["role"] in ("system", "developer"):
        first, *messages = messages
        out.append(first | {"content": f"{first['content']}\n\n{prompt}" if first["content"] else prompt})
    else:
        out.append({"role": "system", "content": prompt})
    previous = None
    for message in messages:
        if message["role"] == "tool":
            block = f"<tool_response>\n{message['content']}\n</tool_response>"
            if previous == "tool":  # consecutive results make one user turn
                out[-1] = out[-1] | {"content": f"{out[-1]['content']}\n{block}"}
            else:
                out.append({"role": "user", "content": block})
        elif message.get("tool_calls"):
            blocks = [_generic_call_text(c) for c in message["tool_calls"]]
            text = "\n".join(([message["content"]] if message["content"] else []) + blocks)
            out.append({k: v for k, v in message.items() if k != "tool_calls"} | {"content": text})
        else:
            out.append(message)
        previous = message["role"]
    return out


def _generic_call_text(call: dict) -> str:
    function = _parsed_call(call).get("function") or {}
    body = {"name": function.get("name"), "arguments": function.get("arguments", {})}
    return f"<tool_call>\n{json.dumps(body, ensure_ascii=False)}\n</tool_call>"


# --- the grammar ------------------------------------------------------------------------------


def prepare_tool_guide(
    plan: ToolPlan, token_ids: dict[str, int], start_after: tuple[int, ...] = ()
) -> Guide | None:
    """The grammar that enforces ``plan``'s choice, in llguidance's Lark dialect (each call's
    arguments an inline ``%json`` schema: the tool's own, so its ``$ref``\\s resolve); None for
    "none". ``token_ids``: the markers that are single tokens of this model, which the grammar
    names as tokens (the model was taught the token, not its spelling)."""
    if plan.choice == "none":
        return None
    tools = [t for t in plan.tools if plan.named in (None, t.name)]
    fmt, many = plan.format, plan.parallel and plan.choice != "named"
    marker = _token_or_text(fmt.marker, token_ids)
    rules = [
        "%llguidance {}",
        "call: " + " | ".join(f"call_{i}" for i in range(len(tools))),
        *(f"call_{i}: {_call_rule(fmt, t)}" for i, t in enumerate(tools)),
        f"tail: {_tail(fmt, marker, token_ids, many)}",
        "TEXT: /(.|\\n)*/",
        "LEAD: /[ \\n]{1,2}/",
    ]
    if plan.is_forced:
        rules.insert(1, f"start: LEAD? {marker}{'?' if fmt.bare_start else ''} tail")
    elif fmt.bare_start:  # a reply that starts with "{" is a call; other text is free
        rules.insert(1, f"start: WS? (PLAIN | {marker}? tail)?")
        rules += ["WS: /[ \\t\\r\\n]+/", "PLAIN: /[^{ \\t\\r\\n](.|\\n)*/" + _unless_marker(fmt, token_ids)]
    elif fmt.marker in token_ids:  # free text cannot spell a token: it ends where the marker comes
        rules.insert(1, f"start: TEXT | TEXT {marker} tail")
    else:  # the marker is text: free text up to its first appearance, then the calls
        rules.insert(1, "start: TEXT | opening tail")
        rules.append(f"opening[lazy]: TEXT {marker}")
    return Guide(LLMatcher.grammar_from_lark("\n".join(rules)), start_after=start_after)


def _unless_marker(fmt: ToolFormat, token_ids: dict[str, int]) -> str:
    """Free text may not begin with the marker when it is text (a token it cannot spell anyway)."""
    return "" if fmt.marker in token_ids else f" & ~/{re.escape(fmt.marker)}(.|\\n)*/"


def _token_or_text(text: str, token_ids: dict[str, int]) -> str:
    return f"<[{token_ids[text]}]>" if text in token_ids else json.dumps(text)


def _call_rule(fmt: ToolFormat, tool: Tool) -> str:
    head = '{"name": ' + json.dumps(tool.name) + f', "{fmt.args_key}": '
    return f"{json.dumps(head)} %json {json.dumps(_compact(tool.parameters))} " + json.dumps("}")


def _tail(fmt: ToolFormat, marker: str, token_ids: dict[str, int], many: bool) -> str:
    """What follows the first marker: the calls, and the group's end. Hermes writes a block per
    call, Mistral one list of them, Llama a sequence separated by ";"."""
    if fmt.close == "</tool_call>":
        close = _token_or_text(fmt.close, token_ids)
        more = f' ("\\n" {marker} "\\n" call "\\n" {close})*' if many else ""
        return f'"\\n" call "\\n" {close}{more}'
    if fmt.close == "]":
        return '" "? "[" call' + (' (", " call)*' if many else "") + ' "]"'
    return "call" + (' ("; " call)*' if many else "")


# --- parsing the reply ------------------------------------------------------------------------


@dataclass(slots=True)
class ToolCallDelta:
    """A piece of one call: its first piece carries ``id`` and ``name``; arguments come in pieces."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class ParsedText:
    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)

    def add_call(self, delta: ToolCallDelta) -> None:
        last = self.calls[-1] if self.calls else None
        if last is not None and last.index == delta.index and delta.id is None:
            last.arguments += delta.arguments
        else:
            self.calls.append(delta)


def new_call_id(fmt: ToolFormat) -> str:
    return uuid.uuid4().hex[:9] if fmt.short_ids else f"call_{uuid.uuid4().hex[:24]}"


_CALL_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")')
_CALL_ARGS = re.compile(r'\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')

_TEXT, _GROUP, _CALL = "text", "group", "call"


class ToolCallParser:
    """Splits a reply's text, delta by delta, into content and tool-call deltas in one family's format.

    Text that may still become the marker is held back, and so is whitespace, which is dropped
    next to calls. A call's ``id`` and name go out as soon as its name is complete, its arguments'
    JSON as it comes (the raw text, so the pieces join to exactly the non-streamed arguments). A
    call's JSON that is not a call (no name) goes back to the content."""

    def __init__(self, fmt: ToolFormat, new_id: Callable[[], str] | None = None) -> None:
        self._fmt = fmt
        self._new_id = new_id or (lambda: new_call_id(fmt))
        self._buffer = ""
        self._state = _TEXT
        self._held_space = ""
        self._has_text = False
        self._call: _Call | None = None
        self.num_calls = 0

    def feed(self, text: str) -> ParsedText:
        out = ParsedText()
        self._buffer += text
        self._run(out, final=False)
        return out

    def finish(self) -> ParsedText:
        """What is still held when the reply ends (a cut-off call keeps what it has)."""
        out = ParsedText()
        self._run(out, final=True)
        if self._state == _CALL and self._call is not None:
            self._close_call(out, complete=False)
        elif self._state == _TEXT:
            self._text(self._buffer, out)
        self._buffer = ""
        if not self.num_calls:
            out.content += self._held_space
        self._held_space = ""
        return out

    def _run(self, out: ParsedText, final: bool) -> None:
        step = {_TEXT: self._scan_text, _GROUP: self._scan_group, _CALL: self._scan_call}
        while self._buffer and step[self._state](out, final):
            pass

    def _scan_text(self, out: ParsedText, final: bool) -> bool:
        fmt, buffer = self._fmt, self._buffer
        if fmt.bare_start and not self._has_text and buffer.lstrip().startswith("{"):
            self._held_space += buffer[: len(buffer) - len(buffer.lstrip())]
            self._buffer, self._state = buffer.lstrip(), _GROUP
            return True
        at = buffer.find(fmt.marker)
        if at >= 0:
            self._text(buffer[:at], out)
            self._held_space = ""
            self._buffer, self._state = buffer[at + len(fmt.marker) :], _GROUP
            return True
        keep = 0 if final else partial_marker(buffer, fmt.marker)
        self._text(buffer[: len(buffer) - keep], out)
        self._buffer = buffer[len(buffer) - keep :]
        return False

    def _scan_group(self, out: ParsedText, final: bool) -> bool:
        fmt, buffer = self._fmt, self._buffer.lstrip(self._fmt.skipped)
        self._buffer = buffer
        if not buffer:
            return False
        if buffer[0] == "{":
            self._state, self._call = _CALL, _Call()
        elif fmt.close and buffer.startswith(fmt.close):
            self._buffer, self._state = buffer[len(fmt.close) :], _TEXT
        elif fmt.close and fmt.close.startswith(buffer):  # the end is still coming (or was cut off)
            self._buffer = buffer if not final else ""
            return False
        else:  # the group is over (or malformed): back to text
            self._state = _TEXT
        return True

    def _scan_call(self, out: ParsedText, final: bool) -> bool:
        call = self._call
        assert call is not None
        used, done = call.feed(self._buffer)
        self._buffer = self._buffer[used:]
        self._stream_call(out)
        if done:
            self._close_call(out, complete=True)
        return done

    def _stream_call(self, out: ParsedText) -> None:
        call = self._call
        if call.name is not None and call.index is None:
            call.index, self.num_calls = self.num_calls, self.num_calls + 1
            out.add_call(ToolCallDelta(call.index, self._new_id(), call.name))
        if call.index is not None:
            piece = call.take_arguments()
            if piece:
                out.add_call(ToolCallDelta(call.index, arguments=piece))

    def _close_call(self, out: ParsedText, complete: bool) -> None:
        call, self._call, self._state = self._call, None, _GROUP if complete else _TEXT
        if call.index is not None:
            if complete and not call.arguments_done:
                out.add_call(ToolCallDelta(call.index, arguments=call.fallback_arguments()))
            return
        parsed = call.parse() if complete else None
        if parsed is None:  # not a call: the text stays content
            self._text(call.text, out)
            self._state = _TEXT
            return
        call.index, self.num_calls = self.num_calls, self.num_calls + 1
        out.add_call(ToolCallDelta(call.index, self._new_id(), parsed[0], parsed[1]))

    def _text(self, text: str, out: ParsedText) -> None:
        if not text:
            return
        text = self._held_space + text
        kept = text.rstrip()
        if kept:
            out.content += kept
            self._has_text = True
        self._held_space = text[len(kept) :]


class _Nesting:
    """Finds where a JSON object or array closes, as its text arrives."""

    __slots__ = ("depth", "escaped", "in_string", "pos")

    def __init__(self, start: int) -> None:
        self.depth, self.in_string, self.escaped, self.pos = 0, False, False, start

    def advance(self, text: str) -> int | None:
        """Scan what is new in ``text``: the index just past the closing bracket, or None."""
        for i in range(self.pos, len(text)):
            ch = text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.pos = i + 1
                    return i + 1
        self.pos = len(text)
        return None


class _Call:
    """One call's JSON object as it arrives: its name once complete, its arguments' text piece by
    piece when they follow the name (as every format writes them); otherwise parsed whole."""

    def __init__(self) -> None:
        self.text = ""
        self.name: str | None = None
        self.index: int | None = None
        self._object = _Nesting(0)
        self._name_end: int | None = None
        self._args: _Nesting | None = None
        self._args_start = self._args_end = self._sent = 0
        self.arguments_done = False

    def feed(self, chunk: str) -> tuple[int, bool]:
        """Take text up to the object's end: (characters used, whether the object is complete)."""
        before = len(self.text)
        end = self._object.advance(self.text + chunk)
        self.text = (self.text + chunk)[: end if end is not None else None]
        self._find_parts()
        return len(self.text) - before, end is not None

    def _find_parts(self) -> None:
        if self._name_end is None:
            match = _CALL_NAME.match(self.text)
            if match is None:
                return
            try:
                self.name = json.loads(match.group(1))
            except ValueError:
                self.name = None
            self._name_end = match.end()
        if self._args is None and self.name is not None:
            match = _CALL_ARGS.match(self.text, self._name_end)
            if match is None:
                return
            self._args_start = self._sent = match.end()
            self._args = _Nesting(self._args_start)
        if self._args is not None and not self.arguments_done:
            end = self._args.advance(self.text)
            self._args_end = end if end is not None else len(self.text)
            self.arguments_done = end is not None

    def take_arguments(self) -> str:
        """The arguments' text that arrived since the last call."""
        if self._args is None:
            return ""
        piece, self._sent = self.text[self._sent : self._args_end], self._args_end
        return piece

    def fallback_arguments(self) -> str:
        """A complete call whose arguments did not stream (not an object, or not after the name)."""
        parsed = self.parse()
        return parsed[1] if parsed else "{}"

    def parse(self) -> tuple[str, str] | None:
        """(name, arguments as JSON text) of the whole object, or None when it is no call."""
        try:
            value = json.loads(self.text)
        except ValueError:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        return value["name"], text
