"""Reading tool calls out of a reply, delta by delta: one family's call format (``tools.ToolFormat``)
turned into OpenAI's ``tool_calls`` pieces, the raw text of each call's arguments streamed as it
comes so that the pieces join to exactly the arguments of the whole reply."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from inferd.api.serving.reasoning import partial_marker
from inferd.api.serving.tools import ToolFormat


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
