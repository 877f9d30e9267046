"""The ingest pipeline every adapter calls: check → submit → tell the adapter what to acknowledge.

Adapters decode their transport into :class:`EventSignal` (see :mod:`bridge.decode`), then hand
the events here. Events that can never be accepted come back as rejected (the adapter answers 4xx
or dead-letters them); the rest go to Temporal in one call. If Temporal does not hold them,
:class:`Unavailable` is raised and *nothing* of the batch may be acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Literal, Protocol, cast

from bridge.errors import EventRejected, Overloaded, PartlyHeld, PartlyRefused, SenderOverloaded, Unavailable
from bridge.event import MAX_EVENT_BYTES, MAX_KEY_CHARS, REPLAY_ID_PREFIX, REPLAY_KEY, EventSignal, encode
from bridge.logsafe import safe
from bridge.metrics import Metrics
from bridge.routing import RouteTable

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Where accepted events go: Temporal, or an in-memory stand-in in unit tests."""

    async def submit(self, events: Sequence[EventSignal]) -> None:
        """Return only once every event is durably held; raise Unavailable otherwise."""


class EncodedSink(Sink, Protocol):
    """A sink that also takes the events already encoded (:func:`bridge.event.encode`), as the
    pipeline's size check made them: each event is encoded once on its way to Temporal."""

    async def submit_encoded(self, events: Sequence[EventSignal], encoded: Sequence[bytes]) -> None:
        """:meth:`Sink.submit`, with ``encoded[i]`` the encoding of ``events[i]``."""


class Tracer(Protocol):
    """Spans around the pipeline, when tracing is on (bridge.runtime.tracing.EventTracer)."""

    def received(self, events: Sequence[EventSignal], adapter: str) -> list[EventSignal]:
        """A receive span per event; the events as they go on (carrying their span's context)."""

    def submitting(self, events: Sequence[EventSignal]) -> AbstractContextManager[None]:
        """The span of handing ``events`` to the sink."""


@dataclass
class Outcome:
    event: EventSignal
    rejected: EventRejected | None = None

    @property
    def accepted(self) -> bool:
        return self.rejected is None


def past_room(
    total: int, own: int, mine: int, more: int, budget: int, share: int
) -> Literal["sender", "process"] | None:
    """Which bound of a room shared by senders taking ``more`` would pass, if any. ``total``: what
    the room holds; ``own``: of it, the asker's (a request whose charge grows; 0 for a new one);
    ``mine``: of it, the asker's sender's other holdings. A sender holding others past its
    ``share`` may not leave the rest less than a share (``"sender"``), and the room may not pass
    ``budget`` (``"process"``); an asker that is alone (of the room, of its sender) always goes, so
    one larger than either bound is not stuck. The events waiting for Temporal
    (:meth:`Pipeline._admit`) and the memory of HTTP requests (``http.max_parsed_bytes``) are such rooms."""
    if mine and mine + own + more > share and total + more > budget - share:
        return "sender"
    if total - own and total + more > budget:
        return "process"
    return None


class Pipeline:
    def __init__(
        self,
        routes: RouteTable | Callable[[], RouteTable],
        sink: Sink,
        metrics: Metrics | None = None,
        *,
        max_pending: int = 10_000,
        max_pending_per_source: int | None = None,
        retry_after: float = 5.0,
        tracer: Tracer | None = None,
    ) -> None:
        self._routes = routes
        self.sink = sink
        self.tracer = tracer
        self.metrics = metrics or Metrics()
        self.max_pending = max_pending
        self.max_pending_per_source = max_pending_per_source
        self.retry_after = retry_after
        self.pending = 0
        self._pending_of: Counter[str] = Counter()  # of ``pending``, each sender's

    @property
    def pending_share(self) -> int:
        """Events of one sender that may wait for Temporal: ``max_pending_per_source``, by default
        a quarter of ``max_pending``."""
        return self.max_pending_per_source or max(1, self.max_pending // 4)

    @property
    def routes(self) -> RouteTable:
        """The current table: a callable source follows config reloads."""
        return self._routes if isinstance(self._routes, RouteTable) else self._routes()

    def check(self, event: EventSignal) -> EventRejected | None:
        """Why this event can never be accepted, or None. Adapters may call it before submit.

        Total: an event the checks themselves fail on (a bug, or a value nobody foresaw) is refused
        as ``malformed`` with the traceback logged, so it can never fail the events beside it.
        """
        return self.examine(event)[0]

    def examine(self, event: EventSignal, routes: RouteTable | None = None) -> tuple[EventRejected | None, bytes]:
        """:meth:`check`, and the event's encoding (empty when refused), which :meth:`submit`
        takes as ``encoded`` so that the event is neither checked nor encoded twice. ``routes``:
        the table to check against (a request's snapshot's), else the current one."""
        try:
            return self._check(event, self.routes if routes is None else routes)
        except Exception:
            log.exception(
                "event could not be checked name=%s id=%s",
                safe(event.name),
                safe(event.id),
                extra={"event_id": event.id, "event_name": event.name, "event_source": event.source},
            )
            return EventRejected("malformed", "the event could not be checked (the bridge logged why)"), b""

    def _check(self, event: EventSignal, routes: RouteTable) -> tuple[EventRejected | None, bytes]:
        for part, value in (("id", event.id), ("name", event.name)):
            if len(value) > MAX_KEY_CHARS:
                return EventRejected(
                    "malformed", f"the event's {part} has {len(value)} characters; at most {MAX_KEY_CHARS} are taken"
                ), b""
        if event.id.startswith(REPLAY_ID_PREFIX) and not isinstance(event.metadata.get(REPLAY_KEY), dict):
            # Whoever may send events in a scope could otherwise send, ahead of it, the id a
            # `replay runs` of a given number (by default the time) would give: the replay's event
            # was then a repeat, and started nothing. Only the replay sets metadata.replay.
            return EventRejected(
                "malformed", f"event ids beginning {REPLAY_ID_PREFIX!r} are kept for `signal-bridge replay runs`"
            ), b""
        try:
            routes.check(event)
        except EventRejected as exc:
            return exc, b""
        data = encode(event.to_dict())
        if len(data) > MAX_EVENT_BYTES:
            return EventRejected(
                "too_large",
                f"the event is {len(data)} bytes encoded; an event may be at most {MAX_EVENT_BYTES} "
                "(each of its runs' argument carries its payload twice)",
            ), b""
        return None, data

    async def submit(
        self,
        events: Sequence[EventSignal],
        adapter: str,
        *,
        encoded: Sequence[bytes] | None = None,
        routes: RouteTable | None = None,
        sender: str | None = None,
        weigh: Callable[[bytes], None] | None = None,
    ) -> list[Outcome]:
        """Check each event, submit the good ones together, and report every outcome in order.
        ``encoded``: what :meth:`examine` gave for each event, which passed it; they are then not
        checked or encoded again (unless tracing, which adds the receive span to each first).
        ``routes``: the table of the snapshot the events were made with (an HTTP request's, whose
        webhook mapped them), so a reload meanwhile does not judge them by another config.
        ``sender``: who sent them (``http:<token name>``, ``webhook:<slug>``, ``kafka:<name>``…),
        whose events may be at most :attr:`pending_share` of those waiting; None: not limited.
        ``weigh``: called with each good event's encoding as it is made, before the loop's next
        turn (the HTTP adapter charges what its events hold); what it raises ends the submission,
        with nothing of it taken or counted.

        Raises :class:`bridge.errors.Unavailable` when Temporal did not take the good ones, and
        :class:`bridge.errors.PartlyHeld` (with every outcome, those not held refused as
        ``unavailable``) when it took some of them; :class:`bridge.errors.Overloaded` (or
        :class:`bridge.errors.SenderOverloaded`) when there is no room to wait for it.
        """
        if self.tracer is not None:  # before encoding: each event then carries its receive span
            events = self.tracer.received(events, adapter)
            encoded = None
        outcomes, good, datas = await self._examined(events, encoded, routes, weigh)
        metrics = self.metrics
        metrics.child(metrics.received, adapter).inc(len(events))
        if len(good) < len(outcomes):
            self._refused(adapter, [o for o in outcomes if o.rejected is not None])
        if good:
            self._admit(len(good), adapter, sender)
            self.pending += len(good)
            if sender is not None:
                self._pending_of[sender] += len(good)
            metrics.inflight.inc(len(good))
            try:
                with metrics.submit_seconds.time(), self.tracer.submitting(good) if self.tracer else nullcontext():
                    await self._hand_over(good, datas)
            except Overloaded:  # the dispatcher can take no more now (dispatcher.client)
                metrics.child(metrics.overloaded, adapter).inc()
                raise
            except PartlyHeld as exc:
                metrics.child(metrics.unavailable, adapter).inc()
                raise self._partly(exc, outcomes, adapter) from exc
            except PartlyRefused as exc:  # counted by whoever takes the outcomes as final (HTTP)
                raise PartlyRefused(str(exc), *self._placed(exc.held, exc.refused, outcomes)) from exc
            except Unavailable:
                metrics.child(metrics.unavailable, adapter).inc()
                raise
            finally:
                self.pending -= len(good)
                if sender is not None:
                    self._pending_of[sender] -= len(good)
                    if not self._pending_of[sender]:
                        del self._pending_of[sender]
                metrics.inflight.dec(len(good))
            metrics.child(metrics.accepted, adapter).inc(len(good))
        return outcomes

    async def _examined(
        self,
        events: Sequence[EventSignal],
        encoded: Sequence[bytes] | None,
        routes: RouteTable | None,
        weigh: Callable[[bytes], None] | None,
    ) -> tuple[list[Outcome], list[EventSignal], list[bytes]]:
        """Each event's outcome as checked (or as ``encoded`` says: all passed), and the good
        ones with their encodings, each weighed as it is made."""
        if encoded is not None and len(encoded) == len(events) and all(encoded):
            if weigh is not None:
                for data in encoded:
                    weigh(data)
            return [Outcome(e) for e in events], list(events), list(encoded)
        outcomes: list[Outcome] = []
        good: list[EventSignal] = []
        datas: list[bytes] = []
        for n, event in enumerate(events):
            if n:  # each check may take its schemas' whole budget: the loop's other work goes between
                await asyncio.sleep(0)
            rejected, data = self.examine(event, routes)
            outcomes.append(Outcome(event, rejected))
            if rejected is None:
                if weigh is not None:
                    weigh(data)
                good.append(event)
                datas.append(data)
        return outcomes, good, datas

    def _partly(self, exc: PartlyHeld, outcomes: list[Outcome], adapter: str) -> PartlyHeld:
        """``exc`` (whose ``held`` indexes the submitted events) with ``held`` indexing ``outcomes``,
        and the outcomes of the events not held refused as ``unavailable``."""
        held, _, outcomes = self._placed(exc.held, {}, outcomes)
        self.metrics.child(self.metrics.accepted, adapter).inc(len(held))
        return PartlyHeld(str(exc), held, exc.retry_after, outcomes)

    @staticmethod
    def _placed(
        held: frozenset[int], refused: Mapping[int, EventRejected], outcomes: list[Outcome]
    ) -> tuple[frozenset[int], dict[int, EventRejected], list[Outcome]]:
        """``held`` and ``refused`` (indices of the submitted events) as indices of ``outcomes``,
        and the outcomes of the events not held refused as ``refused`` says, else ``unavailable``."""
        positions = [i for i, o in enumerate(outcomes) if o.rejected is None]
        at = frozenset(positions[i] for i in held)
        alone = {positions[i]: why for i, why in refused.items()}
        why = EventRejected(
            "unavailable",
            "Temporal may not hold this event (others of the batch it holds): send it again with the same event "
            "id (an envelope with this event_id as its id; a CloudEvent unchanged), or the whole batch only as it "
            "was and with the same Idempotency-Key (without one, envelopes without ids get new ids, and the held "
            "ones start again)",
        )
        for i in positions:
            if i not in at:
                outcomes[i].rejected = alone.get(i, why)
        return at, alone, outcomes

    async def _hand_over(self, events: list[EventSignal], encoded: list[bytes]) -> None:
        """To the sink, with the encodings the size check made when it takes them."""
        sink = self.sink
        # Not isinstance(sink, EncodedSink): a runtime protocol check costs more than the encoding it saves.
        if callable(getattr(sink, "submit_encoded", None)):
            await cast(EncodedSink, sink).submit_encoded(events, encoded)
        else:
            await sink.submit(events)

    def _refused(self, adapter: str, refused: list[Outcome]) -> None:
        if len(refused) == 1 and refused[0].rejected is not None:
            event = refused[0].event
            self.reject(adapter, event.name, event.id, refused[0].rejected, source=event.source)
        else:
            self._reject_many(adapter, refused)

    def _admit(self, count: int, adapter: str, sender: str | None) -> None:
        """Refuse a submission that would hold more than ``max_pending`` events waiting for
        Temporal; or, past its sender's :attr:`pending_share`, one that would leave the others
        less than a share: one token's large batches while Temporal is slow leave the others room,
        and a process with one sender may still use most of it. One batch alone always goes (of
        the process, of the sender), so a batch larger than either cap is not stuck."""
        mine = self._pending_of[sender] if sender is not None else 0
        share = self.pending_share
        past = past_room(self.pending, 0, mine, count, self.max_pending, share)
        if past == "sender":
            self.metrics.child(self.metrics.overloaded, adapter).inc()
            raise SenderOverloaded(
                f"{mine} events of this sender already wait for Temporal in this process (past {share}, a "
                "sender leaves the others that many: dispatcher.max_pending_per_source)",
                self.retry_after,
            )
        if past == "process":
            self.metrics.child(self.metrics.overloaded, adapter).inc()
            raise Overloaded(
                f"{self.pending} events already wait for Temporal in this process (at most {self.max_pending})",
                self.retry_after,
            )

    def _reject_many(self, adapter: str, refused: list[Outcome]) -> None:
        """Count every refusal, and log them as one line with counts per reason (details at DEBUG):
        a batch of a thousand unroutable events is one line, not a thousand."""
        reasons: dict[str, int] = {}
        details = log.isEnabledFor(logging.DEBUG)
        for o in refused:
            assert o.rejected is not None
            self.metrics.child(self.metrics.rejected, adapter, o.rejected.reason).inc()
            reasons[o.rejected.reason] = reasons.get(o.rejected.reason, 0) + 1
            if details:
                log.debug(
                    "event rejected adapter=%s reason=%s name=%s id=%s: %s",
                    adapter,
                    o.rejected.reason,
                    safe(o.event.name),
                    safe(o.event.id),
                    safe(o.rejected.message, 500),
                    extra={
                        "event_id": o.event.id,
                        "event_name": o.event.name,
                        "event_source": o.event.source,
                        "adapter": adapter,
                    },
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
            extra={"adapter": adapter},
        )

    def reject(
        self, adapter: str, name: str | None, event_id: str | None, exc: EventRejected, *, source: str | None = None
    ) -> None:
        """Count and log an event refused for good; adapters call it for decode failures too."""
        self.metrics.child(self.metrics.rejected, adapter, exc.reason).inc()
        log.warning(
            "event rejected adapter=%s reason=%s name=%s id=%s: %s",
            adapter,
            exc.reason,
            safe(name),
            safe(event_id),
            safe(exc.message, 500),
            extra={"event_id": event_id, "event_name": name, "event_source": source, "adapter": adapter},
        )
