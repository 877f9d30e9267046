"""uvicorn's h11 protocol, with a deadline for each request's head.

uvicorn times a connection out only while it is idle after a response (``timeout_keep_alive``),
and any byte received ends that wait. A connection that sends nothing, or a head a byte at a
time, or that trickles a body the handler already answered (408, 413), was held for good, and
each held one counts toward ``http.max_concurrent_requests``: a thousand of them, with no token
and no webhook secret, left every other request a 503. Here a request's head must arrive within
HEAD_TIMEOUT of the connection, or of the previous response; a body is the handler's to time
(``http.body_timeout_seconds``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_TIMEOUT = 10.0
"""Seconds a connection may take to send a request's head (method, path and headers)."""


class HeadTimeoutProtocol(H11Protocol):
    """:class:`H11Protocol` that closes a connection whose next request's head is late."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._waited_after: Any = None  # the request (cycle) before the head that is awaited

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self._head_timer is not None and self.cycle is not self._waited_after:
            self._cancel_head()  # a new request's head arrived

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_head()

    def _await_head(self) -> None:
        self._cancel_head()
        self._waited_after = self.cycle
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT, self._head_late)

    def _cancel_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        idle = self.cycle is None or self.cycle.response_complete
        if self.cycle is self._waited_after and idle and not self.transport.is_closing():
            self.transport.close()
