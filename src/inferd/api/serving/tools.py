"""Tool calling on chat: the model family's call format, the prompt and the grammar that enforces
``tool_choice`` (``tool_parser`` turns a reply's text back into OpenAI ``tool_calls``).

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
from dataclasses import dataclass
from typing import Any

from llguidance import LLMatcher

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
    return Guide(LLMatcher.grammar_from_lark("\n".join(rules)), start_after=start_after, param="tools")


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
