"""The ingest pipeline every adapter calls: check → submit → tell the adapter what to acknowledge.

Adapters decode their transport into :class:`EventSignal` (see :mod:`bridge.decode`), then hand
the events here. Events that can never be accepted come back as rejected (the adapter answers 4xx
or dead-letters them); the rest go to Temporal in one call. If Temporal does not hold them,
:class:`Unavailable` is raised and *nothing* of the batch may be acknowledged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from bridge.errors import EventRejected, Overloaded, Unavailable
from bridge.event import MAX_SIGNAL_BYTES, EventSignal, encoded_size
from bridge.logsafe import safe
from bridge.metrics import Metrics
from bridge.routing import RouteTable

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Where accepted events go: Temporal, or an in-memory stand-in in unit tests."""

    async def submit(self, events: Sequence[EventSignal]) -> None:
        """Return only once every event is durably held; raise Unavailable otherwise."""


@dataclass
class Outcome:
    event: EventSignal
    rejected: EventRejected | None = None

    @property
    def accepted(self) -> bool:
        return self.rejected is None


class Pipeline:
    def __init__(
        self,
        routes: RouteTable | Callable[[], RouteTable],
        sink: Sink,
        metrics: Metrics | None = None,
        *,
        max_pending: int = 10_000,
        retry_after: float = 5.0,
    ) -> None:
        self._routes = routes
        self.sink = sink
        self.metrics = metrics or Metrics()
        self.max_pending = max_pending
        self.retry_after = retry_after
        self.pending = 0

    @property
    def routes(self) -> RouteTable:
        """The current table: a callable source follows config reloads."""
        return self._routes if isinstance(self._routes, RouteTable) else self._routes()

    def check(self, event: EventSignal) -> EventRejected | None:
        """Why this event can never be accepted, or None. Adapters may call it before submit.

        Total: an event the checks themselves fail on (a bug, or a value nobody foresaw) is refused
        as ``malformed`` with the traceback logged, so it can never fail the events beside it.
        """
        try:
            return self._check(event)
        except Exception:
            log.exception("event could not be checked name=%s id=%s", safe(event.name), safe(event.id))
            return EventRejected("malformed", "the event could not be checked (the bridge logged why)")

    def _check(self, event: EventSignal) -> EventRejected | None:
        try:
            self.routes.check(event)
        except EventRejected as exc:
            return exc
        size = encoded_size(event.to_dict())
        if size > MAX_SIGNAL_BYTES:
            return EventRejected(
                "too_large", f"the event is {size} bytes encoded; one signal carries at most {MAX_SIGNAL_BYTES}"
            )
        return None

    async def submit(self, events: Sequence[EventSignal], adapter: str) -> list[Outcome]:
        """Check each event, submit the good ones together, and report every outcome in order.

        Raises :class:`bridge.errors.Unavailable` when Temporal did not take the good ones.
        """
        outcomes = [Outcome(e, self.check(e)) for e in events]
        good = [o.event for o in outcomes if o.accepted]
        self.metrics.received.labels(adapter).inc(len(events))
        refused = [o for o in outcomes if o.rejected is not None]
        if len(refused) == 1 and refused[0].rejected is not None:
            self.reject(adapter, refused[0].event.name, refused[0].event.id, refused[0].rejected)
        elif refused:
            self._reject_many(adapter, refused)
        if good:
            self._admit(len(good), adapter)
            self.pending += len(good)
            self.metrics.inflight.inc(len(good))
            try:
                with self.metrics.submit_seconds.time():
                    await self.sink.submit(good)
            except Unavailable:
                self.metrics.unavailable.labels(adapter).inc()
                raise
            finally:
                self.pending -= len(good)
                self.metrics.inflight.dec(len(good))
            self.metrics.accepted.labels(adapter).inc(len(good))
        return outcomes

    def _admit(self, count: int, adapter: str) -> None:
        """Refuse a submission that would hold more than ``max_pending`` events waiting for
        Temporal (one batch alone always goes, so a batch larger than the cap is not stuck)."""
        if self.pending and self.pending + count > self.max_pending:
            self.metrics.overloaded.labels(adapter).inc()
            raise Overloaded(
                f"{self.pending} events already wait for Temporal in this process (at most {self.max_pending})",
                self.retry_after,
            )

    def _reject_many(self, adapter: str, refused: list[Outcome]) -> None:
        """Count every refusal, and log them as one line with counts per reason (details at DEBUG):
        a batch of a thousand unroutable events is one line, not a thousand."""
        reasons: dict[str, int] = {}
        for o in refused:
            assert o.rejected is not None
            self.metrics.rejected.labels(adapter, o.rejected.reason).inc()
            reasons[o.rejected.reason] = reasons.get(o.rejected.reason, 0) + 1
            log.debug(
                "event rejected adapter=%s reason=%s name=%s id=%s: %s",
                adapter,
                o.rejected.reason,
                safe(o.event.name),
                safe(o.event.id),
                safe(o.rejected.message, 500),
            )
        first = refused[0]
        log.warning(
            "events rejected adapter=%s count=%d %s first: name=%s id=%s: %s",
            adapter,
            len(refused),
            " ".join(f"{reason}={n}" for reason, n in sorted(reasons.items())),
            safe(first.event.name),
            safe(first.event.id),
            safe(first.rejected.message if first.rejected else "", 500),
        )

    def reject(self, adapter: str, name: str | None, event_id: str | None, exc: EventRejected) -> None:
        """Count and log an event refused for good; adapters call it for decode failures too."""
        self.metrics.rejected.labels(adapter, exc.reason).inc()
        log.warning(
            "event rejected adapter=%s reason=%s name=%s id=%s: %s",
            adapter,
            exc.reason,
            safe(name),
            safe(event_id),
            safe(exc.message, 500),
        )
