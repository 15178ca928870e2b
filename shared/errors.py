"""Which failure answers which HTTP status: one table for every service.

Engines and batchers raise plain exceptions: shared.batching's, and OverloadedError / UnavailableError for their own
admission and readiness. `STATUS_OF` says how each one answers; shared.server renders them in the error envelope
(its exception handlers and `batcher_errors`), so no route maps them by hand. Refusals of a client's input need the
route's own field names and limits: routes raise those as ApiError directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.batching import BatcherClosedError, BatchTimeoutError, QueueFullError, WorkerDiedError

RETRY_AFTER_S = 1  # on 429 and 503: the condition is expected to pass within seconds
RETRY_SOON = {"Retry-After": str(RETRY_AFTER_S)}


class ApiError(Exception):
    """An error with its HTTP status and envelope type; raised by routes, rendered by shared.server's handlers."""

    def __init__(self, status: int, type: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type, message, headers


class OverloadedError(Exception):
    """Too much is in flight right now; the same request can succeed shortly (429 with Retry-After)."""


class UnavailableError(Exception):
    """The service cannot serve this now (loading, shutting down, no model yet); retry (503 with Retry-After).
    `retry_after`: seconds the condition is expected to last."""

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Answer:
    """How one kind of failure answers: status, envelope type, whether to retry, and what to add to the message."""

    status: int
    type: str
    retry: bool = True  # sends Retry-After: the condition passes by itself
    suffix: str = ""  # appended to the exception's message


# Deadlines answer 503 (not 504): the service itself, not an upstream, ran out of time; clients retry it like one.
STATUS_OF: dict[type[Exception], Answer] = {
    QueueFullError: Answer(429, "overloaded"),
    OverloadedError: Answer(429, "overloaded"),
    BatchTimeoutError: Answer(503, "timeout"),
    BatcherClosedError: Answer(503, "unavailable", suffix="; retry"),
    WorkerDiedError: Answer(503, "unavailable", suffix="; retry"),
    UnavailableError: Answer(503, "unavailable"),
}


def as_api_error(exc: BaseException) -> ApiError | None:
    """`exc` as the ApiError the table says (its nearest listed class), or None when the table does not list it."""
    for cls in type(exc).__mro__:
        if (answer := STATUS_OF.get(cls)) is not None:
            seconds = getattr(exc, "retry_after", RETRY_AFTER_S)
            headers = {"Retry-After": str(seconds)} if answer.retry else None
            return ApiError(answer.status, answer.type, f"{exc}{answer.suffix}", headers)
    return None
