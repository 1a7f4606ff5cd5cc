"""Per-request state of the LLM engine (a ``Sequence`` in nano-vllm's words)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from inferd.llm.params import SamplingParams


class RequestStatus(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # the client went away
    ERROR = "error"  # this request failed; the engine goes on


@dataclass(slots=True, eq=False)
class Request:
    """A prompt and what has been generated for it; ``num_computed_tokens`` catches up with
    ``num_tokens`` under the scheduler's budget — prefill, chunked prefill, decode and recompute
    after preemption are all that one rule."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: never past the context limit
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    is_prefix_checked: bool = False
    prompt_logprobs: list = field(default_factory=list)  # TokenLogprob per prompt position > 0
    # Who may share this request's prefix-cache blocks: only requests with the same salt (None
    # included) do, so cached_tokens cannot tell one tenant whether another's prompt is cached.
    cache_salt: str | None = None
    # Tokens proposed to follow token_ids (speculative decoding), verified in the next step with the
    # last token; set by the engine before each step, empty when it proposes none.
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
