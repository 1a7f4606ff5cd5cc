"""What the engine reports per request and step."""

from __future__ import annotations

from dataclasses import dataclass

# The finish reason of a scoring request (SamplingParams.score_token_ids): its prompt was prefilled
# and scored; nothing was generated.
SCORE = "score"


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the request's top_logprobs alternatives, best first


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """A delta for one request: the tokens and text this step added, and whether it finished."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    error: Exception | None = None  # set with finish_reason "error": the client raises it
    # On the first delta of a request that asked for them: one entry per prompt token, the first
    # None (nothing predicts it).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Engine clock (time.monotonic) of the request's arrival and first scheduling: its queue time.
    arrival_time: float | None = None
    first_scheduled_time: float | None = None
    # A scoring request's result (finish_reason SCORE): the log-probability of each of its
    # score_token_ids at the prompt's last position, in the order asked.
    score_logprobs: tuple[float, ...] | None = None

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the engine's load, cheap enough to take on every metrics scrape."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # share of KV blocks in use, 0..1
    num_prefix_queries: int  # prompt tokens looked up in the prefix cache
    num_prefix_hits: int  # of those, tokens found there
    # How the cache is laid out (fixed while the engine runs): vLLM's cache_config_info, which
    # endpoint pickers read for the block size their prefix-cache scoring hashes by.
    block_size: int = 0
    num_blocks: int = 0
    cache_dtype: str = ""
    enable_prefix_caching: bool = True
    # Speculative decoding: draft tokens verified, and of those the ones the model chose too.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
