"""Text completions: prompts (text or token ids) × n choices, echo and integer logprobs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from itertools import accumulate

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
from inferd.api.serving.structured import response_guide
from inferd.api.streaming import sse_response
from inferd.errors import InvalidRequestError
from inferd.llm.client import LLMClient
from inferd.llm.outputs import TokenLogprob
from inferd.llm.params import Guide
from inferd.protocol.openai_completions import CompletionRequest


def _echoes(client: LLMClient, prompts: list[list[int]]) -> list[str]:
    return [client.decode(p) for p in prompts]


def prepare_prompts(body: CompletionRequest, client: LLMClient) -> tuple[list[list[int]], Guide | None]:
    """The prompts' token ids and the grammar the output follows, if any: CPU work (tokenising,
    grammar checks) run off the event loop."""
    if body.suffix:
        raise InvalidRequestError(
            "this model cannot fill in the middle: suffix is not supported", param="suffix"
        )
    prompts = body.prompts()
    if not prompts:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    guide = response_guide(body, client)
    return [client.encode(p) if isinstance(p, str) else list(p) for p in prompts], guide


async def completion(body: CompletionRequest, model_name: str, client: LLMClient) -> Response:
    check_n(body.n, client)
    if body.max_tokens == 0:
        raise InvalidRequestError("max_tokens must be at least 1", param="max_tokens")
    text_size = sum(len(p) if isinstance(p, str) else 8 * len(p) for p in body.prompts())
    # A grammar's check compiles it against the vocabulary: never inline.
    size = None if body.constraints() else text_size
    prompts, guide = await off_loop(prepare_prompts, body, client, size=size)
    # Before the requests start: nothing may await between their submission and the first read.
    echoes = await off_loop(_echoes, client, prompts) if body.echo else [""] * len(prompts)
    params = [replace(body.to_sampling_params(seed_offset=i), guide=guide) for i in range(body.n)]
    request_id = new_id("cmpl")
    outputs = run_choices(client, prompts, params, request_id)
    if body.stream:
        return sse_response(_stream(body, model_name, client, request_id, outputs, prompts, echoes))
    choices = await collect(outputs, len(prompts) * body.n)
    return FastJSONResponse(
        {
            "id": request_id,
            "object": "text_completion",
            "created": now(),
            "model": model_name,
            "choices": [
                {
                    "index": i,
                    "text": echoes[i // body.n] + c.text,
                    "logprobs": (
                        _logprobs(c, client, prompts[i // body.n] if body.echo else None)
                        if body.logprobs is not None
                        else None
                    ),
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(choices)
            ],
            "usage": usage(choices, len(prompts)),
        }
    )


def _logprobs(choice: Choice, client: LLMClient, prompt_ids: list[int] | None = None) -> dict:
    """OpenAI's legacy logprobs object; with echo (``prompt_ids``) the prompt's tokens come first,
    the first without a logprob (nothing predicts it)."""
    entries: list[tuple[int, TokenLogprob | None]] = []
    if prompt_ids is not None:
        scored = choice.prompt_logprobs or [None] * len(prompt_ids)
        entries.extend(zip(prompt_ids, scored))
    entries.extend((e.token_id, e) for e in choice.logprobs)
    tokens = [token_text(client, token_id) for token_id, _ in entries]
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob if e is not None else None for _, e in entries],
        "top_logprobs": [
            {token_text(client, t): lp for t, lp in e.top} if e is not None else None for _, e in entries
        ],
        "text_offset": list(accumulate((len(t) for t in tokens[:-1]), initial=0)),
    }


async def _stream(body, model_name, client, request_id, outputs, prompts, echoes) -> AsyncIterator[dict]:
    created = now()

    def chunk(choices: list[dict], **extra) -> dict:
        event = {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": model_name,
            "choices": choices,
        }
        return event | ({"usage": None} if body.include_usage else {}) | extra

    choices = [Choice() for _ in range(len(echoes) * body.n)]
    started = set()
    async for index, output in outputs:
        choices[index].add(output)
        text, echoed = output.new_text, None
        if index not in started:
            started.add(index)
            text = echoes[index // body.n] + text
            echoed = prompts[index // body.n] if body.echo else None
        logprobs = None
        if body.logprobs is not None and output.logprobs:
            delta = Choice(logprobs=list(output.logprobs), prompt_logprobs=output.prompt_logprobs)
            logprobs = _logprobs(delta, client, echoed)
        yield chunk(
            [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": output.finish_reason}]
        )
    if body.include_usage:
        yield chunk([], usage=usage(choices, len(echoes)))
