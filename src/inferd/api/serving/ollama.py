"""Ollama's API on the OpenAI pipeline: an Ollama request becomes a ``ChatCompletionRequest`` and goes
through the same rendering, checks, grammar, reasoning split and tool parsing (``serving.chat``);
the deltas come back as Ollama's newline-delimited JSON objects, or one object."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import orjson
from pydantic import ValidationError
from starlette.responses import Response, StreamingResponse

from inferd.api.responses import FastJSONResponse
from inferd.api.serving.chat import PreparedChat, ReplyParser, prepare_chat
from inferd.api.serving.generation import new_id, off_loop, run_choices
from inferd.api.serving.structured import response_guide
from inferd.errors import InferdError, InputTooLongError, InvalidRequestError, ModelLoadError
from inferd.llm.client import LLMClient
from inferd.protocol.ollama import ChatRequest, GenerateRequest, Options
from inferd.protocol.openai_chat import ChatCompletionRequest

NDJSON = "application/x-ndjson"
_EFFORTS = ("low", "medium", "high")


def rfc3339(unix: float | None = None) -> str:
    """Ollama's timestamps: RFC 3339 in UTC."""
    moment = datetime.now(UTC) if unix is None else datetime.fromtimestamp(unix, UTC)
    return moment.isoformat().replace("+00:00", "Z")


def digest_of(path: Path) -> str:
    """A stable stand-in for Ollama's manifest digest: a hash of where the weights are."""
    return hashlib.sha256(str(path).encode()).hexdigest()


def ndjson_response(objects: AsyncIterator[dict]) -> StreamingResponse:
    """One JSON object per line; a failure after the headers is a last ``{"error": ...}`` line,
    which Ollama's clients raise."""

    async def encode() -> AsyncIterator[bytes]:
        try:
            async for obj in objects:
                yield orjson.dumps(obj) + b"\n"
        except InferdError as exc:
            yield orjson.dumps({"error": exc.message}) + b"\n"

    return StreamingResponse(encode(), media_type=NDJSON, headers={"Cache-Control": "no-cache"})


@dataclass(slots=True)
class Timing:
    """Where a request's time went, as Ollama reports it (nanoseconds)."""

    start: int = field(default_factory=time.perf_counter_ns)
    load: int = 0
    first_token: int | None = None

    def durations(self, prompt_tokens: int, output_tokens: int) -> dict:
        end = time.perf_counter_ns()
        submitted = self.start + self.load
        first = self.first_token or end
        return {
            "total_duration": end - self.start,
            "load_duration": self.load,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": max(first - submitted, 0),
            "eval_count": output_tokens,
            "eval_duration": max(end - first, 0),
        }


# -- request conversion ---------------------------------------------------------------------------


def chat_request(body: ChatRequest) -> ChatCompletionRequest:
    """The OpenAI request an Ollama chat means."""
    return _openai_request(
        body,
        [_message(i, m.model_dump(exclude_none=True)) for i, m in enumerate(body.messages)],
        tools=body.tools,
    )


def generate_request(body: GenerateRequest) -> ChatCompletionRequest:
    """``/api/generate`` as a one-turn chat (system, then the prompt as the user's message)."""
    if body.template:
        raise InvalidRequestError(
            "template is not supported: this server renders the model's own chat template only",
            param="template",
        )
    if body.suffix:
        raise InvalidRequestError(
            "this model cannot fill in the middle: suffix is not supported", param="suffix"
        )
    if body.images:
        raise InvalidRequestError("this model does not accept images", param="images")
    if body.context:
        raise InvalidRequestError(
            "context is not supported; send the conversation's turns to /api/chat instead", param="context"
        )
    system = [{"role": "system", "content": body.system}] if body.system else []
    return _openai_request(body, [*system, {"role": "user", "content": body.prompt or ""}])


def _message(index: int, message: dict) -> dict:
    if message.pop("images", None):
        raise InvalidRequestError(
            f"messages[{index}] has images, but this model does not accept images",
            param=f"messages[{index}].images",
        )
    message.pop("thinking", None)  # earlier reasoning is not sent back to the model
    calls = message.get("tool_calls")
    if calls:  # Ollama's arguments are objects; OpenAI's are JSON text (turned back for templates)
        message["tool_calls"] = [_openai_call(index, i, c) for i, c in enumerate(calls)]
    if message.get("role") == "tool" and "tool_call_id" not in message and "tool_name" in message:
        message["name"] = message["tool_name"]
    return message


def _openai_call(message: int, index: int, call: dict) -> dict:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequestError(
            'a tool call must be {"function": {"name": ..., "arguments": {...}}}',
            param=f"messages[{message}].tool_calls[{index}]",
        )
    arguments = function.get("arguments") or {}
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call.get("id") or f"call_{message}_{index}", "type": "function",
            "function": {"name": function["name"], "arguments": text}}  # fmt: skip


def _openai_request(
    body: ChatRequest | GenerateRequest, messages: list[dict], tools=None
) -> ChatCompletionRequest:
    options: Options = body.options
    fields: dict = {
        "model": body.model,
        "messages": messages,
        "tools": tools or None,
        "temperature": options.temperature,
        "top_p": options.top_p,
        "top_k": options.top_k,
        "min_p": options.min_p,
        "seed": options.seed,
        "stop": options.stops(),
        "repetition_penalty": options.repeat_penalty,
        "presence_penalty": options.presence_penalty,
        "frequency_penalty": options.frequency_penalty,
        "max_tokens": options.max_tokens(),
        "response_format": _response_format(body.format),
        "chat_template_kwargs": _template_kwargs(body.think),
    }
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise InvalidRequestError(f"{where}: {error['msg']}", param=where or None) from None


def _response_format(fmt) -> dict | None:
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    return None


def _template_kwargs(think) -> dict | None:
    if think is None:
        return None
    if isinstance(think, bool):
        return {"enable_thinking": think}
    if think not in _EFFORTS:
        raise InvalidRequestError(f"think must be true, false or one of {', '.join(_EFFORTS)}", param="think")
    return {"enable_thinking": True, "reasoning_effort": think}


# -- generation ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Reply:
    """What a reply has added so far: its pieces for the stream, its whole for the final object."""

    thinking: str = ""
    content: str = ""
    calls: dict[int, list[str]] = field(default_factory=dict)  # index → [name, arguments' text]
    prompt_tokens: int = 0
    output_tokens: int = 0
    done_reason: str | None = None

    def tool_calls(self) -> list[dict]:
        return [
            {"function": {"name": name, "arguments": _arguments(text)}} for name, text in self.calls.values()
        ]


def _arguments(text: str) -> dict:
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _prepare(body: ChatCompletionRequest, client: LLMClient, think, raw: str | None) -> PreparedChat:
    if raw is not None:  # generate's raw mode: the prompt as it is, no template
        client.check_prompt_chars(len(raw), "prompt")
        return PreparedChat(client.encode(raw), None, None, response_guide(body, client))
    chat = prepare_chat(body, client)
    if think and chat.reply_start is None:
        raise InvalidRequestError("this model does not support thinking", param="think")
    return chat


async def generate(
    body: ChatRequest | GenerateRequest,
    request: ChatCompletionRequest,
    model_name: str,
    client: LLMClient,
    timing: Timing,
    shape: Callable[[str, str, list[dict] | None], dict],
    raw: str | None = None,
) -> Response:
    """Run the request and answer in Ollama's shape; ``shape(thinking, content, calls)`` is a
    chat's ``message`` or generate's ``response`` fields."""
    chat = await off_loop(_prepare, request, client, body.think, raw)
    params = request.to_sampling_params()
    if chat.guide is not None:
        params = replace(params, guide=chat.guide)
    if chat.keep_special_tokens:
        params = replace(params, skip_special_tokens=False)
    params = replace(
        params, max_tokens=_max_tokens(params.max_tokens, len(chat.prompt), body.options.num_ctx, client)
    )
    outputs = run_choices(client, [chat.prompt], [params], new_id("ollama"))
    parser = ReplyParser(chat)

    def head() -> dict:
        return {"model": model_name, "created_at": rfc3339()}

    def final(reply: Reply) -> dict:
        done = {"done": True, "done_reason": reply.done_reason or "stop"}
        return done | timing.durations(reply.prompt_tokens, reply.output_tokens)

    if body.stream:

        async def stream() -> AsyncIterator[dict]:
            reply = Reply()
            async for thinking, content in _pieces(outputs, parser, timing, reply):
                if thinking or content:
                    yield head() | shape(thinking, content, None) | {"done": False}
            if reply.calls:
                yield head() | shape("", "", reply.tool_calls()) | {"done": False}
            yield head() | shape("", "", None) | final(reply)

        return ndjson_response(stream())
    reply = Reply()
    async for _ in _pieces(outputs, parser, timing, reply):
        pass
    calls = reply.tool_calls() or None
    return FastJSONResponse(head() | shape(reply.thinking, reply.content, calls) | final(reply))


def _max_tokens(asked: int | None, prompt_len: int, num_ctx: int | None, client: LLMClient) -> int | None:
    """num_ctx caps prompt + output (never above the model's context): a prompt that fills it is
    refused, and the output gets what is left."""
    if num_ctx is None or num_ctx >= client.max_model_len:
        return asked
    room = num_ctx - prompt_len
    if room < 1:
        raise InputTooLongError(
            f"the prompt has {prompt_len} tokens, which leaves no room for output within num_ctx {num_ctx}",
            limit=num_ctx,
            length=prompt_len,
            param="options.num_ctx",
        )
    return room if asked is None else min(asked, room)


async def _pieces(
    outputs: AsyncIterator, parser: ReplyParser, timing: Timing, reply: Reply
) -> AsyncIterator[tuple[str, str]]:
    """The reply's (thinking, content) deltas; its calls, counts and finish land in ``reply``."""
    async for _, output in outputs:
        if timing.first_token is None and output.new_token_ids:
            timing.first_token = time.perf_counter_ns()
        reply.prompt_tokens = output.num_prompt_tokens
        reply.output_tokens = output.num_output_tokens
        final = output.finish_reason is not None
        thinking, parsed = parser.feed(output.new_text, final=final)
        for call in parsed.calls:
            entry = reply.calls.setdefault(call.index, [call.name or "", ""])
            entry[1] += call.arguments
        reply.thinking += thinking
        reply.content += parsed.content
        if final:
            reply.done_reason = output.finish_reason
        yield thinking, parsed.content


def chat_shape(thinking: str, content: str, calls: list[dict] | None) -> dict:
    message: dict = {"role": "assistant", "content": content}
    if thinking:
        message["thinking"] = thinking
    if calls:
        message["tool_calls"] = calls
    return {"message": message}


def generate_shape(thinking: str, content: str, calls: list[dict] | None) -> dict:
    return {"response": content} | ({"thinking": thinking} if thinking else {})


# -- model listing -------------------------------------------------------------------------------


def details(path: Path) -> tuple[dict, int, dict]:
    """(Ollama's ``details``, the size on disk, the facts ``/api/show`` adds), read from the files
    without loading them: file I/O, run off the event loop."""
    from inferd.hub.inspect import inspect_model
    from inferd.memory.estimate import count_parameters, shape_from_config

    files = inspect_model(path)
    shape = shape_from_config(files.config)
    params = files.num_params or count_parameters(shape)
    arch = shape.model_type or "unknown"
    info = {
        "general.architecture": arch,
        "general.parameter_count": params,
        f"{arch}.context_length": shape.max_position_embeddings,
        f"{arch}.embedding_length": shape.hidden_size,
        f"{arch}.block_count": shape.num_layers,
    }
    return (
        {
            "parent_model": "",
            "format": "gguf" if files.is_gguf else "safetensors",
            "family": arch,
            "families": [arch],
            "parameter_size": _count(params),
            "quantization_level": (files.stored_dtype or "").removeprefix("GGUF ").upper(),
        },
        files.size_bytes,
        info,
    )


def _count(n: int | None) -> str:
    if not n:
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


async def model_details(path: Path) -> tuple[dict, int, dict]:
    try:
        return await asyncio.to_thread(details, path)
    except (InferdError, OSError, ValueError, KeyError, TypeError):  # unreadable files: listed bare
        return {"format": "", "family": "", "parameter_size": "", "quantization_level": ""}, 0, {}


# -- pull -----------------------------------------------------------------------------------------


def pull_model(name: str, cache_dir: str | None, report: Callable[[dict], None]) -> None:
    """``inferd pull`` with Ollama's progress objects handed to ``report`` (blocking: run it in a
    thread). Hub files are fetched first with a progress hook, then ``hub.download.pull`` verifies
    and registers them (finding them cached)."""
    from inferd.hub.download import pull
    from inferd.hub.names import Origin, parse_model_name

    if name.startswith((".", "/", "~")):
        raise InvalidRequestError("only hub models can be pulled, not paths on the server", param="model")
    try:
        ref = parse_model_name(name)
    except ModelLoadError as exc:  # a name that names nothing: the client's mistake
        raise InvalidRequestError(exc.message, param="model") from None
    if ref.origin is Origin.LOCAL:
        raise InvalidRequestError("only hub models can be pulled, not paths on the server", param="model")
    report({"status": "pulling manifest"})
    if ref.origin is Origin.BUNDLED:
        report({"status": "success"})
        return
    pull(ref, cache_dir=cache_dir, show_progress=False, file_bar=lambda file: _bar(report, ref, file))
    report({"status": "verifying sha256 digest"})
    report({"status": "writing manifest"})
    report({"status": "success"})


def _bar(report: Callable[[dict], None], ref, file):
    """The slice of tqdm huggingface_hub's downloader uses, reporting one file's bytes as Ollama does
    (a digest per file: its sha256, or a stable stand-in for files the hub lists without one)."""
    digest = "sha256:" + (file.sha256 or hashlib.sha256(f"{ref.repo_id}/{file.name}".encode()).hexdigest())
    total = file.size or 0
    report({"status": f"pulling {digest[7:19]}", "digest": digest, "total": total, "completed": 0})

    class Bar:
        def __init__(self, *_, initial: int = 0, **__) -> None:
            self.completed = initial

        def update(self, num_bytes: int) -> None:
            self.completed += num_bytes
            status = f"pulling {digest[7:19]}"
            report({"status": status, "digest": digest, "total": total, "completed": self.completed})

        def close(self) -> None:
            if self.completed < total:  # the file was in the cache already, or sent fewer updates
                self.completed = total
                report(
                    {
                        "status": f"pulling {digest[7:19]}",
                        "digest": digest,
                        "total": total,
                        "completed": total,
                    }
                )

        def __enter__(self):
            return self

        def __exit__(self, *exc: object) -> None:
            if exc[0] is None:
                self.close()

    return Bar


async def pull_events(name: str, cache_dir: str | None) -> AsyncIterator[dict]:
    """The pull's progress objects as they come; the download runs on a thread."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    def work() -> None:
        try:
            pull_model(name, cache_dir, lambda obj: loop.call_soon_threadsafe(queue.put_nowait, obj))
        except BaseException as exc:  # noqa: BLE001 - handed to the stream, which raises it
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        loop.call_soon_threadsafe(queue.put_nowait, end)

    task = loop.run_in_executor(None, work)
    while (item := await queue.get()) is not end:
        if isinstance(item, BaseException):
            raise item
        yield item
    await task
