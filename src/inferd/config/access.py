"""What ``--api-key`` means: a key, optionally named, limited to some models and rates."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class ApiKeySpec(BaseModel):
    """One API key. On the command line it is the bare key; in a config file a mapping may add a
    ``name`` (shown in logs), the ``models`` it may use, its own rate limits, its cap on requests
    in flight and whether it may manage models (``admin``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: SecretStr = Field(min_length=1)
    name: str | None = None
    models: tuple[str, ...] | None = None  # None: every served model
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    max_concurrent_requests: int | None = Field(None, ge=1)  # None: the server's default
    # May manage the models every key shares (load, unload, pin, keep_alive, pull, delete). Default:
    # yes for a key that may use every model, no for a key limited to some.
    admin: bool | None = None

    @property
    def is_admin(self) -> bool:
        return self.admin if self.admin is not None else self.models is None

    @model_validator(mode="before")
    @classmethod
    def _bare_key(cls, value: Any) -> Any:
        return {"key": value.strip()} if isinstance(value, str) else value

    @property
    def display_name(self) -> str:
        """The name, or a short digest of the key: logs and metrics never show a key."""
        if self.name:
            return self.name
        digest = hashlib.sha256(self.key.get_secret_value().encode()).hexdigest()
        return f"key-{digest[:8]}"


def read_key_file(path: Path) -> list[ApiKeySpec]:
    """One key per line; blank lines and ``#`` comments are skipped."""
    if not path.is_file():
        raise ValueError(f"API key file {path} does not exist")
    lines = (line.strip() for line in path.read_text().splitlines())
    return [ApiKeySpec.model_validate(line) for line in lines if line and not line.startswith("#")]
