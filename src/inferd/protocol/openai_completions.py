"""OpenAI ``/v1/completions``."""

from __future__ import annotations

from dataclasses import replace

from pydantic import Field, field_validator, model_validator

from inferd.llm.params import SamplingParams
from inferd.protocol.common import EncodeInput, as_list
from inferd.protocol.limits import MAX_COMPLETION_PROMPTS
from inferd.protocol.openai_chat import StreamOptions
from inferd.protocol.openai_sampling import SamplingFields


class CompletionRequest(SamplingFields):
    prompt: EncodeInput
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    stream_options: StreamOptions | None = None

    @field_validator("prompt")
    @classmethod
    def _check_num_prompts(cls, value: str | list) -> str | list:
        # Each prompt is tokenised before the engine's capacity check can refuse the request.
        num_prompts = len(as_list(value))
        if num_prompts > MAX_COMPLETION_PROMPTS:
            raise ValueError(f"at most {MAX_COMPLETION_PROMPTS} prompts are allowed, got {num_prompts}")
        return value

    @model_validator(mode="after")
    def _check_best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        return self

    def prompts(self) -> list[str] | list[list[int]]:
        return as_list(self.prompt)

    def to_sampling_params(self, seed_offset: int = 0) -> SamplingParams:
        params = self.sampling_params(
            max_tokens=self.max_tokens, logprobs=self.logprobs, seed_offset=seed_offset
        )
        if self.echo and self.logprobs is not None:
            params = replace(params, prompt_logprobs=self.logprobs)
        return params

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)
