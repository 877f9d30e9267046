"""The RabbitMQ adapter: one consumer per ``amqp:`` entry, acking only what Temporal holds.

This module is only the transport: it declares the queue and its bindings, gathers deliveries up
to the prefetch window, hands each batch to :class:`bridge.settle.Settler` (deliveries become
messages and dead-letter copies in :mod:`adapters.amqp_parse`), acks (or rejects) what that
settles, republishes dead letters, and leaves the rest to RabbitMQ: while Temporal refuses (or
this process is overloaded) or a dead letter cannot be published, the prefetch window stays unacked
so the broker sends nothing more; a bug nacks with requeue; a lost channel redelivers.
Configuration, event ids and what happens to a poison message: docs/rabbitmq.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Sequence
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, ChannelNotFoundEntity, ChannelPreconditionFailed
from yarl import URL

from adapters.amqp_parse import (
    ADAPTER,
    CE_PREFIXES,
    KEPT_PROPERTIES,
    Delivery,
    dead_letter_copy,
    fallback_id,
    parse,
    short,
    to_message,
)
from bridge.aio import how_it_ended, within
from bridge.config import AmqpConsumer, BridgeConfig
from bridge.decode import Message
from bridge.logsafe import safe
from bridge.pipeline import Pipeline
from bridge.settle import Abandoned, Disposition, Inbox, Item, Settler, Transport

__all__ = [
    "ADAPTER",
    "CE_PREFIXES",
    "KEPT_PROPERTIES",
    "AmqpAdapter",
    "Delivery",
    "build",
    "dead_letter_copy",
    "fallback_id",
    "parse",
    "to_message",
]

log = logging.getLogger(__name__)

# Transport errors while acking or republishing: an ack that fails leaves the delivery to come
# back; a republish that fails is retried in place (see LetterNotOut).
AMQP_ERRORS = (AMQPError, ConnectionError, RuntimeError, TimeoutError)
LINGER = 0.01
RECONNECT_INTERVAL = 2
PUBLISH_TIMEOUT = 10.0
STOP_TIMEOUT = 30.0
CONSUMER_CHECK = 2.0
"""Seconds between looks at whether RabbitMQ still has the adapter's consumer: it cancels one whose
queue was deleted (or declared again with other arguments), and aio-pika then tries to consume
again every few seconds, saying so only at DEBUG."""


# --- the consumer ---------------------------------------------------------------------------------


class AmqpAdapter(Transport[AbstractIncomingMessage]):
    """Consumes one queue; acks what the settle path settles, leaves the rest to RabbitMQ."""

    def __init__(self, entry: AmqpConsumer, pipeline: Pipeline, *, project: str = "signal-bridge") -> None:
        self.entry = entry
        self.pipeline = pipeline
        self.project = project
        self.name = f"amqp:{entry.queue}"
        self.settler = Settler(
            pipeline,
            self,
            adapter=ADAPTER,
            name=self.name,
            event=entry.event,
            on_unroutable=entry.on_unroutable,
            transient=(LetterNotOut,),
        )
        self._connection: AbstractRobustConnection | None = None
        self._letters: AbstractRobustConnection | None = None  # the dead letters' own
        self._channel: AbstractChannel | None = None
        self._publisher: AbstractChannel | None = None
        self._dlx: AbstractExchange | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._inbox: Inbox[AbstractIncomingMessage] = Inbox(max_batch=entry.prefetch, linger=LINGER)
        self._task: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._consuming = True  # RabbitMQ had our consumer at the last look (CONSUMER_CHECK)
        self._stopping = asyncio.Event()

    @property
    def waiting_for_temporal(self) -> bool:
        """True while Temporal refuses and the batch in hand waits, unacked."""
        return self.settler.waiting

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        url = URL(self.entry.url)
        kwargs: dict[str, Any] = {}
        if "reconnect_interval" not in url.query:
            kwargs["reconnect_interval"] = RECONNECT_INTERVAL
        if "name" not in url.query:
            kwargs["client_properties"] = {"connection_name": f"signal-bridge {self.project} {self.name}"}
        self._connection = await aio_pika.connect_robust(self.entry.url, **kwargs)
        try:
            if self.entry.dead_letter_exchange:
                # Letters go on a connection of their own: RabbitMQ blocks a connection that
                # publishes during a memory or disk alarm, and stops reading it, acks included. On
                # the consumer's, one letter held every ack of events Temporal already had, and a
                # backlog keeping the alarm up was never drained.
                if "client_properties" in kwargs:
                    name = f"signal-bridge {self.project} {self.name} letters"
                    kwargs["client_properties"] = {"connection_name": name}
                self._letters = await aio_pika.connect_robust(self.entry.url, **kwargs)
            await self._declare()
            assert self._queue is not None
            self._task = asyncio.create_task(self._run(), name=f"consumer-{self.name}")
            self._tag = await self._queue.consume(self._on_message)
            self._watch = asyncio.create_task(self._watch_consumer(), name=f"consumer-watch-{self.name}")
        except BaseException:
            await self.stop()
            raise
        log.info(
            "amqp adapter started queue=%s prefetch=%d bindings=%d dead_letter_exchange=%s",
            self.entry.queue,
            self.entry.prefetch,
            len(self.entry.bindings),
            self.entry.dead_letter_exchange,
        )

    async def stop(self) -> None:
        """Stop taking deliveries, finish the batch in hand, close; RabbitMQ requeues the rest."""
        self._stopping.set()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._queue is not None and self._tag is not None:
            with contextlib.suppress(AMQPError, ConnectionError, RuntimeError, TimeoutError):
                await within(5, self._queue.cancel(self._tag))
        if self._task is not None:
            self._inbox.close()
            if not await within(STOP_TIMEOUT, asyncio.shield(self._task)):
                log.warning("amqp adapter %s did not finish its batch in time; leaving it unacked", self.name)
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        for connection in (self._letters, self._connection):
            if connection is not None:  # each closed whatever the other's close raised
                with contextlib.suppress(AMQPError, ConnectionError, RuntimeError, TimeoutError):
                    await connection.close()
        log.info("amqp adapter stopped queue=%s", self.entry.queue)

    def ended(self) -> str | None:
        task = self._task
        if task is None or not task.done() or self._stopping.is_set():
            return None
        return "its loop ended" + how_it_ended(task)

    def healthy(self) -> bool:
        conn = self._connection
        return (
            conn is not None
            and not conn.is_closed
            and conn.connected.is_set()
            and self._task is not None
            and not self._task.done()
            and self._consuming
            and not self.settler.letters_failing()
        )

    async def _watch_consumer(self) -> None:
        """Keep :attr:`_consuming` up to date, with a log line when it changes: /readyz was green
        while RabbitMQ had cancelled the consumer and nothing was read."""
        while not await within(CONSUMER_CHECK, self._stopping.wait()):
            consuming = await self._has_consumer()
            if consuming != self._consuming:
                if consuming:
                    log.info("amqp adapter %s: consuming again", self.name)
                else:
                    log.warning(
                        "amqp adapter %s: RabbitMQ has no consumer of queue %s (was it deleted?); "
                        "/readyz is red while the client tries to consume again",
                        self.name,
                        self.entry.queue,
                    )
            self._consuming = consuming

    async def _has_consumer(self) -> bool:
        if self._channel is None or self._tag is None:
            return False
        try:
            channel = await self._channel.get_underlay_channel()
        except (AMQPError, RuntimeError):  # being opened again
            return False
        # As aio-pika's own recovery reads it; a closed channel keeps the tags it had.
        return not channel.is_closed and self._tag in cast(aiormq.Channel, channel).consumers

    # -- topology -------------------------------------------------------------------------------

    async def _declare(self) -> None:
        assert self._connection is not None
        entry = self.entry
        channel = self._channel = await self._connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=entry.prefetch)
        arguments: dict[str, Any] = {}
        if entry.dead_letter_exchange:
            assert self._letters is not None
            self._publisher = await self._letters.channel(publisher_confirms=True, on_return_raises=True)
            self._dlx = await self._ensure_exchange(
                self._publisher, entry.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, quiet=True
            )
            arguments["x-dead-letter-exchange"] = entry.dead_letter_exchange
        if await self._try(lambda ch: ch.declare_queue(entry.queue, durable=True, arguments=arguments)):
            queue = await channel.declare_queue(entry.queue, durable=True, arguments=arguments)
        else:
            log.warning(
                "queue %s exists with other arguments (durability, x-dead-letter-exchange, type); using it "
                "as it is (the bridge still republishes poison messages to dead_letter_exchange=%s itself)",
                entry.queue,
                entry.dead_letter_exchange,
            )
            queue = await channel.declare_queue(entry.queue, passive=True)
        for binding in entry.bindings:
            exchange = await self._ensure_exchange(
                channel, binding.exchange, aio_pika.ExchangeType(binding.exchange_type)
            )
            await queue.bind(exchange, routing_key=binding.routing_key)
        self._queue = queue

    async def _ensure_exchange(
        self, channel: AbstractChannel, name: str, kind: aio_pika.ExchangeType, *, quiet: bool = False
    ) -> AbstractExchange:
        """Declare durable when absent; an existing exchange is used as it is."""
        if await self._try(lambda ch: ch.declare_exchange(name, passive=True, robust=False)):
            if not quiet and not await self._try(
                lambda ch: ch.declare_exchange(name, kind, durable=True, robust=False)
            ):
                log.warning("exchange %s exists with a type or durability other than %s", name, kind.value)
            return await channel.declare_exchange(name, passive=True)
        return await channel.declare_exchange(name, kind, durable=True)

    async def _try(self, declare: Any) -> bool:
        """Run a declaration on a throwaway channel: False when RabbitMQ refuses it (404 / 406)."""
        assert self._connection is not None
        probe = await self._connection.channel(publisher_confirms=False)
        try:
            await declare(probe)
        except (ChannelNotFoundEntity, ChannelPreconditionFailed):
            return False
        finally:
            with contextlib.suppress(AMQPError, RuntimeError):
                await probe.close()
        return True

    # -- consuming ------------------------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._inbox.put(message)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            batch = await self._inbox.take()  # the prefetch window, or what came within LINGER
            try:
                await self._process(batch)
            except Exception:
                # A bug, not a transport or Temporal problem (those are handled inside): hand the
                # unsettled deliveries back to RabbitMQ rather than sit on them.
                pause = self.settler.backoff.cap
                log.exception(
                    "amqp adapter %s: batch failed; requeueing what was not settled, then %ss", self.name, pause
                )
                for message in batch:
                    if not message.processed:
                        await _settle(message.nack(requeue=True))
                await self.wait(pause)  # so a failure that repeats does not spin

    async def _process(self, messages: list[AbstractIncomingMessage]) -> None:
        try:
            await self.settler.settle(messages)
        except Abandoned as exc:
            log.warning("amqp adapter %s: %s; the unacked deliveries go back to the queue", self.name, exc)

    # -- the transport the settle path drives ------------------------------------------------------

    def to_message(self, message: AbstractIncomingMessage) -> Message:
        return to_message(message, self.entry.queue)

    def fallback_id(self, message: AbstractIncomingMessage) -> str:
        return fallback_id(message)

    def usable(self, message: AbstractIncomingMessage) -> bool:
        """False once the channel it came on is gone: it cannot be acked and will be redelivered."""
        try:
            return not message.channel.is_closed
        except ChannelInvalidStateError:
            return False

    def can_dead_letter(self) -> bool:
        return self._dlx is not None

    async def dead_letter(self, items: Sequence[Item[AbstractIncomingMessage]]) -> None:
        """Republish every letter; raise :class:`LetterNotOut` (the settle path retries those not
        out yet, with backoff, while their deliveries stay unacked) if any publish failed."""
        failures: list[BaseException] = []
        for wave in _by_message_id(items):
            failures += [f for f in await asyncio.gather(*(self._republish(item) for item in wave)) if f is not None]
        if failures:
            raise LetterNotOut(f"{len(failures)} of {len(items)} dead letter(s) not confirmed: {failures[0]!r}")

    async def _republish(self, item: Item[AbstractIncomingMessage]) -> BaseException | None:
        """Publish one dead letter and mark it out; the transport error when that failed. A copy
        whose headers cannot be written goes with the dead-letter headers only."""
        message, error = item.message, item.error
        assert error is not None
        try:
            try:
                await self._publish(dead_letter_copy(message, error, self.entry.queue, item.event), message)
            except (TypeError, ValueError, OverflowError) as exc:
                log.warning(
                    "amqp adapter %s: the headers of %s cannot be written again (%r); dead-lettering it without them",
                    self.name,
                    safe(fallback_id(message)),
                    exc,
                )
                bare = dead_letter_copy(message, error, self.entry.queue, item.event, keep_headers=False)
                try:
                    await self._publish(bare, message)
                except (TypeError, ValueError, OverflowError) as again:
                    # Nothing of it can be written: rejected without requeue, not back for ever.
                    self.pipeline.metrics.dropped.labels(ADAPTER, error.reason).inc()
                    log.error(
                        "amqp adapter %s: %s cannot be dead-lettered (%r); rejected to the queue's own policy",
                        self.name,
                        safe(fallback_id(message)),
                        again,
                    )
                    item.disposition = Disposition.DROPPED
                    return None
        except aio_pika.exceptions.PublishError:
            self.pipeline.metrics.dropped.labels(ADAPTER, error.reason).inc()
            log.error(
                "dead-letter exchange %s routes to no queue: message dropped reason=%s id=%s; bind a queue to it",
                self.entry.dead_letter_exchange,
                error.reason,
                safe(fallback_id(message)),
            )
            item.disposition = Disposition.SKIPPED  # acked: the letter routes nowhere anyway
        except AMQP_ERRORS as exc:
            return exc
        else:
            item.disposition = Disposition.DEAD_LETTERED
        return None

    async def _publish(self, copy: aio_pika.Message, original: AbstractIncomingMessage) -> None:
        assert self._dlx is not None
        key = short(original.routing_key or "")
        await self._dlx.publish(copy, routing_key=key, mandatory=True, timeout=PUBLISH_TIMEOUT)

    async def acknowledge(self, items: Sequence[Item[AbstractIncomingMessage]]) -> None:
        for item in items:
            if item.disposition is Disposition.DROPPED:  # no dead-letter exchange: the queue's policy decides
                await _settle(item.message.reject(requeue=False))
            else:
                await _settle(item.message.ack())

    async def wait(self, seconds: float) -> bool:
        """The prefetch window stays unacked meanwhile, so RabbitMQ sends nothing more."""
        await within(seconds, self._stopping.wait())
        return not self._stopping.is_set()


class LetterNotOut(Exception):
    """A dead-letter publish failed (the broker away, a nack, a timeout): the settle path retries
    it with backoff, holding the delivery; a dead letter is never dropped for it."""


async def _settle(call: Awaitable[Any]) -> None:
    """Ack / reject; a lost channel means RabbitMQ redelivers it, and the event id dedupes it."""
    try:
        await call
    except (ChannelInvalidStateError, *AMQP_ERRORS) as exc:
        log.info("could not settle a delivery (%r); it will be redelivered", exc)


def build(entry: AmqpConsumer, pipeline: Pipeline, config: BridgeConfig) -> AmqpAdapter:
    return AmqpAdapter(entry, pipeline, project=config.project)


def _by_message_id(items: Sequence[Item[AbstractIncomingMessage]]) -> list[list[Item[AbstractIncomingMessage]]]:
    """The letters in waves, no two of one wave with the same ``message_id``, in order. aiormq
    matches a letter RabbitMQ returns (routed to no queue) to its publish by ``message_id``, the
    last publish with it winning: two in flight at once with one id (a publisher's retry, a
    constant id) had the return given to the other, and the unroutable one counted as written and
    its delivery acked. A letter without an id gets a random one from aiormq."""
    waves: list[list[Item[AbstractIncomingMessage]]] = []
    earlier: Counter[Any] = Counter()  # letters with each id placed so far: the next goes a wave later
    for item in items:
        key = short(item.message.message_id) or None  # no id, or "": aiormq gives it a random one
        at = 0 if key is None else earlier[key]
        if key is not None:
            earlier[key] += 1
        if at == len(waves):
            waves.append([])
        waves[at].append(item)
    return waves
