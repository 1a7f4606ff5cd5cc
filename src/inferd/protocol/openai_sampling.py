"""Sampling fields shared by OpenAI's chat and completions requests, with vLLM-style extensions."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from inferd.llm.params import SamplingParams
from inferd.protocol.common import WireModel
from inferd.protocol.limits import (
    MAX_CHOICE_CHARS,
    MAX_CHOICES,
    MAX_GRAMMAR_CHARS,
    MAX_JSON_DEPTH,
    MAX_LOGIT_BIAS,
    MAX_REGEX_CHARS,
    MAX_SCHEMA_CHARS,
    MAX_SCHEMA_DESCRIPTION_CHARS,
    MAX_SCHEMA_NAME_CHARS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOKEN_ID,
    MAX_WHITESPACE_PATTERN_CHARS,
    SEED_RANGE,
    at_most,
    is_nested_deeper,
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


def _check_schema(value: Any) -> Any:
    """A JSON schema: an object, or (as vLLM takes it) the JSON text of one; its size and nesting
    are bounded before anything walks it."""
    if isinstance(value, str):
        if len(value) > MAX_SCHEMA_CHARS:
            raise ValueError(
                f"a JSON schema may have at most {MAX_SCHEMA_CHARS} characters, got {len(value)}"
            )
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as exc:  # the C scanner recurses per nesting level
            raise ValueError(f"a JSON schema given as a string must be valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError("a JSON schema must be a JSON object")
    if is_nested_deeper(value, MAX_JSON_DEPTH):
        raise ValueError(f"a JSON schema may nest at most {MAX_JSON_DEPTH} levels of lists and objects")
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False))
    if size > MAX_SCHEMA_CHARS:
        raise ValueError(f"a JSON schema may have at most {MAX_SCHEMA_CHARS} characters as JSON, got {size}")
    return value


JsonSchema = Annotated[dict[str, Any], BeforeValidator(_check_schema)]
Regex = Annotated[str, Field(max_length=MAX_REGEX_CHARS)]
Grammar = Annotated[str, Field(min_length=1, max_length=MAX_GRAMMAR_CHARS)]
Choices = Annotated[
    list[Annotated[str, Field(max_length=MAX_CHOICE_CHARS)]],
    Field(min_length=1, max_length=MAX_CHOICES),
    at_most(MAX_CHOICES, "choices"),
]
WhitespacePattern = Annotated[str, Field(min_length=1, max_length=MAX_WHITESPACE_PATTERN_CHARS)]


@dataclass(frozen=True, slots=True)
class Constraint:
    """One structured-output constraint as the request states it, before it becomes a grammar."""

    param: str  # the wire field it came from, named in errors
    kind: Literal["json_schema", "regex", "choice", "grammar"]
    value: Any  # a schema (dict), a regex or a grammar (str), or the choices (list[str])
    strict: bool = False  # every schema keyword must be enforced (OpenAI's json_schema.strict)
    whitespace_pattern: str | None = None  # the JSON's whitespace, at each place it may go
    is_compact: bool = False  # no whitespace in the JSON at all
    is_closed: bool = False  # objects whose schema leaves additionalProperties out get none


# The schema of any JSON object: OpenAI's JSON mode.
ANY_OBJECT: dict[str, Any] = {"type": "object"}


# OpenAI's response_format (components ResponseFormatText, ResponseFormatJsonObject and
# ResponseFormatJsonSchema of its OpenAPI description), on completions as well, as vLLM has it.
class ResponseFormatText(WireModel):
    type: Literal["text"]

    def constraints(self) -> list[Constraint]:
        return []


class ResponseFormatJsonObject(WireModel):
    type: Literal["json_object"]

    def constraints(self) -> list[Constraint]:
        return [Constraint("response_format", "json_schema", ANY_OBJECT)]


class JsonSchemaFormat(WireModel):
    name: Annotated[str, Field(max_length=MAX_SCHEMA_NAME_CHARS)]
    description: Annotated[str, Field(max_length=MAX_SCHEMA_DESCRIPTION_CHARS)] | None = None
    # No schema: any JSON value.
    schema_: JsonSchema | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatJsonSchema(WireModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat

    def constraints(self) -> list[Constraint]:
        spec = self.json_schema
        schema = {} if spec.schema_ is None else spec.schema_
        return [Constraint("response_format", "json_schema", schema, strict=bool(spec.strict))]


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")
]


class StructuredOutputs(WireModel):
    """vLLM's ``structured_outputs`` (its StructuredOutputsParams): one constraint, and options for
    JSON's whitespace and objects."""

    json_: JsonSchema | None = Field(None, alias="json")
    regex: Regex | None = None
    choice: Choices | None = None
    grammar: Grammar | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: WhitespacePattern | None = None
    structural_tag: Any = None

    @field_validator("structural_tag")
    @classmethod
    def _refuse_structural_tag(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("structural_tag is not supported; use json, regex, choice or grammar")
        return value

    @model_validator(mode="after")
    def _check_one(self) -> StructuredOutputs:
        if not self.constraints():
            raise ValueError("structured_outputs needs one of json, regex, choice, grammar or json_object")
        return self

    def constraints(self) -> list[Constraint]:
        values = [
            ("json", "json_schema", self.json_),
            ("json_object", "json_schema", ANY_OBJECT if self.json_object else None),
            ("regex", "regex", self.regex),
            ("choice", "choice", self.choice),
            ("grammar", "grammar", self.grammar),
        ]
        return [
            Constraint(
                f"structured_outputs.{name}",
                kind,
                value,
                whitespace_pattern=self.whitespace_pattern,
                is_compact=self.disable_any_whitespace,
                is_closed=self.disable_additional_properties,
            )
            for name, kind, value in values
            if value is not None
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
    # Structured output: OpenAI's response_format; vLLM's structured_outputs, and the guided_*
    # fields it had before (removed in vLLM 0.12, still sent by clients written for it).
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: JsonSchema | None = None
    guided_regex: Regex | None = None
    guided_choice: Choices | None = None
    guided_grammar: Grammar | None = None
    guided_whitespace_pattern: WhitespacePattern | None = None
    # Accepted and ignored: llguidance is this server's only grammar engine.
    guided_decoding_backend: str | None = None

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

    def constraints(self) -> list[Constraint]:
        """Every structured-output constraint the request sets (a valid request sets one at most;
        the serving layer refuses more, naming them)."""
        found = self.response_format.constraints() if self.response_format else []
        if self.structured_outputs is not None:
            found += self.structured_outputs.constraints()
        guided = [
            ("guided_json", "json_schema", self.guided_json),
            ("guided_regex", "regex", self.guided_regex),
            ("guided_choice", "choice", self.guided_choice),
            ("guided_grammar", "grammar", self.guided_grammar),
        ]
        pattern = self.guided_whitespace_pattern
        found += [Constraint(p, k, v, whitespace_pattern=pattern) for p, k, v in guided if v is not None]
        return found

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
