"""Domain errors a client can cause or must be told about.

Engines and the hub raise these; ``inferd.api.errors`` is the only place that turns them into a
status code and a wire family's error body. Anything else that escapes is a bug and becomes one 500.
"""

from __future__ import annotations


class InferdError(Exception):
    """Base class: ``message`` is shown to the client; ``param`` names the offending field."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(InferdError):
    """The request is well-formed JSON but asks for something invalid."""


class ModelNotFoundError(InferdError):
    """No served model has the requested name."""


class UnsupportedTaskError(InferdError):
    """The model exists but cannot do what the route asks (e.g. rerank with a chat model)."""


class InputTooLongError(InvalidRequestError):
    """An input has more tokens than the model accepts and truncation was not requested."""

    def __init__(self, message: str, *, limit: int, length: int, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.limit = limit
        self.length = length


class OverloadedError(InferdError):
    """A bounded queue is full; the client should retry after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineUnavailableError(InferdError):
    """The engine is not running (not loaded yet, shutting down, or crashed)."""


class ModelLoadError(InferdError):
    """A model could not be resolved or loaded; raised at start-up, never during a request."""


class ModelTooLargeError(InvalidRequestError):
    """The model can never load within the memory budget, even with every other model unloaded."""


class InsufficientMemoryError(InferdError):
    """The model fits the budget, but pinned or busy models hold the memory it needs right now."""


class EngineError(InferdError):
    """The engine failed while running a request (a bug or a device fault); reported as a 500."""


class AuthenticationError(InferdError):
    """No API key, or one the server does not know."""


class PermissionDeniedError(InferdError):
    """The API key may not use what the request asks for."""


class PayloadTooLargeError(InvalidRequestError):
    """The request body is larger than the server accepts."""


class RateLimitError(OverloadedError):
    """A key used up its requests or tokens per minute; ``retry_after`` says when it may go on."""


class ShuttingDownError(EngineUnavailableError):
    """The server is draining before it stops: other replicas should take the request."""

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeoutError(InferdError):
    """The request ran past the server's request timeout and was aborted."""


class SlowReaderError(InferdError):
    """The client left more generated output unread than the server buffers per request; the
    request was aborted rather than let its buffer grow for as long as the connection lives."""


class BodyTimeoutError(InferdError):
    """The client did not send its whole request body within the server's body timeout."""
