"""Refusals: the exception a handler or dependency raises, and the litestar exception handlers
that answer it.

Every error body is ``{"error": <reason>, "message": ..., <details>}`` with the status that
:data:`bridge.errors.HTTP_STATUS` gives the reason; nothing here picks a status by hand. What
each reason means for a client: docs/http-api.md.
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import ExceptionHandlersMap

from bridge.errors import HTTP_STATUS, EventRejected, Overloaded, Reason, Unavailable
from bridge.logsafe import safe

log = logging.getLogger(__name__)

OVERLOADED = (
    "too many events wait for Temporal in this process, or in its dispatcher for their starts; "
    "nothing of this request was taken"
)


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
    def unavailable(cls, exc: Unavailable, retry_after_seconds: int, message: str, **details: Any) -> Problem:
        """Nothing was taken: Temporal did not take it (``unavailable``), or this process already
        holds as many events waiting for Temporal as it may (``overloaded``, and then ``message``
        says so). Retry after ``http.retry_after_seconds``, whatever the dispatcher client's hint."""
        if isinstance(exc, Overloaded):
            message = f"{OVERLOADED}; retry after the Retry-After delay"
        return cls(exc.reason, message, retry_after=max(1, retry_after_seconds), **details)

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


def answer_bug(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    """Whatever no handler expected: litestar's own 500 answer, and the traceback in the log (the
    app leaves logging to the process, so litestar would log nothing)."""
    log.error("unhandled error %s %s", request.method, safe(request.url.path), exc_info=exc)
    body = {"status_code": HTTP_500_INTERNAL_SERVER_ERROR, "detail": "Internal Server Error"}
    return Response(body, status_code=HTTP_500_INTERNAL_SERVER_ERROR)


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    Problem: answer,
    EventRejected: answer_rejected,
    HTTP_500_INTERNAL_SERVER_ERROR: answer_bug,
}
