"""Error bodies of each wire family."""

from __future__ import annotations

from pydantic import BaseModel


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    """OpenAI's ``{"error": {message, type, param, code}}``."""

    error: OpenAIErrorDetail


class TEIErrorResponse(BaseModel):
    """Text Embeddings Inference's ``{"error", "error_type"}``."""

    error: str
    error_type: str


class CohereErrorResponse(BaseModel):
    """Cohere's ``{"message"}``."""

    message: str
