"""Refusals: the exception a handler or dependency raises, and the litestar exception handlers
that answer it.

Every error body is ``{"error": <reason>, "message": ..., <details>}`` with the status that
:data:`bridge.errors.HTTP_STATUS` gives the reason; nothing here picks a status by hand. What
each reason means for a client: docs/http-api.md.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response
from litestar.types import ExceptionHandlersMap

from bridge.errors import HTTP_STATUS, EventRejected, Reason, Unavailable
from bridge.ratelimit import retry_after


class Problem(Exception):
    """A request answered with an error body. ``retry_after`` (seconds) becomes the header."""

    def __init__(self, reason: Reason, message: str, *, retry_after: int | None = None, **details: Any) -> None:
        super().__init__(message)
        self.reason: Reason = reason
        self.message = message
        self.retry_after = retry_after
        self.details = details

    @classmethod
    def of(cls, exc: EventRejected, **details: Any) -> Problem:
        """The answer to a rejection; ``details`` (the event id) come before the rejection's own."""
        return cls(exc.reason, exc.message, **{**details, **exc.details})

    @classmethod
    def unavailable(cls, exc: Unavailable, at_least: int, message: str, **details: Any) -> Problem:
        """Temporal did not take it: retry after the dispatcher client's hint, or the configured minimum."""
        return cls(exc.reason, message, retry_after=retry_after(max(exc.retry_after, at_least)), **details)

    @property
    def status(self) -> int:
        return HTTP_STATUS[self.reason]

    def body(self) -> dict[str, Any]:
        return {"error": self.reason, "message": self.message, **self.details}


def answer(_: Request[Any, Any, Any], exc: Problem) -> Response[dict[str, Any]]:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return Response(exc.body(), status_code=exc.status, headers=headers)


def answer_rejected(request: Request[Any, Any, Any], exc: EventRejected) -> Response[dict[str, Any]]:
    return answer(request, Problem.of(exc))


EXCEPTION_HANDLERS: ExceptionHandlersMap = {Problem: answer, EventRejected: answer_rejected}
