"""Sampling fields shared by OpenAI's chat and completions requests, with vLLM-style extensions."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field, field_validator

from inferd.llm.params import SamplingParams
from inferd.protocol.common import WireModel
from inferd.protocol.limits import (
    MAX_LOGIT_BIAS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOKEN_ID,
    SEED_RANGE,
    at_most,
)

# ASCII digits only: str.isdigit also passes "²" and "١", which int() then refuses or misreads.
_TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")

StopTokenIds = Annotated[
    list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]],
    Field(max_length=MAX_STOP_TOKEN_IDS),
    at_most(MAX_STOP_TOKEN_IDS, "stop token ids"),
]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
LogitBias = Annotated[
    dict[str, float], Field(max_length=MAX_LOGIT_BIAS), at_most(MAX_LOGIT_BIAS, "logit_bias entries")
]


class SamplingFields(WireModel):
    model: str
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: LogitBias | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    user: str | None = None
    # Extensions (vLLM's names).
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: StopTokenIds | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not _TOKEN_ID_KEY.fullmatch(token) or int(token) > MAX_TOKEN_ID:
                raise ValueError(
                    f"logit_bias keys must be token ids (decimal integers from 0 to {MAX_TOKEN_ID}), "
                    f"got {token[:20]!r}"
                )
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: object) -> object:
        # Before the union's own checks, which would report each member's complaint.
        stops = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed, got {len(stops)}")
        for stop in (s for s in stops if isinstance(s, str)):  # other types: the union says
            if not stop:
                raise ValueError("stop sequences must not be empty")
            if len(stop) > MAX_STOP_STRING_CHARS:
                raise ValueError(
                    f"stop sequences may have at most {MAX_STOP_STRING_CHARS} characters, got {len(stop)}"
                )
        return value

    def sampling_params(
        self, *, max_tokens: int | None, logprobs: int | None, seed_offset: int = 0
    ) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            seed=None if self.seed is None else self.seed + seed_offset,
            stop=tuple(stops),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )
