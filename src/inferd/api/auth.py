"""API keys: who is calling, which models they may use, their rate limits and concurrency cap."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from inferd.config.access import ApiKeySpec
from inferd.errors import AuthenticationError


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller a key stands for (``anonymous`` when the server has no keys)."""

    name: str
    models: frozenset[str] | None = None  # None: every served model
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None  # None: no cap
    admin: bool = True  # may manage the shared models (the anonymous caller of a keyless server may)

    def can_use(self, model_name: str) -> bool:
        return self.models is None or model_name in self.models


class KeyRing:
    """Checks the key a request presents against the configured ones in constant time."""

    def __init__(
        self,
        specs: list[ApiKeySpec],
        *,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        max_concurrent_requests: int | None = None,
    ) -> None:
        self.anonymous = Principal(
            "anonymous", None, requests_per_minute, tokens_per_minute, max_concurrent_requests
        )
        self._keys = [
            (
                _digest(spec.key.get_secret_value().encode()),
                Principal(
                    spec.display_name,
                    frozenset(spec.models) if spec.models is not None else None,
                    spec.requests_per_minute or requests_per_minute,
                    spec.tokens_per_minute or tokens_per_minute,
                    spec.max_concurrent_requests or max_concurrent_requests,
                    spec.is_admin,
                ),
            )
            for spec in specs
        ]

    @property
    def is_enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, headers: list[tuple[bytes, bytes]]) -> Principal:
        """The principal of the presented key; AuthenticationError when it is missing or unknown."""
        if not self._keys:
            return self.anonymous
        presented = presented_key(headers)
        if presented is None:
            raise AuthenticationError(
                "an API key is required: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
            )
        digest = _digest(presented)
        found = None
        for key_digest, principal in self._keys:  # no early exit: every key costs the same
            if hmac.compare_digest(key_digest, digest):
                found = principal
        if found is None:
            raise AuthenticationError("incorrect API key provided")
        return found


def presented_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The key from ``Authorization: Bearer`` or, for Cohere-style clients, ``x-api-key``."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value.strip():
            return value.strip()
    return None


def _digest(key: bytes) -> bytes:
    # Comparing digests keeps the comparison's time independent of the keys' lengths too.
    return hashlib.sha256(key).digest()
