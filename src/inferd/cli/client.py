"""``inferd run / ps / stop``: a client of a running server, with the verbs Ollama users already know.

These commands speak HTTP only (httpx), so they start in a fraction of a second and never import
torch — except ``run --embedded``, which starts a server of its own in this process.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

import typer

if TYPE_CHECKING:
    import httpx

from inferd.cli.models import fail

DEFAULT_URL = "http://127.0.0.1:8000"
# Between two bytes of a reply: a long prompt's prefill, or a model loading on demand, may take a while.
READ_TIMEOUT_S = 600.0
# A prompt piped in is read whole (up to this many characters) before it is sent; the server's own body cap applies after this.
MAX_STDIN_CHARS = 16 * 2**20
EXIT_HINT = "Use Ctrl + d or /bye to exit."

UrlOption = Annotated[
    str,
    typer.Option("--url", envvar="INFERD_URL", help="The server's base URL.", show_default=True),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="INFERD_API_KEY",
        help="Sent as Authorization: Bearer KEY (the first key when the variable lists several, as serve's may).",
        show_default=False,
    ),
]


class ClientError(Exception):
    """What went wrong, in one line a person can act on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of a streamed reply: answer text, or reasoning text (``reasoning_content``)."""

    text: str
    is_reasoning: bool = False


class ServerClient:
    """The few calls these commands make; the server's errors come out as ``ClientError``."""

    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url.rstrip("/")
        key = first_key(api_key)
        self._has_key = key is not None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        import httpx  # deferred: the client verbs' own dependency, not serve's or pull's

        timeout = httpx.Timeout(READ_TIMEOUT_S, connect=5.0)
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def get(self, path: str) -> Any:
        with self._transport_errors():
            response = self._http.get(path)
        return self._json(response)

    def post(self, path: str, body: dict) -> Any:
        with self._transport_errors():
            response = self._http.post(path, json=body)
        return self._json(response)

    def stream_chat(self, body: dict) -> Iterator[Delta]:
        """``POST /v1/chat/completions`` with ``stream: true``, as deltas. Closing the iterator
        closes the connection, which makes the server abort the request."""
        with (
            self._transport_errors(),
            self._http.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as response,
        ):
            if response.status_code >= 400:
                response.read()
                self._json(response)
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    return
                yield from _deltas(json.loads(data))

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code == 401:
            raise ClientError(
                "the server refused this API key (INFERD_API_KEY or --api-key)"
                if self._has_key
                else "the server wants an API key: set INFERD_API_KEY"
            )
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            raise ClientError(error_message(body) or f"HTTP {response.status_code} from {self.url}")
        return body

    @contextmanager
    def _transport_errors(self) -> Iterator[None]:
        import httpx

        try:
            yield
        except httpx.ConnectError:
            raise ClientError(
                f"no inferd server at {self.url}; start one with `inferd serve` or pass --url"
            ) from None
        except httpx.TimeoutException:
            raise ClientError(f"the server at {self.url} did not answer in time") from None
        except httpx.TransportError as exc:
            raise ClientError(f"lost the connection to {self.url}: {exc}") from None


def first_key(value: str | None) -> str | None:
    keys = (value or "").replace(",", " ").split()
    return keys[0] if keys else None


def error_message(body: Any) -> str | None:
    """The message of an OpenAI-shaped error body (``{"error": {"message": ...}}``), if it is one."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return error if isinstance(error, str) else None


def _deltas(event: dict) -> Iterator[Delta]:
    if "error" in event:  # the headers were sent already: the server reports a failure as an event
        raise ClientError(error_message(event) or "the server failed the reply")
    for choice in event.get("choices") or []:
        delta = choice.get("delta") or {}
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if reasoning:
            yield Delta(reasoning, is_reasoning=True)
        if delta.get("content"):
            yield Delta(delta["content"])


@contextmanager
def connected(url: str, api_key: str | None) -> Iterator[ServerClient]:
    """A client whose errors end the command with their message and exit code 1, no traceback."""
    client = ServerClient(url, api_key)
    try:
        yield client
    except ClientError as exc:
        raise fail(exc.message) from None
    finally:
        client.close()


# --- inferd run ------------------------------------------------------------------------------------


@dataclass
class Chat:
    """One conversation with one model, and the settings ``/set`` changes."""

    model: str
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    messages: list[dict] = field(default_factory=list)

    def request(self, text: str) -> dict:
        """The body of the next turn: the conversation so far, then ``text`` as the user's message."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        body: dict = {
            "model": self.model,
            "messages": [*system, *self.messages, {"role": "user", "content": text}],
        }
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body

    def keep(self, text: str, answer: str) -> None:
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


def reply(client: ServerClient, chat: Chat, text: str) -> str:
    """Stream the answer to ``text`` to the terminal; returns the answer (reasoning left out, as
    OpenAI-style servers expect the history)."""
    printer = ReplyPrinter(to_terminal=sys.stdout.isatty())
    for delta in client.stream_chat(chat.request(text)):
        printer.write(delta)
    printer.finish()
    return "".join(printer.answer)


class ReplyPrinter:
    """Reasoning is dim on a terminal, and goes to stderr when stdout is not one, so that a
    redirected answer holds the answer alone; each part ends its own line."""

    def __init__(self, to_terminal: bool) -> None:
        self.answer: list[str] = []
        self._reasoning_err = not to_terminal
        self._open: str | None = None  # the part whose line is not ended yet: "reasoning" or "answer"
        self._last = ""

    def write(self, delta: Delta) -> None:
        part = "reasoning" if delta.is_reasoning else "answer"
        if not delta.is_reasoning:
            self.answer.append(delta.text)
        # Shown without the whitespace a part starts with (a space or a newline after the role).
        text = delta.text if self._open == part else delta.text.lstrip()
        if not text:
            return
        if self._open == "reasoning" and part == "answer":
            self._end_line(blank=True)
        if delta.is_reasoning:
            typer.secho(text, dim=True, nl=False, err=self._reasoning_err)
        else:
            typer.echo(text, nl=False)
        self._open, self._last = part, text

    def finish(self) -> None:
        if self._open is not None:
            self._end_line(blank=False)

    def _end_line(self, blank: bool) -> None:
        to_err = self._open == "reasoning" and self._reasoning_err
        newline = "" if self._last.endswith("\n") else "\n"
        typer.echo(newline + ("\n" if blank and not to_err else ""), nl=False, err=to_err)
        self._open = None


def read_message() -> str:
    """One message from the prompt: a line, or the lines between two ``\"\"\"`` (Ollama's
    multi-line input), joined with their newlines."""
    line = input(">>> ")
    if not line.lstrip().startswith('"""'):
        return line
    first = line.lstrip()[3:]
    if first.rstrip().endswith('"""'):
        return first.rstrip()[:-3]
    lines = [first] if first else []
    while not (line := input("... ")).rstrip().endswith('"""'):
        lines.append(line)
    if last := line.rstrip()[:-3]:
        lines.append(last)
    return "\n".join(lines)


COMMANDS = """\
Available commands:
  /set temperature X    Sampling temperature (0 is greedy)
  /set max_tokens N     Longest reply, in tokens
  /set system TEXT      System message (/set system with no text removes it)
  /clear                Forget the conversation
  /bye                  Exit (so does Ctrl + d)
  /?, /help             This list

Use \"\"\" to begin and end a multi-line message.
Ctrl + c stops a reply while it streams (that turn is not kept)."""


def run_command(chat: Chat, line: str) -> bool:
    """Carry out a ``/`` command; False when the chat should end."""
    name, _, rest = line.strip().partition(" ")
    if name == "/bye":
        return False
    if name in ("/?", "/help"):
        typer.echo(COMMANDS)
    elif name == "/clear":
        chat.messages.clear()
        typer.echo("Cleared session context")
    elif name == "/set":
        try:
            typer.echo(set_option(chat, rest))
        except ValueError as exc:
            typer.secho(f"error: {exc}", fg="red", err=True)
    else:
        typer.echo(f"Unknown command '{name}'. Type /? for help")
    return True


def set_option(chat: Chat, text: str) -> str:
    """``/set NAME VALUE`` (Ollama's ``/set parameter NAME VALUE`` too); returns what changed."""
    name, _, value = text.strip().partition(" ")
    if name == "parameter":
        name, _, value = value.strip().partition(" ")
    value = value.strip()
    if name == "system":
        chat.system = value or None
        return "Set system message." if value else "Removed the system message."
    if name == "temperature":
        temperature = float(value)
        if not 0 <= temperature <= 2:
            raise ValueError("temperature must be between 0 and 2")
        chat.temperature = temperature
    elif name == "max_tokens":
        max_tokens = int(value)
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        chat.max_tokens = max_tokens
    else:
        raise ValueError("usage: /set temperature X | /set max_tokens N | /set system TEXT")
    return f"Set parameter '{name}' to '{value}'"


def chat_loop(client: ServerClient, chat: Chat) -> None:
    """The interactive chat. Ctrl + c at the prompt prints how to leave (as Ollama does); during a
    reply it closes the stream, which aborts the request on the server, and drops that turn."""
    with suppress(ImportError):  # not on every platform
        import readline  # noqa: F401 - line editing and history for input()
    while True:
        try:
            text = read_message()
        except EOFError:
            typer.echo()
            return
        except KeyboardInterrupt:
            typer.echo(f"\n{EXIT_HINT}")
            continue
        if text.startswith("/"):
            if not run_command(chat, text):
                return
            continue
        if not text.strip():
            continue
        try:
            answer = reply(client, chat, text)
        except KeyboardInterrupt:
            typer.echo()
            continue
        except ClientError as exc:
            typer.secho(f"error: {exc.message}", fg="red", err=True)
            continue
        chat.keep(text, answer)
        typer.echo()


def piped_prompt(words: list[str]) -> str:
    """The one-shot prompt: piped stdin (when stdin is not a terminal), then the words given, as
    ``cat notes.txt | inferd run MODEL summarise this`` expects."""
    parts = []
    if not sys.stdin.isatty():
        text = sys.stdin.read(MAX_STDIN_CHARS + 1)
        if len(text) > MAX_STDIN_CHARS:
            raise fail(f"the prompt on stdin is longer than {MAX_STDIN_CHARS:,} characters")
        parts.append(text.strip())
    parts.append(" ".join(words))
    return "\n\n".join(part for part in parts if part)


def run(
    model: Annotated[
        str,
        typer.Argument(
            help="A served model's name (with --embedded: a model to serve, as for serve --model)."
        ),
    ],
    prompt: Annotated[
        list[str] | None,
        typer.Argument(help="Answer this and exit; without it (and nothing piped in), chat."),
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    embedded: Annotated[
        bool,
        typer.Option(
            "--embedded", help="Serve MODEL in this process for this chat alone, on a free loopback port."
        ),
    ] = False,
    system: Annotated[str | None, typer.Option("--system", help="System message.")] = None,
    temperature: Annotated[
        float | None,
        typer.Option("--temperature", min=0, max=2, help="Sampling temperature (default: the model's)."),
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", min=1, help="Longest reply, in tokens.")
    ] = None,
) -> None:
    """Chat with a model, or answer one prompt (an argument, or stdin) and exit."""
    interactive = not prompt and sys.stdin.isatty()
    text = "" if interactive else piped_prompt(prompt or [])
    if not interactive and not text:
        raise fail("nothing to send: the prompt is empty")
    served = embedded_server(model) if embedded else nullcontext((url, model))
    with served as (base_url, name), connected(base_url, api_key) as client:
        client.get(f"/v1/models/{quote(name, safe='/')}")  # before any prompt: the server, the key, the name
        chat = Chat(name, system, temperature, max_tokens)
        if interactive:
            chat_loop(client, chat)
            return
        try:
            reply(client, chat, text)
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None


@contextmanager
def embedded_server(model: str) -> Iterator[tuple[str, str]]:
    """A server of ``model`` alone in a background thread of this process, on a free loopback port,
    for as long as the chat lasts; yields its URL and the model's served name. Other settings come
    from the INFERD_* variables, as for ``serve`` (INFERD_API_KEY among them, which the client sends)."""
    from pydantic import ValidationError
    from rich.console import Console

    from inferd.api.app import create_app
    from inferd.api.logs import configure_logging
    from inferd.api.server import build_server
    from inferd.cli.models import prepare_to_serve
    from inferd.cli.serve import _quiet_libraries
    from inferd.config.settings import load_settings

    try:  # port 0: the system picks a free one when the server binds, so no other process can take it
        settings = load_settings({"model": [model], "host": "127.0.0.1", "port": 0, "log_level": "warning"})
    except (ValidationError, ValueError) as exc:
        raise fail(str(exc), 2) from None
    configure_logging(settings.log_level, settings.log_format)
    _quiet_libraries()
    name = settings.model[0].served_name
    server = thread = None
    try:
        with Console(stderr=True).status(f"Starting {name} in this process"):
            prepare_to_serve(
                settings, check_only=False
            )  # finds (or pulls, with INFERD_PULL) it; plans memory
            server = build_server(create_app(settings), settings)
            thread = threading.Thread(target=server.run, name="inferd-embedded", daemon=True)
            thread.start()
            base_url = _wait_until_ready(server, thread)
        yield base_url, name
    except KeyboardInterrupt:
        raise fail("interrupted", 130) from None
    finally:
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(30)


def _wait_until_ready(server: Any, thread: threading.Thread) -> str:
    """The embedded server's URL once ``/ready`` says its model runs (the model loads before the
    socket opens, so this is short); fails when the server thread ended instead."""
    while not server.started:
        if not thread.is_alive():
            raise fail("the embedded server could not start (see the log above)")
        time.sleep(0.05)
    import httpx

    port = server.servers[0].sockets[0].getsockname()[1]
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while httpx.get(base_url + "/ready", timeout=5).status_code != 200:
        if time.monotonic() > deadline or not thread.is_alive():
            raise fail("the embedded server did not become ready")
        time.sleep(0.1)
    return base_url


# --- inferd ps / stop ------------------------------------------------------------------------------


def ps(
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the server's JSON.")] = False,
) -> None:
    """The models the server has loaded, their memory and how long they stay."""
    with connected(url, api_key) as client:
        body = client.get("/admin/models")
    if json_output:
        typer.echo(json.dumps(body, indent=1))
        return
    from rich.console import Console
    from rich.filesize import decimal
    from rich.table import Table

    table = Table(
        "NAME", "KIND", "SIZE", "PINNED", "UNTIL", "IN FLIGHT", box=None, pad_edge=False, header_style="bold"
    )
    now = time.time()
    for entry in body["data"]:
        if entry["state"] == "unloaded":
            continue
        table.add_row(
            entry["id"], entry["kind"], decimal(entry["resident_bytes"]), "yes" if entry["pinned"] else "no",
            until(entry["state"], entry["expires_at"], now), str(entry["in_flight"]),
        )  # fmt: skip
    Console().print(table)


def until(state: str, expires_at: float | None, now: float) -> str:
    """When a model leaves memory, as ``ollama ps`` says it: "Forever", "4 minutes from now"."""
    if expires_at is None:
        return "Forever" if state == "loaded" else state.capitalize()
    seconds = expires_at - now
    if seconds < 1:
        return "Now" if seconds > -1 else "Overdue"
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count > 1 else ''} from now"
    raise AssertionError("unreachable: seconds >= 1")


def stop(
    model: Annotated[str, typer.Argument(help="A served model's name (see inferd ps).")],
    force: Annotated[
        bool, typer.Option("--force", help="Abort its requests in flight instead of waiting for them.")
    ] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Unload a model from the server's memory (a later request may load it again)."""
    body: dict = {"model": model} | ({"force": True} if force else {})
    with connected(url, api_key) as client:
        entry = client.post("/admin/models/unload", body)
    if entry["state"] == "unloaded":
        typer.echo(f"unloaded {entry['id']}")
    else:
        typer.echo(f"{entry['id']} is {entry['state']} ({entry['in_flight']} requests in flight)")


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("ps")(ps)
    app.command("stop")(stop)
