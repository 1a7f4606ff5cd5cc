"""What chat and completions share: running n choices and turning engine deltas into choices."""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from inferd.api.context import current_cache_salt, reserve_tokens
from inferd.api.streaming import merge
from inferd.errors import InvalidRequestError
from inferd.llm.client import LLMClient
from inferd.llm.outputs import RequestOutput, TokenLogprob
from inferd.llm.params import SamplingParams

T = TypeVar("T")

# Template rendering, tokenising and detokenising are CPU work proportional to what a client sent:
# they run on worker threads so the event loop keeps answering (streams, probes) meanwhile. A few
# threads at most: a burst of large prompts queues here instead of taking every core from the
# engine. A pool, not a limiter on the await: a cancelled await (the client hung up) leaves its
# thread working, and a limiter would count that thread free.
_PREPARE_THREADS = 4
_PREPARE_POOL = ThreadPoolExecutor(_PREPARE_THREADS, thread_name_prefix="inferd-prepare")


# Below this many characters the work takes well under a millisecond: cheaper inline than the
# hand-off, which waits for a thread while the compute thread's workers hold the cores.
_INLINE_CHARS = 16_384


async def off_loop(work: Callable[..., T], *args, size: int | None = None) -> T:
    """``work(*args)`` on one of the prompt threads, or inline when ``size`` (the characters it
    handles) is small; cancelling the await drops the result (and the work, when not started)."""
    if size is not None and size < _INLINE_CHARS:
        return work(*args)
    return await asyncio.get_running_loop().run_in_executor(_PREPARE_POOL, functools.partial(work, *args))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


@dataclass(slots=True)
class Choice:
    """One choice's accumulated output, for non-streamed responses and final usage."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def add(self, output: RequestOutput) -> None:
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        self.text += output.new_text
        self.token_ids.extend(output.new_token_ids)
        self.logprobs.extend(output.logprobs or ())
        self.finish_reason = output.finish_reason or self.finish_reason
        self.num_prompt_tokens = output.num_prompt_tokens
        self.num_cached_tokens = output.num_cached_tokens


def check_n(n: int, client: LLMClient) -> None:
    limit = client.engine.config.max_n
    if n > limit:
        raise InvalidRequestError(f"n is {n}, more than this server's limit of {limit}", param="n")


def run_choices(
    client: LLMClient, prompts: list[list[int]], params: list[SamplingParams], request_id: str
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Deltas of every (prompt, choice) pair, tagged with the choice's index (prompt-major). The
    requests go to the engine here, before any response is written, so their prefill overlaps the
    response's start."""
    n = len(params)
    for prompt in prompts:
        client.check_request(prompt, params[0])
    client.check_capacity(len(prompts) * n)  # a full queue refuses before a stream starts
    reserve_tokens(*_most_tokens(client, prompts, params))
    salt = current_cache_salt()
    streams = [
        client.submit(prompt, params[i], f"{request_id}-{p}-{i}", cache_salt=salt)
        for p, prompt in enumerate(prompts)
        for i in range(n)
    ]
    return merge(streams)


def _most_tokens(client: LLMClient, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[int, int]:
    """What a tokens-per-minute budget reserves at admission: (the tokens the request will surely
    be charged for or asked for — each choice's prompt, as each choice is charged for it, and its
    max_tokens — and the rest of the context for choices without max_tokens, which the budget
    reserves only as far as it goes)."""
    fixed = flexible = 0
    for prompt in prompts:
        room = client.max_model_len - len(prompt)
        fixed += len(prompt) * len(params) + sum(min(p.max_tokens, room) for p in params if p.max_tokens)
        flexible += room * sum(1 for p in params if not p.max_tokens)
    return fixed, flexible


async def collect(outputs: AsyncIterator[tuple[int, RequestOutput]], num_choices: int) -> list[Choice]:
    """Every choice's whole output, for a non-streamed response."""
    choices = [Choice() for _ in range(num_choices)]
    async for index, output in outputs:
        choices[index].add(output)
    return choices


def usage(choices: list[Choice], num_prompts: int = 1) -> dict:
    per_prompt = choices[:: max(1, len(choices) // max(1, num_prompts))]
    prompt_tokens = sum(c.num_prompt_tokens for c in per_prompt)
    completion_tokens = sum(len(c.token_ids) for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(c.num_cached_tokens for c in per_prompt)},
    }


def token_text(client: LLMClient, token_id: int) -> str:
    return client.tokenizer.decode([token_id])
