"""The one settle path every queue adapter runs its batches through.

decode → check → submit until Temporal holds the events → dead-letter or skip what can never be
accepted → tell the transport what it may acknowledge. A queue adapter writes only its
:class:`Transport` (poll/commit or consume/ack, and publishing its dead letters); what must not
drift between adapters lives here: the backoff (:class:`Backoff`), which errors are retried
(:class:`Unavailable` and the transport's own transient errors, nothing else), the dead-letter
header names and sizes (:mod:`bridge.deadletter`) and the dead-letter/skip policy
(:class:`Disposition`). What an operator sees of it: docs/kafka.md and docs/rabbitmq.md.

Nothing is acknowledged that Temporal does not hold: while Temporal (or the dead-letter
destination) refuses, or this process already holds as many events waiting for Temporal as it may
(:class:`bridge.errors.Overloaded`, an :class:`Unavailable`), the batch is retried with backoff and
the transport is paused, so it fetches nothing more; a transport that gives the batch up meanwhile
(stopping, a rebalance) gets :class:`Abandoned`; any other exception is a bug and reaches the
adapter, which must not acknowledge what was not settled. No message can cause one: whatever a
message holds, decoding and checking it alone ends in an event or a rejection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Generic, Literal, TypeVar

from bridge.config import EventFormat
from bridge.decode import Message, decode
from bridge.errors import EventRejected, Overloaded, Unavailable
from bridge.event import EventSignal
from bridge.logsafe import safe
from bridge.pipeline import Outcome, Pipeline

log = logging.getLogger(__name__)

M = TypeVar("M")
T = TypeVar("T")
DECODE_TURN = 0.02  # seconds of decoding before the loop gets a turn (Settler._decode_all)
DECODE_BYTES = 4 * 1024 * 1024
"""Bytes of bodies a batch is parsed at a time (Settler.settle). Parsed JSON takes up to about 25
times its text (``[{},{},…]``): 500 Kafka records of 1 MB parsed at once took about 12 GB."""
LETTERS = "dead-letter destination"
"""What refuses while dead letters cannot be written, in the log lines and Settler.letters_failing."""
LETTERS_UNHEALTHY = 3
"""Refused attempts at a batch's dead letters in a row after which the adapter is not ready: a
destination that is gone (a deleted exchange, a full queue that rejects publishes, a topic whose
partitions have no leader) holds the queue or partitions for good, and /readyz was green."""

# --- backoff ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter: ``initial · 2^(attempt-1)``, at most ``cap``, each
    delay scaled by a random factor in ``[1 - jitter, 1]`` so replicas do not retry in step."""

    initial: float = 0.5
    cap: float = 10.0
    jitter: float = 0.2

    def delay(self, attempt: int) -> float:
        base = min(self.cap, self.initial * 2.0 ** min(max(attempt, 1) - 1, 32))
        return base * random.uniform(1.0 - self.jitter, 1.0)


# --- what became of each message -------------------------------------------------------------------


class Disposition(Enum):
    """What became of a message; every one but :attr:`DROPPED` is acknowledged as done."""

    HELD = "held"  # Temporal holds its event
    DEAD_LETTERED = "dead_lettered"  # refused for good; its dead letter is out
    SKIPPED = "skipped"  # refused for good and acknowledged without a letter (``on_unroutable: skip``)
    DROPPED = "dropped"  # refused for good, no dead letter written: the broker may dead-letter it itself


@dataclass(eq=False)
class Item(Generic[M]):
    """One transport message on its way through :meth:`Settler.settle`.

    ``disposition`` stays None for a message left unsettled: the transport could no longer
    acknowledge it (:meth:`Transport.usable`), and it will be delivered again.
    """

    message: M
    event: EventSignal | None = None
    error: EventRejected | None = None
    disposition: Disposition | None = None
    encoded: bytes = b""  # the event as the pipeline encoded it when it checked it
    checked_with: object = None  # the route table it was checked against
    size: int = 0  # bytes of its body

    def release(self) -> None:
        """Let go of the parsed payload and the encoding once settled (the event's id, name and
        source stay, for whoever counts them): a batch's later parts are parsed meanwhile
        (:data:`DECODE_BYTES`)."""
        if self.event is not None:
            self.event = dataclasses.replace(self.event, payload={}, metadata={})
        self.encoded = b""


class Abandoned(Exception):
    """The transport gave up the batch in hand while waiting (stopping, a rebalance); whatever of
    it was not settled yet stays unacknowledged and is delivered again."""


class Transport(ABC, Generic[M]):
    """What a queue adapter writes: the part that knows its broker."""

    @abstractmethod
    def to_message(self, message: M) -> Message:
        """Strip the transport: what :func:`bridge.decode.decode` reads. May raise EventRejected."""

    @abstractmethod
    def fallback_id(self, message: M) -> str:
        """The id the message gets when nothing in it names one (also used in log lines)."""

    @abstractmethod
    def can_dead_letter(self) -> bool:
        """True when a dead-letter destination is configured and ready."""

    @abstractmethod
    async def dead_letter(self, items: Sequence[Item[M]]) -> None:
        """Write a dead letter for each item (see :mod:`bridge.deadletter`; trimmed to fit, never
        refused for its size).

        Raise one of the transient errors given to :class:`Settler` to have it retried: the items
        still without a ``disposition`` are offered again (mark a letter that is out
        :attr:`Disposition.DEAD_LETTERED` to keep it from being written twice). An item whose letter
        went nowhere for good may be marked :attr:`Disposition.SKIPPED` (acknowledged; count and log
        it) or :attr:`Disposition.DROPPED` (the broker takes it).
        """

    @abstractmethod
    async def acknowledge(self, items: Sequence[Item[M]]) -> None:
        """These items are settled (see their ``disposition``): acknowledge them now if the
        transport acknowledges one message at a time. A transport that commits a position does
        it after :meth:`Settler.settle` returns instead."""

    @abstractmethod
    async def wait(self, seconds: float) -> bool:
        """Wait before the next attempt; False gives the batch up (:class:`Abandoned`)."""

    def usable(self, message: M) -> bool:
        """False once the message can no longer be acknowledged (its channel is gone): it is left
        alone and will be delivered again."""
        return True

    def pause(self) -> None:
        """Temporal (or the dead-letter destination) refused: stop taking new messages."""

    def resume(self) -> None:
        """It answers again: take new messages."""


class _Closed:
    pass


_CLOSED = _Closed()


class Inbox(Generic[M]):
    """Messages a broker pushes (a consumer callback), taken out in batches to settle: the first
    one, then whatever arrives within ``linger`` seconds, up to ``max_batch``."""

    def __init__(self, max_batch: int, linger: float = 0.01) -> None:
        self.max_batch = max_batch
        self.linger = linger
        self._queue: asyncio.Queue[M | _Closed] = asyncio.Queue()

    def put(self, message: M) -> None:
        self._queue.put_nowait(message)

    def close(self) -> None:
        """Wake a waiting :meth:`take`; what is still inside is never settled (it is redelivered)."""
        self._queue.put_nowait(_CLOSED)

    async def take(self) -> list[M]:
        """The next batch; empty once closed."""
        first = await self._queue.get()
        if isinstance(first, _Closed):
            self.close()  # every later take() sees it too
            return []
        batch = [first]
        deadline = asyncio.get_running_loop().time() + self.linger
        while len(batch) < self.max_batch:
            try:
                if self._queue.empty():
                    async with asyncio.timeout(deadline - asyncio.get_running_loop().time()):
                        nxt = await self._queue.get()
                else:
                    nxt = self._queue.get_nowait()
            except TimeoutError:
                break
            if isinstance(nxt, _Closed):
                self.close()
                break
            batch.append(nxt)
        return batch


# --- the settle path -------------------------------------------------------------------------------


class Settler(Generic[M]):
    """Settles one adapter's batches: one per queue adapter instance, its outage state included."""

    def __init__(
        self,
        pipeline: Pipeline,
        transport: Transport[M],
        *,
        adapter: str,
        name: str,
        event: EventFormat,
        on_unroutable: Literal["dead_letter", "skip"] = "dead_letter",
        transient: tuple[type[Exception], ...] = (),
        backoff: Backoff | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.transport = transport
        self.adapter = adapter
        self.name = name
        self.sender = f"{adapter}:{name}"  # whose share of the events waiting for Temporal (Pipeline.submit)
        self.event = event
        self.on_unroutable = on_unroutable
        self.retry_on: tuple[type[Exception], ...] = (Unavailable, *transient)
        self.backoff = backoff or Backoff()
        self.failures = 0
        self._outage_since = 0.0
        self._failing: str | None = None  # what refuses now: "Temporal" or LETTERS

    def letters_failing(self) -> bool:
        """Whether the dead-letter destination has refused LETTERS_UNHEALTHY attempts in a row: the
        adapter reads nothing more until it takes them, and its readiness says so (Temporal's own
        outage is its own check in /readyz)."""
        return self._failing == LETTERS and self.failures >= LETTERS_UNHEALTHY

    @property
    def waiting(self) -> bool:
        """True while Temporal (or the dead-letter destination) refuses and the batch waits."""
        return self.failures > 0

    async def settle(self, batch: Sequence[M]) -> list[Item[M]]:
        """Settle a batch; every usable message is settled when this returns.

        Raises :class:`Abandoned` when the transport gave the batch up while waiting. Any other
        exception is a bug: the adapter must leave unacknowledged what was not settled. Either way
        the outage ends with the batch: :attr:`waiting` must not outlive it, or a transport that
        pauses what it is given while waiting (Kafka's newly assigned partitions) would pause
        them for good. Resuming the transport is the adapter's part then.

        A batch is parsed and settled in parts of about :data:`DECODE_BYTES` of bodies, in
        order, each let go of (:meth:`Item.release`) before the next is parsed: a batch of large
        bodies of tiny containers would otherwise be held parsed all at once. The items come back
        released.
        """
        items: list[Item[M]] = []
        try:
            rest = list(batch)
            while rest:
                part, rest = await self._decode_all(rest)
                await self._settle_part(part)
                for item in part:
                    item.release()
                items += part
        except BaseException:
            self.failures = 0
            self._failing = None
            raise
        return items

    async def _settle_part(self, items: list[Item[M]]) -> None:
        await self._hold([i for i in items if i.event is not None and i.error is None])
        refused = [i for i in items if i.error is not None and self.transport.usable(i.message)]
        letters = [i for i in refused if not self._skip_or_drop(i)]
        if letters:
            await self._until_done(lambda: self._write_letters(letters), LETTERS)
        settled = [i for i in refused if i.disposition is not None]
        if settled:
            await self.transport.acknowledge(settled)

    async def _write_letters(self, letters: list[Item[M]]) -> None:
        """One attempt at the letters not yet out, of messages that can still be acknowledged (a
        message whose channel is gone is left alone: it comes back, and is refused again)."""
        due = [i for i in letters if i.disposition is None and self.transport.usable(i.message)]
        if not due:
            return
        try:
            await self.transport.dead_letter(due)
            for item in due:
                if item.disposition is None:
                    item.disposition = Disposition.DEAD_LETTERED
        finally:  # a letter out before the attempt failed is not offered again: said here, once
            for item in due:
                if item.disposition is Disposition.DEAD_LETTERED:
                    self._log_dead_letter(item)

    async def _decode_all(self, batch: list[M]) -> tuple[list[Item[M]], list[M]]:
        """The first messages of ``batch`` decoded, up to :data:`DECODE_BYTES` of bodies (at
        least one), and the rest. The loop gets a turn every :data:`DECODE_TURN` seconds: a window
        of bodies that are slow to parse (a megabyte of tiny arrays takes about half a second)
        would otherwise hold every other adapter, the Temporal client and the broker's heartbeats
        for as long as the whole window takes."""
        items: list[Item[M]] = []
        turn = time.monotonic() + DECODE_TURN
        size = 0
        for message in batch:
            item = self._decode(message)
            items.append(item)
            size += item.size
            if size >= DECODE_BYTES:
                break
            if time.monotonic() > turn:
                await asyncio.sleep(0)
                turn = time.monotonic() + DECODE_TURN
        return items, batch[len(items) :]

    def _decode(self, message: M) -> Item[M]:
        """Decode and check one message alone: whatever it holds, it becomes an event or a
        rejection here, and never fails the messages around it."""
        item: Item[M] = Item(message)
        try:
            stripped = self.transport.to_message(message)
            item.size = len(stripped.body)
            item.event = decode(stripped, self.event)
            item.checked_with = self.pipeline.routes
            refused, item.encoded = self.pipeline.examine(item.event)
        except EventRejected as exc:
            self._refuse(item, exc)
            return item
        except Exception as exc:  # a decoder or check bug must not stall the queue: dead-letter it, loudly
            log.exception(
                "%s adapter %s: cannot decode or check %s",
                self.adapter,
                self.name,
                safe(self.transport.fallback_id(message)),
                extra=self._fields(item),
            )
            self._refuse(item, EventRejected("malformed", f"cannot decode: {exc!r}"))
            return item
        if refused is not None:
            self.pipeline.metrics.received.labels(self.adapter).inc()
            self._refuse(item, refused)
        return item

    def _refuse(self, item: Item[M], exc: EventRejected) -> None:
        item.error = exc
        event = item.event
        event_id = event.id if event else self.transport.fallback_id(item.message)
        self.pipeline.reject(
            self.adapter, event.name if event else None, event_id, exc, source=event.source if event else None
        )

    async def _hold(self, items: list[Item[M]]) -> None:
        """Submit until Temporal holds the events, then acknowledge them; a batch too large for
        one signal is halved, and one event that does not fit is refused (``too_large``)."""
        live: list[Item[M]] = []

        async def submit() -> list[Outcome]:
            live[:] = [i for i in items if self.transport.usable(i.message)]
            events = [i.event for i in live if i.event is not None]
            # Checked and encoded once, at decode; again only after a reload (an outage may span one).
            routes = self.pipeline.routes
            fresh = all(i.checked_with is routes for i in live if i.event is not None)
            encoded = [i.encoded for i in live if i.event is not None] if fresh else None
            return (
                await self.pipeline.submit(events, self.adapter, encoded=encoded, sender=self.sender) if events else []
            )

        try:
            outcomes = await self._until_done(submit, "Temporal")
        except EventRejected as exc:
            if len(live) == 1:
                self._refuse(live[0], exc)
                return
            half = len(live) // 2
            await self._hold(live[:half])
            await self._hold(live[half:])
            return
        held = []
        for item, outcome in zip(live, outcomes, strict=True):
            if outcome.rejected is None:
                item.disposition = Disposition.HELD
                held.append(item)
            else:  # the pipeline counted and logged it
                item.error = outcome.rejected
        if held:
            await self.transport.acknowledge(held)

    def _skip_or_drop(self, item: Item[M]) -> bool:
        """The dead-letter policy: True (and counted, logged) when no dead letter is to be written."""
        assert item.error is not None
        if item.error.reason == "unroutable" and self.on_unroutable == "skip":
            item.disposition, level, why = Disposition.SKIPPED, logging.INFO, "on_unroutable: skip"
        elif not self.transport.can_dead_letter():
            item.disposition, level, why = Disposition.DROPPED, logging.WARNING, "no dead-letter destination"
        else:
            return False
        self.pipeline.metrics.dropped.labels(self.adapter, item.error.reason).inc()
        log.log(
            level,
            "%s message %s (%s) %s: %s",
            self.adapter,
            item.disposition.value,
            why,
            self._describe(item),
            safe(item.error.message, 500),
            extra=self._fields(item),
        )
        return True

    def _log_dead_letter(self, item: Item[M]) -> None:
        log.info("%s message dead-lettered %s", self.adapter, self._describe(item), extra=self._fields(item))

    def _fields(self, item: Item[M]) -> dict[str, str]:
        """The event's fields on a log line about it (JSON logs carry them: bridge/runtime/logs.py)."""
        event = item.event
        if event is None:
            return {"event_id": self.transport.fallback_id(item.message), "adapter": self.adapter}
        return {"event_id": event.id, "event_name": event.name, "event_source": event.source, "adapter": self.adapter}

    def _describe(self, item: Item[M]) -> str:
        """``from= reason= id= name=`` of a refused message, every sender value made safe to log."""
        assert item.error is not None
        event = item.event
        return (
            f"from={safe(self.transport.fallback_id(item.message))} reason={item.error.reason} "
            f"id={safe(event.id if event else None)} name={safe(event.name if event else None)}"
        )

    # -- retries ------------------------------------------------------------------------------------

    async def _until_done(self, attempt: Callable[[], Awaitable[T]], what: str) -> T:
        """Run ``attempt`` until it succeeds; only :attr:`retry_on` errors are retried."""
        while True:
            try:
                result = await attempt()
            except self.retry_on as exc:
                await self._wait_out(exc, what)
                continue
            except EventRejected:  # an answer all the same (too_large): the outage is over
                self._answered(what)
                raise
            self._answered(what)
            return result

    def _answered(self, what: str) -> None:
        """After an outage, ``what`` answered: resume the transport. An answer that is a refusal
        counts: nothing else would resume it, and the partitions or queue would stay paused."""
        if not self.failures:
            return
        log.warning(
            "%s adapter %s: %s answers again after %.1fs and %d failed attempt(s); resuming",
            self.adapter,
            self.name,
            what,
            time.monotonic() - self._outage_since,
            self.failures,
            extra={"adapter": self.adapter},
        )
        self.failures = 0
        self._failing = None
        self.transport.resume()

    async def _wait_out(self, exc: Exception, what: str) -> None:
        """Pause the transport and wait before the next attempt. :class:`Overloaded` (this process
        already holds as many events waiting for Temporal as it may, or the dispatcher as many as it
        can start before it must continue-as-new) is waited out like an outage:
        the transport fetches nothing more meanwhile."""
        self.failures += 1
        self._failing = what
        delay = self.backoff.delay(self.failures)
        busy = "busy (too many events wait, in this process or its dispatcher)"
        state = busy if isinstance(exc, Overloaded) else "unavailable"
        if self.failures == 1:
            self._outage_since = time.monotonic()
            log.warning(
                "%s adapter %s: %s %s; holding the batch unacknowledged and retrying: %s",
                self.adapter,
                self.name,
                what,
                state,
                safe(exc, 500),
                extra={"adapter": self.adapter},
            )
        else:
            log.info(
                "%s adapter %s: %s still %s (attempt %d, next in %.1fs): %s",
                self.adapter,
                self.name,
                what,
                state,
                self.failures,
                delay,
                safe(exc, 500),
                extra={"adapter": self.adapter},
            )
        self.transport.pause()
        if not await self.transport.wait(delay):
            raise Abandoned(f"{what} {state} and the batch given up (stopping or rebalanced)")
