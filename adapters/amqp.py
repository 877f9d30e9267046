"""The RabbitMQ door: one consumer per ``amqp:`` entry, acking only what Temporal holds.

Shape (the same as the other doors): parser (:func:`to_message` → :func:`bridge.decode.decode`),
consumer loop (:class:`AmqpAdapter`), acknowledgement. Deliveries are gathered up to the prefetch
window, decoded, and handed to :meth:`Pipeline.submit` as one batch, then settled, one table:

==========================================  ====================================================
outcome                                     what the door does
==========================================  ====================================================
accepted (Temporal holds it)                ``basic.ack``
malformed, no name, schema-invalid,         republish to ``dead_letter_exchange`` with
unroutable, too large                       ``x-dead-letter-reason`` headers, then ack; if that
                                            fails, ``basic.reject(requeue=False)`` (the queue's
                                            ``x-dead-letter-exchange`` catches it); no DLX: dropped
unroutable with ``on_unroutable: skip``     ack, counted as dropped
Temporal unavailable                        nothing; the batch is retried with capped backoff and
                                            the full prefetch window keeps RabbitMQ from sending
                                            more; stop() leaves the batch unacked (requeued)
channel lost before the ack                 nothing; RabbitMQ redelivers, the id dedupes it
==========================================  ====================================================

Event ids, first that exists: CloudEvents ``id`` · envelope ``id`` · ``event.id_from`` · AMQP
``message_id`` · ``hash:`` + sha256 of exchange, routing key and body (so a publisher that sets
no id and sends the same bytes twice gets one run). The source is ``amqp:{queue}`` (CloudEvents:
their ``source``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import (
    AMQPError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
)
from yarl import URL

from bridge.config import AmqpConsumer, BridgeConfig
from bridge.decode import Message, decode
from bridge.errors import EventRejected, Unavailable
from bridge.event import EventSignal, content_digest
from bridge.pipeline import Pipeline

log = logging.getLogger(__name__)

DOOR = "amqp"
CE_PREFIXES = ("cloudevents_", "cloudevents:")
# Dead-letter headers, the same names as the Kafka door's (the original headers are kept).
H_REASON = "x-dead-letter-reason"
H_ERROR = "x-dead-letter-error"
H_QUEUE = "x-original-queue"
H_EXCHANGE = "x-original-exchange"
H_ROUTING_KEY = "x-original-routing-key"
H_EVENT_ID = "x-event-id"
H_EVENT_NAME = "x-event-name"
DLX_HEADERS = (H_REASON, H_ERROR, H_QUEUE, H_EXCHANGE, H_ROUTING_KEY, H_EVENT_ID, H_EVENT_NAME)
KEPT_PROPERTIES = ("message_id", "correlation_id", "app_id", "type", "user_id")
MAX_BACKOFF = 5.0
LINGER = 0.01
RECONNECT_INTERVAL = 2
PUBLISH_TIMEOUT = 10.0
STOP_TIMEOUT = 30.0


class Delivery(Protocol):
    """What the parser reads from an ``aio_pika.IncomingMessage`` (a fake in unit tests)."""

    body: bytes
    headers: Mapping[str, Any] | None
    content_type: str | None
    message_id: str | None
    correlation_id: str | None
    timestamp: datetime | None
    exchange: str | None
    routing_key: str | None


# ---------------------------------------------------------------------------------------------
# Parser: delivery → Message → EventSignal


def _text(value: Any) -> str | None:
    """An AMQP field value as text; tables and arrays as JSON, None stays None."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float | Decimal):
        return str(value)
    return json.dumps(value, default=str, separators=(",", ":"))


def _ce_attribute(header: str) -> str | None:
    lowered = header.lower()
    for prefix in CE_PREFIXES:
        if lowered.startswith(prefix) and len(lowered) > len(prefix):
            return lowered[len(prefix) :]
    return None


def fallback_id(delivery: Delivery) -> str:
    """``message_id`` when the publisher set one, else a hash of where it went and what it says."""
    if delivery.message_id:
        return str(delivery.message_id)
    return "hash:" + content_digest(delivery.exchange or "", delivery.routing_key or "", delivery.body)


def to_message(delivery: Delivery, queue: str) -> Message:
    """Strip the transport: headers as text, CloudEvents binary-mode attributes split out."""
    headers: dict[str, str] = {}
    ce: dict[str, str] = {}
    for key, value in (delivery.headers or {}).items():
        text = _text(value)
        if text is None:
            continue
        attr = _ce_attribute(key)
        if attr is not None:
            ce[attr] = text
        else:
            headers[key] = text
    if ce and delivery.content_type and "datacontenttype" not in ce:
        ce["datacontenttype"] = delivery.content_type
    amqp = {"queue": queue, "exchange": delivery.exchange or "", "routing_key": delivery.routing_key or ""}
    for prop in KEPT_PROPERTIES:
        value = getattr(delivery, prop, None)
        if value:
            amqp[prop] = str(value)
    metadata: dict[str, Any] = {"headers": headers, "amqp": amqp}
    lowered = {k.lower(): v for k, v in headers.items()}
    if delivery.correlation_id or "x-correlation-id" in lowered:
        metadata["correlation_id"] = str(delivery.correlation_id or lowered["x-correlation-id"])
    for trace in ("traceparent", "tracestate"):
        if trace in lowered:
            metadata[trace] = lowered[trace]
    return Message(
        body=bytes(delivery.body),
        source=f"{DOOR}:{queue}",
        fallback_id=fallback_id(delivery),
        headers=headers,
        ce_attributes=ce,
        content_type=delivery.content_type,
        key=delivery.routing_key,
        metadata=metadata,
    )


def parse(delivery: Delivery, entry: AmqpConsumer) -> EventSignal:
    """One delivery → one event, or :class:`EventRejected` (``malformed`` / ``no_name``)."""
    event = decode(to_message(delivery, entry.queue), entry.event)
    if delivery.timestamp and "cloudevents" not in event.metadata:
        event.time = _text(delivery.timestamp) or event.time
    return event


# ---------------------------------------------------------------------------------------------
# Consumer


@dataclass
class _Item:
    message: AbstractIncomingMessage
    event: EventSignal | None = None
    rejected: EventRejected | None = None


def _alive(message: AbstractIncomingMessage) -> bool:
    """False once the channel it came on is gone: it cannot be acked and will be redelivered."""
    try:
        return not message.channel.is_closed
    except ChannelInvalidStateError:
        return False


class AmqpAdapter:
    """Consumes one queue; see the module docstring for the settle table."""

    def __init__(self, entry: AmqpConsumer, pipeline: Pipeline, *, project: str = "signal-bridge") -> None:
        self.entry = entry
        self.pipeline = pipeline
        self.project = project
        self.name = f"amqp:{entry.queue}"
        self.max_batch = entry.prefetch
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._publisher: AbstractChannel | None = None
        self._dlx: AbstractExchange | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.waiting_for_temporal = False

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
            await self._declare()
            assert self._queue is not None
            self._task = asyncio.create_task(self._run(), name=f"consumer-{self.name}")
            self._tag = await self._queue.consume(self._on_message)
        except BaseException:
            await self.stop()
            raise
        log.info(
            "amqp consumer started queue=%s prefetch=%d bindings=%d dead_letter_exchange=%s",
            self.entry.queue,
            self.entry.prefetch,
            len(self.entry.bindings),
            self.entry.dead_letter_exchange,
        )

    async def stop(self) -> None:
        """Stop taking deliveries, finish the batch in hand, close; RabbitMQ requeues the rest."""
        self._stopping.set()
        if self._queue is not None and self._tag is not None:
            with contextlib.suppress(AMQPError, ConnectionError, RuntimeError, TimeoutError):
                await asyncio.wait_for(self._queue.cancel(self._tag), 5)
        if self._task is not None:
            self._inbox.put_nowait(_STOP)  # type: ignore[arg-type]
            try:
                await asyncio.wait_for(asyncio.shield(self._task), STOP_TIMEOUT)
            except TimeoutError:
                log.warning("amqp consumer %s did not finish its batch in time; leaving it unacked", self.name)
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._connection is not None:
            await self._connection.close()
        log.info("amqp consumer stopped queue=%s", self.entry.queue)

    def healthy(self) -> bool:
        conn = self._connection
        return (
            conn is not None
            and not conn.is_closed
            and conn.connected.is_set()
            and self._task is not None
            and not self._task.done()
        )

    # -- topology -------------------------------------------------------------------------------

    async def _declare(self) -> None:
        assert self._connection is not None
        entry = self.entry
        channel = self._channel = await self._connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=entry.prefetch)
        arguments: dict[str, Any] = {}
        if entry.dead_letter_exchange:
            self._publisher = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
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
        self._inbox.put_nowait(message)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            batch = await self._gather()
            try:
                await self._process(batch)
            except Exception:
                # A bug, not a transport or Temporal problem (those are handled inside): hand the
                # unsettled deliveries back to RabbitMQ rather than sit on them.
                log.exception("amqp batch failed queue=%s; requeueing what was not settled", self.entry.queue)
                for message in batch:
                    if not message.processed:
                        await _settle(message.nack(requeue=True))

    async def _gather(self) -> list[AbstractIncomingMessage]:
        """The first delivery, then whatever arrives within LINGER, up to the prefetch window."""
        first = await self._inbox.get()
        if first is _STOP:
            return []
        batch = [first]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LINGER
        while len(batch) < self.max_batch:
            if self._inbox.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        nxt = await self._inbox.get()
                except TimeoutError:
                    break
            else:
                nxt = self._inbox.get_nowait()
            if nxt is _STOP:
                self._stopping.set()
                break
            batch.append(nxt)
        return batch

    async def _process(self, messages: list[AbstractIncomingMessage]) -> None:
        items = [self._parse(m) for m in messages]
        poison = [i for i in items if i.rejected is not None]
        good = [i for i in items if i.event is not None]
        if good:
            poison.extend(await self._submit(good))
        if poison:
            await asyncio.gather(*(self._dead_letter(i) for i in poison))

    def _parse(self, message: AbstractIncomingMessage) -> _Item:
        try:
            return _Item(message, event=parse(message, self.entry))
        except EventRejected as exc:
            self.pipeline.reject(DOOR, None, fallback_id(message), exc)
            return _Item(message, rejected=exc)
        except Exception as exc:  # a message the decoder did not foresee: dead-letter it, loudly
            log.exception("amqp message could not be decoded id=%s", fallback_id(message))
            rejected = EventRejected("malformed", f"cannot decode: {exc!r}")
            self.pipeline.reject(DOOR, None, fallback_id(message), rejected)
            return _Item(message, rejected=rejected)

    async def _submit(self, items: list[_Item]) -> list[_Item]:
        """Submit until Temporal holds the events; ack them; return the ones it refused for good."""
        backoff = 0.5
        while True:
            items = [i for i in items if _alive(i.message)]
            if not items:
                return []
            try:
                outcomes = await self.pipeline.submit([i.event for i in items if i.event], DOOR)
            except EventRejected as exc:
                if len(items) == 1:
                    event = items[0].event
                    self.pipeline.reject(DOOR, event.name if event else None, event.id if event else None, exc)
                    items[0].rejected = exc
                    return items
                half = len(items) // 2
                return [*await self._submit(items[:half]), *await self._submit(items[half:])]
            except Exception as exc:
                if not isinstance(exc, Unavailable):
                    log.exception("amqp submit failed unexpectedly queue=%s; retrying", self.entry.queue)
                if self._stopping.is_set():
                    log.warning("stopping with %d events Temporal did not take; left unacked", len(items))
                    return []
                if not self.waiting_for_temporal:
                    log.warning(
                        "Temporal unavailable; holding %d deliveries unacked and retrying queue=%s: %s",
                        len(items),
                        self.entry.queue,
                        exc,
                    )
                self.waiting_for_temporal = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            if self.waiting_for_temporal:
                log.info("Temporal answers again; consuming queue=%s", self.entry.queue)
                self.waiting_for_temporal = False
            refused = []
            for item, outcome in zip(items, outcomes, strict=True):
                if outcome.rejected is None:
                    await _settle(item.message.ack())
                else:
                    item.rejected = outcome.rejected
                    refused.append(item)
            return refused

    async def _dead_letter(self, item: _Item) -> None:
        rej, message, event = item.rejected, item.message, item.event
        assert rej is not None
        event_id = event.id if event else fallback_id(message)
        if rej.reason == "unroutable" and self.entry.on_unroutable == "skip":
            self.pipeline.metrics.dropped.labels(DOOR, rej.reason).inc()
            log.info("amqp message skipped (on_unroutable: skip) queue=%s id=%s", self.entry.queue, event_id)
            await _settle(message.ack())
            return
        if self._dlx is None:
            self.pipeline.metrics.dropped.labels(DOOR, rej.reason).inc()
            log.warning(
                "amqp message rejected without requeue (no dead_letter_exchange) queue=%s reason=%s id=%s",
                self.entry.queue,
                rej.reason,
                event_id,
            )
            await _settle(message.reject(requeue=False))
            return
        try:
            await self._dlx.publish(
                dead_letter_copy(message, rej, self.entry.queue, event),
                routing_key=message.routing_key or "",
                mandatory=True,
                timeout=PUBLISH_TIMEOUT,
            )
        except aio_pika.exceptions.PublishError:
            self.pipeline.metrics.dropped.labels(DOOR, rej.reason).inc()
            log.error(
                "dead-letter exchange %s routes to no queue: message dropped reason=%s id=%s; bind a queue to it",
                self.entry.dead_letter_exchange,
                rej.reason,
                event_id,
            )
        except (AMQPError, ConnectionError, RuntimeError, TimeoutError) as exc:
            # The queue carries x-dead-letter-exchange, so RabbitMQ dead-letters it (without our headers).
            log.warning("dead-letter republish failed (%r); rejecting id=%s without requeue", exc, event_id)
            await _settle(message.reject(requeue=False))
            return
        else:
            log.info(
                "amqp message dead-lettered queue=%s exchange=%s reason=%s id=%s",
                self.entry.queue,
                self.entry.dead_letter_exchange,
                rej.reason,
                event_id,
            )
        await _settle(message.ack())


_STOP: Any = object()


async def _settle(call: Any) -> None:
    """Ack / reject; a lost channel means RabbitMQ redelivers it, and the event id dedupes it."""
    try:
        await call
    except (ChannelInvalidStateError, AMQPError, ConnectionError, RuntimeError) as exc:
        log.info("could not settle a delivery (%r); it will be redelivered", exc)


def dead_letter_copy(
    message: AbstractIncomingMessage, rej: EventRejected, queue: str, event: EventSignal | None = None
) -> aio_pika.Message:
    """The delivery as it came (body, properties, headers minus stale dead-letter ones) plus why."""
    headers = {k: v for k, v in (message.headers or {}).items() if k.lower() not in DLX_HEADERS}
    headers.update(
        {
            H_REASON: rej.reason,
            H_ERROR: rej.message[:1000],
            H_QUEUE: queue,
            H_EXCHANGE: message.exchange or "",
            H_ROUTING_KEY: message.routing_key or "",
        }
    )
    if event is not None:
        headers.update({H_EVENT_ID: event.id, H_EVENT_NAME: event.name})
    return aio_pika.Message(
        body=message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


def build(entry: AmqpConsumer, pipeline: Pipeline, config: BridgeConfig) -> AmqpAdapter:
    return AmqpAdapter(entry, pipeline, project=config.project)
