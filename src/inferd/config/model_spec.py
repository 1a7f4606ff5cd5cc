"""What ``--model`` means: a source (folder, file, hub id or bundled name), a served alias, a kind."""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator


class ModelKind(str, Enum):
    """What a served model is for; decides which routes accept it."""

    EMBEDDING = "embedding"
    RERANK = "rerank"
    CHAT = "chat"


_KIND_ALIASES = {
    "embed": ModelKind.EMBEDDING,
    "embedding": ModelKind.EMBEDDING,
    "embeddings": ModelKind.EMBEDDING,
    "rerank": ModelKind.RERANK,
    "reranker": ModelKind.RERANK,
    "score": ModelKind.RERANK,
    "chat": ModelKind.CHAT,
    "generate": ModelKind.CHAT,
    "llm": ModelKind.CHAT,
}


class ModelSpec(BaseModel):
    """One served model.

    The command-line form is ``SOURCE[=ALIAS][,key=value...]``, for example
    ``all-minilm-l6-v2=minilm,kind=rerank``; keys are the field names below. In a config file the
    same thing is written as a mapping.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str
    alias: str | None = None
    kind: ModelKind | None = None
    dtype: str | None = None
    device: str | None = None

    @property
    def served_name(self) -> str:
        return self.alias or self.source

    @field_validator("kind", mode="before")
    @classmethod
    def _parse_kind(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return _KIND_ALIASES[value.strip().lower()]
            except KeyError:
                names = ", ".join(k.value for k in ModelKind)
                raise ValueError(f"unknown model kind {value!r}; expected one of {names}") from None
        return value

    @model_validator(mode="before")
    @classmethod
    def _parse_cli_form(cls, value: Any) -> Any:
        return parse_model_arg(value) if isinstance(value, str) else value


def parse_model_arg(text: str) -> dict[str, str]:
    """Split ``SOURCE[=ALIAS][,key=value...]`` into field values."""
    head, *options = [part.strip() for part in text.split(",")]
    if not head:
        raise ValueError(f"model spec {text!r} has no source")
    source, _, alias = head.partition("=")
    fields: dict[str, str] = {"source": source.strip()}
    if alias.strip():
        fields["alias"] = alias.strip()
    for option in options:
        key, sep, val = option.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"model option {option!r} in {text!r} is not key=value")
        fields[key.strip()] = val.strip()
    return fields
