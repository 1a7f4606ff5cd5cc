"""Chat completions: messages → prompt → choices, streamed as OpenAI's chunk sequence or collected."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from starlette.responses import Response

from inferd.api.responses import FastJSONResponse
from inferd.api.serving.generation import (
    Choice,
    check_n,
    collect,
    new_id,
    now,
    off_loop,
    run_choices,
    token_text,
    usage,
)
from inferd.api.serving.reasoning import (
    CLOSE,
    OPEN,
    ReasoningParser,
    ReplyStart,
    SplitText,
    reply_start,
    think_tokens,
)
from inferd.api.serving.structured import check_constraint, response_guide
from inferd.api.serving.tool_parser import ParsedText, ToolCallParser
from inferd.api.serving.tools import ToolPlan, prepare_tool_guide, prepare_tool_messages, prepare_tool_plan
from inferd.api.streaming import sse_response
from inferd.errors import InvalidRequestError
from inferd.llm.client import LLMClient
from inferd.llm.outputs import TokenLogprob
from inferd.llm.params import Guide
from inferd.protocol.openai_chat import ChatCompletionRequest, num_message_chars


@dataclass(slots=True)
class PreparedChat:
    """A chat request made ready for the engine, and what reading its replies needs."""

    prompt: list[int]
    tools: ToolPlan | None  # None: no tools, or tool calls are not parsed (tool_choice "none")
    reply_start: ReplyStart | None  # None: the model does not reason
    guide: Guide | None = None
    keep_special_tokens: bool = False  # a marker the parsers read is a special token


def prepare_chat(body: ChatCompletionRequest, client: LLMClient) -> PreparedChat:
    """The prompt's token ids, tool plan and grammar: CPU work (template rendering, tokenising,
    grammar checks) run off the event loop."""
    check_template_kwargs(body.chat_template_kwargs)
    # The template only adds to the messages' text: over the limit already, nothing is rendered.
    client.check_prompt_chars(num_message_chars(body.messages), "messages")
    tokenizer = client.tokenizer
    plan = prepare_tool_plan(body.tools, body.tool_choice, body.parallel_tool_calls, tokenizer.chat_template)
    messages, tools = _messages(body), body.tools
    if plan is not None:
        messages, tools = prepare_tool_messages(messages, plan)
    prompt = client.render_chat(
        messages,
        add_generation_prompt=body.add_generation_prompt,
        tools=tools,
        template_kwargs=body.chat_template_kwargs,
    )
    think = think_tokens(tokenizer)
    start = reply_start(think, prompt, client.decode) if think else None
    chat = PreparedChat(prompt, plan if plan and plan.choice != "none" else None, start)
    # A grammar applies once the reasoning is over (from the first token when the prompt closed it).
    _add_guide(chat, body, client, (think.close_id,) if think and start is not ReplyStart.ANSWER else ())
    if chat.guide is not None and start is ReplyStart.EITHER:
        # A model free to skip thinking would never reach the grammar: open the block it would
        # open (Qwen3 thinks unless told not to).
        chat.prompt = prompt + client.encode(OPEN + "\n", add_special_tokens=False)
        chat.reply_start = ReplyStart.THINKING
    markers = [*(_markers(chat.tools) if chat.tools else ()), *((OPEN, CLOSE) if think else ())]
    chat.keep_special_tokens = _has_special(tokenizer, markers)
    return chat


def _add_guide(
    chat: PreparedChat, body: ChatCompletionRequest, client: LLMClient, after: tuple[int, ...]
) -> None:
    """The grammar of the reply. A forced call is the whole reply: no response format applies
    (one the request sets must be valid all the same). Otherwise a response format wins over "auto": the reply follows the format, and no calls are
    parsed from it."""
    if chat.tools is not None and chat.tools.is_forced:
        check_constraint(body)
    else:
        chat.guide = response_guide(body, client, after)
        if chat.guide is not None:
            chat.tools = None
    if chat.tools is not None:
        chat.guide = _tool_guide(chat.tools, client, after)


def _tool_guide(plan: ToolPlan, client: LLMClient, start_after: tuple[int, ...]) -> Guide | None:
    vocab = client.tokenizer.get_added_vocab()
    guide = prepare_tool_guide(plan, {m: vocab[m] for m in _markers(plan) if m in vocab}, start_after)
    if guide is not None:
        try:
            client.check_guide(guide)
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"the tools cannot be enforced: {exc.message}", param="tools") from None
    return guide


def _markers(plan: ToolPlan) -> list[str]:
    """The format's markers that may be tokens of their own (Mistral's "]" is plain JSON)."""
    return [m for m in (plan.format.marker, plan.format.close) if len(m) > 1]


def _has_special(tokenizer, texts: list[str]) -> bool:
    """Whether one of ``texts`` is a special token, which decoding would skip."""
    vocab = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    return any(t in vocab and decoder[vocab[t]].special for t in texts)


def _messages(body: ChatCompletionRequest) -> list[dict]:
    messages = []
    for i, message in enumerate(body.messages):
        part = message.non_text_part()
        if part is not None:
            raise InvalidRequestError(
                f"messages[{i}] has a {part} part, but this model does not accept images or audio; "
                "send text parts only",
                param=f"messages[{i}].content",
            )
        messages.append(message.model_dump(exclude_none=True) | {"content": message.text() or ""})
    return messages


async def chat_completion(body: ChatCompletionRequest, model_name: str, client: LLMClient) -> Response:
    check_n(body.n, client)
    chat = await off_loop(prepare_chat, body, client, size=_size(body))
    params = [_sampling_params(body, chat, i) for i in range(body.n)]
    request_id = new_id("chatcmpl")
    outputs = run_choices(client, [chat.prompt], params, request_id)
    if body.stream:
        return sse_response(_stream(body, model_name, client, request_id, outputs, chat))
    choices = await collect(outputs, body.n)
    return FastJSONResponse(
        {
            "id": request_id,
            "object": "chat.completion",
            "created": now(),
            "model": model_name,
            "choices": [_choice(i, c, client, body.logprobs, chat) for i, c in enumerate(choices)],
            "usage": usage(choices),
        }
    )


def _size(body: ChatCompletionRequest) -> int | None:
    """The characters a chat's rendering handles, when that is all it costs (no tools, few
    messages: a template's loops run over those); None sends the work off the loop."""
    if body.tools or body.chat_template_kwargs or body.constraints() or len(body.messages) > 64:
        return None
    return num_message_chars(body.messages)


def _sampling_params(body: ChatCompletionRequest, chat: PreparedChat, index: int):
    params = body.to_sampling_params(seed_offset=index)
    if chat.guide is not None:
        params = replace(params, guide=chat.guide)
    if chat.keep_special_tokens:
        params = replace(params, skip_special_tokens=False)
    return params


class ReplyParser:
    """One choice's text, delta by delta: reasoning first (for a reasoning model), then content
    and tool calls (when the request's tools are parsed)."""

    def __init__(self, chat: PreparedChat) -> None:
        self._reasoning = ReasoningParser(chat.reply_start) if chat.reply_start else None
        self._tools = ToolCallParser(chat.tools.format) if chat.tools else None

    @property
    def num_calls(self) -> int:
        return self._tools.num_calls if self._tools else 0

    def feed(self, text: str, *, final: bool = False) -> tuple[str, ParsedText]:
        """The reasoning, content and call pieces a delta adds (``final``: the reply's last one,
        which releases what the parsers still hold)."""
        split = self._reasoning.feed(text) if self._reasoning else SplitText(content=text)
        if final and self._reasoning:
            rest = self._reasoning.finish()
            split = SplitText(split.reasoning + rest.reasoning, split.content + rest.content)
        if self._tools is None:
            return split.reasoning, ParsedText(split.content)
        parsed = self._tools.feed(split.content)
        if final:
            rest = self._tools.finish()
            parsed.content += rest.content
            for call in rest.calls:
                parsed.add_call(call)
        return split.reasoning, parsed


def _finish_reason(reason: str | None, parser: ReplyParser) -> str | None:
    return "tool_calls" if reason == "stop" and parser.num_calls else reason


def _choice(index: int, choice: Choice, client: LLMClient, logprobs: bool, chat: PreparedChat) -> dict:
    parser = ReplyParser(chat)
    reasoning, parsed = parser.feed(choice.text, final=True)
    message = {"role": "assistant", "content": parsed.content, "refusal": None}
    if chat.reply_start is not None:
        message |= {"reasoning_content": reasoning or None, "reasoning": reasoning or None}
    if parsed.calls:  # whole: one delta per call
        calls = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in parsed.calls
        ]
        message |= {"content": parsed.content or None, "tool_calls": calls}
    return {
        "index": index,
        "message": message,
        "logprobs": {"content": _logprobs(choice.logprobs, client), "refusal": None} if logprobs else None,
        "finish_reason": _finish_reason(choice.finish_reason, parser),
    }


def _logprobs(entries: list[TokenLogprob], client: LLMClient) -> list[dict]:
    def item(token_id: int, logprob: float) -> dict:
        text = token_text(client, token_id)
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode())}

    return [item(e.token_id, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]


async def _stream(body, model_name, client, request_id, outputs, chat: PreparedChat) -> AsyncIterator[dict]:
    created = now()
    include_usage = body.include_usage

    def chunk(choices: list[dict], **extra) -> dict:
        event = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_name,
            "choices": choices,
        }
        return event | ({"usage": None} if include_usage else {}) | extra

    def delta(index: int, content: dict, finish_reason=None, logprobs=None) -> dict:
        return {"index": index, "delta": content, "logprobs": logprobs, "finish_reason": finish_reason}

    choices = [Choice() for _ in range(body.n)]
    parsers = [ReplyParser(chat) for _ in range(body.n)]
    started = False
    async for index, output in outputs:
        if not started:
            # The role chunks go out with the first token, as vLLM's do: a stream's first byte
            # means the engine has run it (a request still queued has sent nothing, so an
            # ingress may retry it elsewhere), and a client's TTFT is the model's.
            started = True
            for i in range(body.n):
                yield chunk([delta(i, {"role": "assistant", "content": ""})])
        choices[index].add(output)
        logprobs = None
        if body.logprobs and output.logprobs:
            logprobs = {"content": _logprobs(output.logprobs, client), "refusal": None}
        reasoning, parsed = parsers[index].feed(output.new_text, final=output.finish_reason is not None)
        content = _delta_content(reasoning, parsed)
        if content or logprobs:
            yield chunk([delta(index, content, logprobs=logprobs)])
        if output.finish_reason:
            yield chunk(
                [delta(index, {}, finish_reason=_finish_reason(output.finish_reason, parsers[index]))]
            )
    if include_usage:
        yield chunk([], usage=usage(choices))


def _delta_content(reasoning: str, parsed: ParsedText) -> dict:
    """A stream delta's fields: reasoning under both names, content, and OpenAI's call pieces (a
    call's first piece with its id, type and name)."""
    content: dict = {"reasoning_content": reasoning, "reasoning": reasoning} if reasoning else {}
    if parsed.content:
        content["content"] = parsed.content
    if parsed.calls:
        content["tool_calls"] = [
            {"index": c.index, "function": {"arguments": c.arguments}}
            if c.id is None
            else {
                "index": c.index,
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for c in parsed.calls
        ]
    return content


# The template variables a client may set: the switches model families document for their chat
# templates (Qwen3's, GLM-4.5's and SmolLM3's enable_thinking, DeepSeek-V3.1's and Granite's
# thinking, gpt-oss's reasoning_effort, Llama 3.1's tools_in_user_message and date_string). Never
# a template or an argument of the renderer (chat_template would run the client's Jinja code).
TEMPLATE_KWARGS = frozenset(
    {"enable_thinking", "thinking", "reasoning_effort", "tools_in_user_message", "date_string"}
)
_MAX_TEMPLATE_STRING = 64


def check_template_kwargs(kwargs: dict | None) -> None:
    """Only the allowed template variables, each a plain scalar (a short string at most)."""
    for name, value in (kwargs or {}).items():
        if name not in TEMPLATE_KWARGS:
            raise InvalidRequestError(
                f"chat_template_kwargs may hold only {', '.join(sorted(TEMPLATE_KWARGS))}; {name!r} is not "
                "allowed (this server renders the model's own chat template and no other)",
                param="chat_template_kwargs",
            )
        if not isinstance(value, bool | int | float | str | None) or len(str(value)) > _MAX_TEMPLATE_STRING:
            raise InvalidRequestError(
                f"chat_template_kwargs[{name!r}] must be a boolean, a number or a string of at most "
                f"{_MAX_TEMPLATE_STRING} characters",
                param="chat_template_kwargs",
            )
