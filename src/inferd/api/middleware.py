"""The gateway every HTTP request passes: request id, drain gate, API key, per-key concurrency,
rate limit, body size and receipt deadline, request timeout; then metrics, token accounting and
one access-log line when it is done.

A pure ASGI middleware (no BaseHTTPMiddleware): streams pass through untouched, and the request's
context variable is set in the very task that runs the route.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferd.api import context as request_context
from inferd.api.auth import KeyRing, Principal
from inferd.api.concurrency import ConcurrencyLimiter
from inferd.api.context import RequestContext
from inferd.api.errors import domain_error_response, unexpected_error_response
from inferd.api.lifecycle import Flight, Lifecycle, RequestCut
from inferd.api.limits import RateLimiter
from inferd.api.metrics import Metrics
from inferd.api.streaming import DONE, error_event
from inferd.errors import (
    BodyTimeoutError,
    InferdError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ShuttingDownError,
)

access_log = logging.getLogger("inferd.access")

# No key, and answered while draining: the probes, and the playground page (it holds no secret).
_OPEN_PATHS = frozenset({"/health", "/ready", "/", "/ui", "/ui/app.js", "/ui/app.css"})
_ROUTINE_PATHS = frozenset({"/health", "/ready", "/metrics"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_REQUEST_ID = re.compile(r"^[\w.:/+=-]{1,128}$")
_MAX_LOGGED_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class GatewayPolicy:
    """What the gateway enforces, built once by the app factory."""

    keys: KeyRing
    limiter: RateLimiter
    metrics: Metrics
    lifecycle: Lifecycle
    routes: Sequence[BaseRoute]
    public_metrics: bool = False
    max_request_bytes: int = 16 * 2**20
    request_timeout: float | None = None
    body_timeout: float = 30.0
    concurrency: ConcurrencyLimiter = field(default_factory=ConcurrencyLimiter)
    log_requests: bool = False
    share_prefix_cache: bool = False  # with keys: one prefix cache for all keys (single tenant)


class _Disconnected(Exception):
    """The client left while its body was being read."""


class GatewayMiddleware:
    def __init__(self, app: ASGIApp, policy: GatewayPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context = RequestContext(_request_id(scope), scope["method"], scope["path"])
        token = request_context.enter(context)
        start = time.monotonic()
        send = self._watch(send, context)
        try:
            await self._handle(scope, receive, send, context)
        except Exception as exc:
            if context.status is not None:
                raise  # the response has begun: only closing the connection is left
            # Answered here, inside the request's context, so the log line names its request id.
            await unexpected_error_response(scope["path"], exc)(scope, receive, send)
        finally:
            self._finish(scope, context, time.monotonic() - start)
            request_context.leave(token)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, context: RequestContext) -> None:
        path = scope["path"]
        if path in _OPEN_PATHS or (path == "/metrics" and self.policy.public_metrics):
            await self.app(scope, receive, send)
            return
        if self.policy.lifecycle.is_draining and path != "/metrics":
            exc = ShuttingDownError("the server is shutting down; retry on another replica")
            await self._reject(scope, receive, send, exc)
            return
        # Tracked before its body is read: the drain waits for an upload in progress too.
        with self.policy.lifecycle.track() as flight:
            timeout = self.policy.request_timeout
            if timeout is not None:
                message = f"the request took longer than {timeout:g}s and was aborted"
                flight.cut_after(timeout, RequestTimeoutError(message))
            try:
                # Cutting the work cancels the route and its engine work: generate() aborts,
                # encoder items drop.
                await flight.run(self._admit_and_run(scope, receive, send, context, flight))
            except RequestCut as cut:
                await self._answer_cut(scope, receive, send, context, cut)

    async def _admit_and_run(
        self, scope: Scope, receive: Receive, send: Send, context: RequestContext, flight: Flight
    ) -> None:
        try:
            context.principal = self.policy.keys.authenticate(scope["headers"])
            slot = self.policy.concurrency.acquire(context.principal)
        except InferdError as exc:
            await self._reject(scope, receive, send, exc)
            return
        with slot:  # freed however the response ends: complete, failed, disconnected or cut
            try:
                self.policy.limiter.admit(context.principal)
                context.reserve = self._reserver(context.principal)
                if self.policy.keys.is_enabled and not self.policy.share_prefix_cache:
                    context.cache_salt = context.principal.name  # a key's cached prefixes are its own
                receive = await self._read_body(scope, receive, context, flight)
            except InferdError as exc:
                await self._reject(scope, receive, send, exc)
                return
            except _Disconnected:
                return
            await self.app(scope, receive, slot.releasing(send))

    async def _answer_cut(
        self, scope: Scope, receive: Receive, send: Send, context: RequestContext, cut: RequestCut
    ) -> None:
        if context.status is None:
            await self._reject(scope, receive, send, cut.reason)
        elif context.is_response_complete:
            return  # cut as it was finishing: the client has its whole answer
        elif context.is_event_stream:
            # The headers are out: the stream ends the way a failed one does, error event then [DONE].
            last = error_event(cut.reason) + DONE
            await send({"type": "http.response.body", "body": last, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            raise cut  # half a body is out: closing the connection is the only honest answer

    async def _read_body(
        self, scope: Scope, receive: Receive, context: RequestContext, flight: Flight
    ) -> Receive:
        """Read the whole body, refusing one over the limit or one that arrives too slowly;
        returns a receive that replays it."""
        if scope["method"] not in _BODY_METHODS:
            return receive
        limit = self.policy.max_request_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            raise _too_large(declared, limit)
        timeout = self.policy.body_timeout
        # A deadline for the whole body, not per chunk: a trickle of one byte a second never
        # lets a per-read timeout fire.
        late = BodyTimeoutError(f"the request body did not arrive within {timeout:g}s")
        timer = flight.cut_after(timeout, late)
        try:
            body = await _receive_all(receive, limit)
        finally:
            timer.cancel()
        if self.policy.log_requests:
            context.request_body = body[:_MAX_LOGGED_BODY]
        return _replay(body, receive)

    def _reserver(self, principal: Principal) -> Callable[[int, int], int]:
        limiter = self.policy.limiter
        return lambda num_tokens, num_flexible: limiter.reserve_tokens(principal, num_tokens, num_flexible)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, exc: InferdError) -> None:
        response = domain_error_response(scope["path"], exc)
        if isinstance(exc, (ShuttingDownError, BodyTimeoutError)):
            response.headers["Connection"] = "close"  # a body may be half-sent: start afresh
        await response(scope, receive, send)

    def _watch(self, send: Send, context: RequestContext) -> Send:
        """Note the status, add X-Request-ID, and keep the body when asked to log it."""
        keep_body = self.policy.log_requests

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                context.status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", context.request_id.encode()))
                message["headers"] = headers
                content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
                context.is_event_stream = content_type.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body":
                context.is_response_complete = not message.get("more_body", False)
                room = _MAX_LOGGED_BODY - len(context.response_body) if keep_body else 0
                if room > 0:
                    context.response_body += message.get("body", b"")[:room]
            await send(message)

        return watched

    def _finish(self, scope: Scope, context: RequestContext, duration_s: float) -> None:
        for release in context.on_finish:
            release()
        status = context.status or 499  # no response: the client went away first
        route = _route_template(scope, self.policy.routes)
        self.policy.metrics.observe_http(context.method, route, status, duration_s)
        if context.principal is not None:
            used = context.num_tokens - context.num_reserved_tokens
            self.policy.limiter.charge_tokens(context.principal, used)
        # Probes and scrapes arrive every few seconds: their successes only at debug level.
        is_routine = context.path in _ROUTINE_PATHS and status < 400
        _log_access(context, route, status, duration_s, self.policy.log_requests, is_routine)


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1").strip()
            if _REQUEST_ID.match(text):
                return text
    return uuid.uuid4().hex


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _receive_all(receive: Receive, limit: int) -> bytes:
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            raise _too_large(size, limit)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the request body has {size} bytes, more than this server's limit of {limit}"
    )


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()  # what follows the body: the disconnect
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _route_template(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The matched route's path template: bounded label values whatever paths clients send. A
    request refused before routing is matched here against the app's routes."""
    route = scope.get("route")
    if route is None:
        route = next((r for r in _flatten(routes) if r.matches(scope)[0] is Match.FULL), None)
    return getattr(route, "path", None) or "unmatched"


def _flatten(routes: Sequence[BaseRoute]) -> Iterator[BaseRoute]:
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI's included routers
        if included is not None:
            yield from _flatten(included.routes)
        else:
            yield route


def _log_access(
    context: RequestContext, route: str, status: int, duration_s: float, with_bodies: bool, is_routine: bool
) -> None:
    fields = {
        "request_id": context.request_id,
        "method": context.method,
        "route": route,
        "path": context.path,
        "status": status,
        "latency_ms": round(duration_s * 1000, 2),
        "model": context.model,
        "key": context.principal.name if context.principal is not None else None,
        "prompt_tokens": context.num_prompt_tokens,
        "completion_tokens": context.num_completion_tokens,
    }
    if with_bodies:
        fields["request_body"] = context.request_body.decode("utf-8", "replace")
        fields["response_body"] = context.response_body.decode("utf-8", "replace")
    access_log.log(
        logging.DEBUG if is_routine else logging.INFO,
        "%s %s %d %.1fms id=%s model=%s tokens=%d+%d",
        context.method,
        context.path,
        status,
        duration_s * 1000,
        context.request_id,
        context.model or "-",
        context.num_prompt_tokens,
        context.num_completion_tokens,
        extra={"fields": fields},
    )
