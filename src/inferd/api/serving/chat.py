"""Chat completions: messages → prompt → choices, streamed as OpenAI's chunk sequence or collected."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from functools import cache

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
from inferd.api.streaming import sse_response
from inferd.errors import InvalidRequestError
from inferd.llm.client import LLMClient
from inferd.llm.outputs import TokenLogprob
from inferd.protocol.openai_chat import ChatCompletionRequest, num_message_chars


def prepare_prompt(body: ChatCompletionRequest, client: LLMClient) -> list[int]:
    """The prompt's token ids: CPU work (template rendering, tokenising) run off the event loop."""
    check_template_kwargs(body.chat_template_kwargs)
    # The template only adds to the messages' text: over the limit already, nothing is rendered.
    client.check_prompt_chars(num_message_chars(body.messages), "messages")
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
    return client.render_chat(
        messages,
        add_generation_prompt=body.add_generation_prompt,
        tools=body.tools,
        template_kwargs=body.chat_template_kwargs,
    )


async def chat_completion(body: ChatCompletionRequest, model_name: str, client: LLMClient) -> Response:
    check_n(body.n, client)
    prompt = await off_loop(prepare_prompt, body, client, size=_size(body))
    params = [body.to_sampling_params(seed_offset=i) for i in range(body.n)]
    request_id = new_id("chatcmpl")
    outputs = run_choices(client, [prompt], params, request_id)
    if body.stream:
        return sse_response(_stream(body, model_name, client, request_id, outputs))
    choices = await collect(outputs, body.n)
    return FastJSONResponse(
        {
            "id": request_id,
            "object": "chat.completion",
            "created": now(),
            "model": model_name,
            "choices": [_choice(i, c, client, body.logprobs) for i, c in enumerate(choices)],
            "usage": usage(choices),
        }
    )


def _size(body: ChatCompletionRequest) -> int | None:
    """The characters a chat's rendering handles, when that is all it costs (no tools, few
    messages: a template's loops run over those); None sends the work off the loop."""
    if body.tools or body.chat_template_kwargs or len(body.messages) > 64:
        return None
    return num_message_chars(body.messages)


def _choice(index: int, choice: Choice, client: LLMClient, logprobs: bool) -> dict:
    return {
        "index": index,
        "message": {"role": "assistant", "content": choice.text, "refusal": None},
        "logprobs": {"content": _logprobs(choice.logprobs, client), "refusal": None} if logprobs else None,
        "finish_reason": choice.finish_reason,
    }


def _logprobs(entries: list[TokenLogprob], client: LLMClient) -> list[dict]:
    def item(token_id: int, logprob: float) -> dict:
        text = token_text(client, token_id)
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode())}

    return [item(e.token_id, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]


async def _stream(body, model_name, client, request_id, outputs) -> AsyncIterator[dict]:
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
    for i in range(body.n):
        yield chunk([delta(i, {"role": "assistant", "content": ""})])
    async for index, output in outputs:
        choices[index].add(output)
        logprobs = None
        if body.logprobs and output.logprobs:
            logprobs = {"content": _logprobs(output.logprobs, client), "refusal": None}
        if output.new_text or logprobs:
            yield chunk([delta(index, {"content": output.new_text}, logprobs=logprobs)])
        if output.finish_reason:
            yield chunk([delta(index, {}, finish_reason=output.finish_reason)])
    if include_usage:
        yield chunk([], usage=usage(choices))


@cache
def _reserved_template_kwargs() -> frozenset[str]:
    """What ``apply_chat_template`` takes as its own arguments: a client's kwarg of that name would
    not reach the template but replace the server's choice (``chat_template`` would run the
    client's own Jinja code, ``tokenize`` would change the return type)."""
    from transformers import PreTrainedTokenizerBase

    names = inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters
    return frozenset(n for n, p in names.items() if p.kind is not p.VAR_KEYWORD) | {"self"}


def check_template_kwargs(kwargs: dict | None) -> None:
    """Only template variables: never a template, never an argument of the renderer."""
    for name in kwargs or {}:
        if name in _reserved_template_kwargs() or not name.isidentifier():
            raise InvalidRequestError(
                f"chat_template_kwargs may hold template variables only; {name!r} is not allowed "
                "(this server renders the model's own chat template and no other)",
                param="chat_template_kwargs",
            )
