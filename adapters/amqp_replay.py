"""Replay of a RabbitMQ dead-letter queue: ``signal-bridge replay amqp`` (docs/replay.md).

A letter is the refused delivery as it came (body, properties, headers) plus ``x-original-queue``,
``x-original-exchange`` and ``x-original-routing-key``. :class:`Original` rebuilds the delivery
from it, so :func:`adapters.amqp_parse.to_message` gives it the source (``amqp:{queue}``) and the
id (``message_id``, else the hash of exchange, routing key and body) it had, and the entry that
consumes that queue settles it through the adapter's settle path.

The replay takes (``basic.get``) as many messages as the queue held when it began, so it ends
whatever it puts back:

- a message whose event Temporal holds is acked;
- a message still refused is published again to the end of the same queue (through the default
  exchange, with publisher confirms), as the adapter's dead letter of it with the new reason,
  and then acked;
- a message that cannot be replayed (:data:`adapters.replay_common.NOT_REPLAYABLE`) is held
  unacked until the replay ends, then nacked with requeue: RabbitMQ puts it back where it was.

A message is acked only once one of the first two happened; a replay that stops or loses its
connection leaves the rest unacked, and RabbitMQ requeues them. ``dry_run`` decodes and checks
only, and requeues everything it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, cast

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, QueueEmpty

from adapters.amqp import AMQP_ERRORS, PUBLISH_TIMEOUT, LetterNotOut
from adapters.amqp_parse import H_AS_WAS, dead_letter_copy, fallback_id, to_message
from adapters.replay_common import (
    NO_ENTRY,
    NOT_A_DEAD_LETTER,
    REPLAY_ADAPTER,
    TRIMMED,
    Progress,
    Report,
    Tally,
    count_checked,
    count_settled,
    inspect,
    is_trimmed,
    kept,
    letter_id,
)
from bridge.config import AmqpConsumer, EventFormat
from bridge.deadletter import H_ORIGINAL, dropped_by_replay
from bridge.decode import Message, decode
from bridge.errors import BridgeError
from bridge.logsafe import safe
from bridge.pipeline import Pipeline
from bridge.settle import Abandoned, Disposition, Item, Settler, Transport

log = logging.getLogger(__name__)

GET_TIMEOUT = 10.0


@dataclass
class Original:
    """The delivery a dead letter was made of: what :mod:`adapters.amqp_parse` reads of one."""

    body: bytes
    headers: dict[str, Any]
    exchange: str
    routing_key: str
    content_type: str | None = None
    content_encoding: str | None = None
    message_id: str | None = None
    correlation_id: str | None = None
    timestamp: datetime | None = None
    priority: int | None = None
    type: str | None = None
    app_id: str | None = None
    user_id: str | None = None


def letter_headers(message: AbstractIncomingMessage) -> dict[str, str]:
    """A letter's text headers (the dead-letter ones are text; tables and numbers are left out)."""
    out: dict[str, str] = {}
    for name, value in (message.headers or {}).items():
        if isinstance(value, bytes | bytearray | memoryview):
            out[str(name)] = bytes(value).decode("utf-8", "backslashreplace")  # as amqp_parse reads it
        elif isinstance(value, str):
            out[str(name)] = value
    return out


BROKER_DEAD_LETTERED = frozenset({"x-death", "x-first-death-queue", "x-last-death-queue"})
"""Headers RabbitMQ adds to a message it dead-letters itself; the letters the bridge writes are
published, and have none."""

H_MESSAGE_ID = H_ORIGINAL + "message-id"
"""The original ``message_id`` (empty: it had none), on the letters a replay writes back: the
client library gives a message published without one a random one, so a letter's own
``message_id`` may not be the delivery's."""


def original(message: AbstractIncomingMessage, fmt: EventFormat | None = None) -> tuple[str, Original] | str:
    """``(original queue, the delivery)`` a letter was made of, or why it cannot be told (a
    reason of :data:`adapters.replay_common.NOT_REPLAYABLE`).

    The letter's ``message_id`` is the delivery's unless the delivery had none: the client library
    then gave the letter a random one when it was published. :data:`H_MESSAGE_ID` says which,
    when the letter has it; otherwise, given the entry's ``fmt``, the delivery is taken to have
    had none when only that gives the event the id the letter recorded (``x-event-id``)."""
    if BROKER_DEAD_LETTERED & {str(k) for k in message.headers or {}}:
        # RabbitMQ dead-lettered it (it expired, overflowed or was rejected from a queue whose
        # x-dead-letter-exchange is this one, as the adapter declares its queues): its x-* headers
        # are its publisher's, and would name any queue and id it liked.
        return NOT_A_DEAD_LETTER
    headers = letter_headers(message)
    if is_trimmed(headers):
        return TRIMMED
    queue = headers.get(H_ORIGINAL + "queue")
    if not queue:
        return NOT_A_DEAD_LETTER
    rebuilt = _rebuilt(message, headers)
    if H_MESSAGE_ID in headers:
        rebuilt.message_id = headers[H_MESSAGE_ID] or None
    elif fmt is not None and rebuilt.message_id:
        rebuilt = _without_assigned_id(rebuilt, queue, fmt, letter_id(headers))
    return queue, rebuilt


def _event_id(delivery: Original, queue: str, fmt: EventFormat) -> str | None:
    try:
        return decode(to_message(delivery, queue), fmt).id
    except Exception:  # refused (or worse): its id is not known
        return None


def _without_assigned_id(delivery: Original, queue: str, fmt: EventFormat, recorded: str | None) -> Original:
    """The delivery without its ``message_id`` when that id is one the letter's publish assigned."""
    if recorded is None or _event_id(delivery, queue, fmt) == recorded:
        return delivery
    bare = replace(delivery, message_id=None)
    return bare if _event_id(bare, queue, fmt) == recorded else delivery


def _delivery_headers(message: AbstractIncomingMessage) -> dict[str, Any]:
    """The delivery's headers: the letter's without the dead-letter ones, and with the delivery's
    own death, ``CC`` and ``BCC`` headers under their names again (:data:`adapters.amqp_parse.H_AS_WAS`)."""
    out: dict[str, Any] = {}
    for key, value in (message.headers or {}).items():
        name = str(key)
        if name.lower().startswith(H_AS_WAS):
            out[name[len(H_AS_WAS) :]] = value
        elif not dropped_by_replay(name):
            out[name] = value
    return out


def _rebuilt(message: AbstractIncomingMessage, headers: Mapping[str, str]) -> Original:
    return Original(
        body=bytes(message.body),
        headers=_delivery_headers(message),
        exchange=headers.get(H_ORIGINAL + "exchange", ""),
        routing_key=headers.get(H_ORIGINAL + "routing-key", ""),
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        timestamp=message.timestamp,
        priority=message.priority,
        type=message.type,
        app_id=message.app_id,
    )


@dataclass(eq=False)
class Letter:
    """A message taken from the dead-letter queue, and the delivery it was made of."""

    message: AbstractIncomingMessage
    queue: str  # the queue the original delivery came from
    original: Original
    headers: Mapping[str, str]

    @property
    def where(self) -> str:
        return describe(self.message)


def describe(message: AbstractIncomingMessage) -> str:
    return f"delivery {message.delivery_tag} ({safe(fallback_id(message))})"


class AmqpReplay:
    """One replay of one dead-letter queue; :meth:`run` once."""

    def __init__(
        self,
        entries: Sequence[AmqpConsumer],
        pipeline: Pipeline,
        *,
        queue: str,
        url: str,
        batch: int = 200,
        dry_run: bool = False,
        give_up_after: float = 120.0,
        progress: Progress | None = None,
        report: Report | None = None,
    ) -> None:
        self.entries = list(entries)
        self.pipeline = pipeline
        self.queue_name = queue
        self.url = url
        self.batch = batch
        self.dry_run = dry_run
        self.give_up_after = give_up_after
        self.progress = progress or (lambda tally: None)
        self.report = report or (lambda line: None)
        self.tally = Tally()
        self.publisher: AbstractChannel | None = None
        self._held_back: list[AbstractIncomingMessage] = []
        self._outage_since: float | None = None
        self.stopped: str | None = None  # never set: taking fewer than counted is not stopping short
        self._settlers = [
            Settler(
                pipeline,
                _EntryTransport(self, entry),
                adapter=REPLAY_ADAPTER,
                name=f"replay {queue} → amqp:{entry.queue}",
                event=entry.event,
                on_unroutable="dead_letter",  # a replay never skips: what is refused stays a letter
                transient=(LetterNotOut,),
            )
            for entry in self.entries
        ]

    def entry_for(self, queue: str) -> int | None:
        """The entry that consumes ``queue``; when entries dead-letter, only one of them: only such
        an entry writes the letters replayed here (the ones RabbitMQ dead-letters itself are not
        replayed). A letter is believed on its word (``x-original-queue``), and one naming an entry
        that writes none (sent by anyone who may publish to this queue or its exchange) would
        otherwise take that entry's source scope and ids. With no entry dead-lettering (a config
        from which the exchange was taken out), a letter goes to the entry that consumes its queue,
        as a Kafka letter in a topic no entry dead-letters to does."""
        readers = [i for i, e in enumerate(self.entries) if e.queue == queue]
        if any(e.dead_letter_exchange for e in self.entries):
            readers = [i for i in readers if self.entries[i].dead_letter_exchange]
        return next(iter(readers), None)

    async def run(self) -> Tally:
        try:
            connection = await aio_pika.connect(self.url, client_properties={"connection_name": "signal-bridge replay"})
        except (AMQPError, ConnectionError, OSError) as exc:
            raise BridgeError(f"cannot connect to RabbitMQ for the replay of {self.queue_name}: {exc!r}") from exc
        async with connection:
            channel = await connection.channel(publisher_confirms=False)
            if not self.dry_run:
                self.publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
            try:
                queue = await channel.declare_queue(self.queue_name, passive=True)
            except AMQPError as exc:
                raise BridgeError(f"queue {self.queue_name} does not exist: {exc}") from exc
            count = queue.declaration_result.message_count or 0
            self.tally.total = count
            self.progress(self.tally)
            try:
                await self._read(queue, count)
            finally:
                await self._put_back()
        return self.tally

    async def _read(self, queue: AbstractQueue, count: int) -> None:
        """Take at most ``count`` messages (what the queue held at the start), a batch at a time."""
        taken = 0
        while taken < count:
            batch: list[AbstractIncomingMessage] = []
            while len(batch) < self.batch and taken + len(batch) < count:
                try:
                    message = await queue.get(no_ack=False, fail=True, timeout=GET_TIMEOUT)
                except QueueEmpty:
                    break
                if message is None:
                    break
                batch.append(message)
            if not batch:
                return  # fewer than counted: another consumer took some
            taken += len(batch)
            await self._settle(batch)
            self.progress(self.tally)

    async def _settle(self, messages: list[AbstractIncomingMessage]) -> None:
        self.tally.read += len(messages)
        groups: dict[int, list[Letter]] = {}
        report = self.report if self.dry_run else None
        for message in messages:
            rebuilt = original(message)
            entry = None if isinstance(rebuilt, str) else self.entry_for(rebuilt[0])
            if isinstance(rebuilt, str) or entry is None:
                kept(self.tally, rebuilt if isinstance(rebuilt, str) else NO_ENTRY, describe(message), report)
                self._held_back.append(message)
                continue
            rebuilt = original(message, self.entries[entry].event)  # again, knowing the entry's format
            assert not isinstance(rebuilt, str)
            groups.setdefault(entry, []).append(Letter(message, rebuilt[0], rebuilt[1], letter_headers(message)))
        for entry, letters in groups.items():
            if self.dry_run:
                fmt = self.entries[entry].event
                for letter in letters:
                    checked = inspect(self.pipeline, _to_message, fmt, letter)
                    count_checked(self.tally, checked, letter_id(letter.headers), letter.where, self.report)
                    self._held_back.append(letter.message)
                continue
            items = await self._settlers[entry].settle(letters)
            self._outage_since = None
            count_settled(self.tally, items, lambda m: letter_id(m.headers), lambda m: m.where)

    async def _put_back(self) -> None:
        """Requeue what was held back: RabbitMQ puts each where it was in the queue."""
        for message in self._held_back:
            with contextlib.suppress(ChannelInvalidStateError, *AMQP_ERRORS):
                # nack, not reject: RabbitMQ 4.3 counts a rejected delivery against a quorum
                # queue's delivery-limit (20 by default), past which it drops the message.
                await message.nack(requeue=True)
        self._held_back.clear()

    async def wait(self, seconds: float) -> bool:
        """Wait before another attempt; False once Temporal (or the publish) has refused for longer
        than ``give_up_after`` seconds: the replay stops, leaving the batch unacked."""
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
        if now - self._outage_since >= self.give_up_after:
            return False
        await asyncio.sleep(min(seconds, self.give_up_after - (now - self._outage_since)))
        return True


def _to_message(letter: Letter) -> Message:
    return to_message(letter.original, letter.queue)


class _EntryTransport(Transport[Letter]):
    """The settle path's view of the letters of one entry."""

    def __init__(self, replay: AmqpReplay, entry: AmqpConsumer) -> None:
        self.replay = replay
        self.entry = entry

    def to_message(self, message: Letter) -> Message:
        return _to_message(message)

    def fallback_id(self, message: Letter) -> str:
        return fallback_id(message.original)

    def usable(self, message: Letter) -> bool:
        try:
            return not message.message.channel.is_closed
        except ChannelInvalidStateError:
            return False

    def can_dead_letter(self) -> bool:
        return self.replay.publisher is not None

    async def dead_letter(self, items: Sequence[Item[Letter]]) -> None:
        """Publish each still-refused message again to the end of the dead-letter queue, as the
        adapter's dead letter of the original delivery with the new reason."""
        failures = [f for f in await asyncio.gather(*(self._republish(item) for item in items)) if f is not None]
        if failures:
            raise LetterNotOut(f"{len(failures)} of {len(items)} letter(s) not confirmed: {failures[0]!r}")

    async def _republish(self, item: Item[Letter]) -> BaseException | None:
        publisher = self.replay.publisher
        assert publisher is not None and item.error is not None
        # dead_letter_copy reads only the delivery's body, properties, headers, exchange and routing key.
        delivery = cast(AbstractIncomingMessage, item.message.original)
        try:
            try:
                copy = dead_letter_copy(delivery, item.error, item.message.queue, item.event)
                await self._publish(publisher, copy, item.message.original)
            except (TypeError, ValueError, OverflowError):
                copy = dead_letter_copy(delivery, item.error, item.message.queue, item.event, keep_headers=False)
                await self._publish(publisher, copy, item.message.original)
        except aio_pika.exceptions.PublishError as exc:  # the queue is gone: keep the message, unacked
            return exc
        except AMQP_ERRORS as exc:
            return exc
        item.disposition = Disposition.DEAD_LETTERED
        return None

    async def _publish(self, publisher: AbstractChannel, copy: aio_pika.Message, delivery: Original) -> None:
        copy.headers[H_MESSAGE_ID] = delivery.message_id or ""
        await publisher.default_exchange.publish(
            copy, routing_key=self.replay.queue_name, mandatory=True, timeout=PUBLISH_TIMEOUT
        )

    async def acknowledge(self, items: Sequence[Item[Letter]]) -> None:
        for item in items:
            with contextlib.suppress(ChannelInvalidStateError, *AMQP_ERRORS):
                await item.message.message.ack()

    async def wait(self, seconds: float) -> bool:
        return await self.replay.wait(seconds)


__all__ = ["Abandoned", "AmqpReplay", "Letter", "Original", "original"]
