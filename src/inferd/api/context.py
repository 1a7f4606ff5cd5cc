"""What one HTTP request gathers on its way (id, key, model, tokens), visible to every layer of it.

The gateway middleware sets it; the model table view records the model, the engine observers add
tokens, and the middleware reads it all back for the access log, rate limits and metrics. Tasks the
request spawns (stream pumps) copy the context variable, so they update the same object.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field

from inferd.api.auth import Principal
from inferd.errors import PermissionDeniedError


@dataclass(slots=True, eq=False)
class RequestContext:
    request_id: str
    method: str
    path: str
    principal: Principal | None = None
    model: str | None = None
    status: int | None = None
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    is_event_stream: bool = False
    is_response_complete: bool = False  # its last body message is sent
    request_body: bytes = b""  # kept only when --log-requests is set
    response_body: bytes = b""
    # Takes tokens from the key's per-minute budget as the request is admitted (set by the gateway).
    reserve: Callable[[int, int], int] | None = None  # returns what it reserved
    num_reserved_tokens: int = 0
    # Mixed into the prefix cache's block hashes: requests share cached prompts only within a salt.
    cache_salt: str | None = None
    # Run once the response has ended, however it ended (the model table's leases on engines).
    on_finish: list[Callable[[], None]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_completion_tokens


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "inferd_request", default=None
)


def current_context() -> RequestContext | None:
    return _current.get()


def current_request_id() -> str:
    context = _current.get()
    return context.request_id if context is not None else "-"


def enter(context: RequestContext) -> contextvars.Token:
    return _current.set(context)


def leave(token: contextvars.Token) -> None:
    _current.reset(token)


def add_tokens(num_prompt: int = 0, num_completion: int = 0) -> None:
    """Count tokens against the current request (no-op outside one)."""
    context = _current.get()
    if context is not None:
        context.num_prompt_tokens += num_prompt
        context.num_completion_tokens += num_completion


def current_cache_salt() -> str | None:
    context = _current.get()
    return context.cache_salt if context is not None else None


def reserve_tokens(num_tokens: int, num_flexible: int = 0) -> None:
    """Reserve the tokens the current request can use before it is queued: ``num_tokens`` in full,
    ``num_flexible`` more as far as the key's budget goes. Raises RateLimitError when the budget
    has not got them (no-op outside a request)."""
    context = _current.get()
    if context is not None and context.reserve is not None:
        context.num_reserved_tokens += context.reserve(num_tokens, num_flexible)


def require_admin(action: str) -> None:
    """PermissionDeniedError unless the current request's key may manage models: a tenant's key must
    not unload, pin or delete what other keys use (no-op outside a request)."""
    context = _current.get()
    principal = context.principal if context is not None else None
    if principal is not None and not principal.admin:
        raise PermissionDeniedError(
            f"this API key may not {action}: that changes models every key shares (an admin key may: "
            "`admin: true` in its API key settings)"
        )
