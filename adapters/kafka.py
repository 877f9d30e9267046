"""The Kafka door: consumer-group records → the shared pipeline → offsets committed.

One consumer per ``kafka:`` entry. It reads batches with ``getmany``, decodes every record with
:func:`bridge.decode.decode`, hands the decodable ones to :meth:`Pipeline.submit` in one call,
dead-letters (or logs, counts and skips) the rest, and only then commits ``last offset + 1`` of
each partition in the batch. Nothing is committed that Temporal does not hold, so a crash or a
rebalance re-delivers, and the deterministic child ids make the re-delivery start nothing twice.

What happens to a batch, one table:

=====================================  ===================================================
what                                   then
=====================================  ===================================================
decoded, routable, schema-valid        submitted; committed once Temporal holds it
not JSON, no name, bad CloudEvent      ``malformed`` / ``no_name`` → dead letter, commit
schema refuses, no trigger names it    ``schema_invalid`` / ``unroutable`` → dead letter, commit
larger than one signal may carry       ``too_large`` → dead letter, commit
no ``dead_letter_topic`` configured    the above are logged, counted (``dropped``), committed
Temporal (or the DLQ topic) refuses    partitions paused, capped backoff, the batch retried
=====================================  ===================================================

While paused the consumer keeps calling ``getmany`` (it returns nothing), so the group does not
evict it during a long outage; partitions assigned by a rebalance meanwhile are paused too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.helpers import create_ssl_context
from aiokafka.structs import ConsumerRecord

from bridge.config import BridgeConfig, EventFormat, KafkaConsumer, KafkaSecurity
from bridge.decode import Message, decode
from bridge.errors import BridgeError, EventRejected, Unavailable
from bridge.event import EventSignal
from bridge.pipeline import Pipeline

log = logging.getLogger(__name__)
T = TypeVar("T")

DOOR = "kafka"
CE_PREFIX = "ce_"
KEPT_HEADERS = ("traceparent", "tracestate", "x-request-id", "x-correlation-id", "correlation-id")

# Dead-letter record headers (the key, value and original headers are kept as they were).
H_REASON = "x-dead-letter-reason"
H_ERROR = "x-dead-letter-error"
H_TOPIC = "x-original-topic"
H_PARTITION = "x-original-partition"
H_OFFSET = "x-original-offset"
H_TIMESTAMP = "x-original-timestamp"
H_EVENT_ID = "x-event-id"
H_EVENT_NAME = "x-event-name"
DLQ_HEADERS = (H_REASON, H_ERROR, H_TOPIC, H_PARTITION, H_OFFSET, H_TIMESTAMP, H_EVENT_ID, H_EVENT_NAME)

POLL_MS = 500
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 10.0
REVOKE_WAIT = 15.0
STOP_GRACE = 30.0


# --- parsing: ConsumerRecord → Message → EventSignal ------------------------------------------


def _text(raw: bytes | str | None) -> str:
    if raw is None:
        return ""
    return raw if isinstance(raw, str) else raw.decode("utf-8", errors="replace")


def record_headers(record: ConsumerRecord[Any, Any]) -> dict[str, str]:
    """Headers as ``str → str``; the first of repeated names wins, as in HTTP bindings."""
    out: dict[str, str] = {}
    for name, value in record.headers or ():
        out.setdefault(name, _text(value))
    return out


def fallback_id(record: ConsumerRecord[Any, Any]) -> str:
    return f"kafka:{record.topic}:{record.partition}:{record.offset}"


def to_message(record: ConsumerRecord[Any, Any]) -> Message:
    """What :func:`bridge.decode.decode` needs from a record; no aiokafka type goes further."""
    headers = record_headers(record)
    lowered = {k.lower(): v for k, v in headers.items()}
    ce = {k[len(CE_PREFIX) :]: v for k, v in lowered.items() if k.startswith(CE_PREFIX) and len(k) > 3}
    content_type = lowered.get("content-type")
    if ce and content_type and "datacontenttype" not in ce:
        ce["datacontenttype"] = content_type
    kept = {h: lowered[h] for h in KEPT_HEADERS if h in lowered}
    metadata: dict[str, Any] = {
        "headers": kept,
        "kafka": {
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "timestamp": record.timestamp,
        },
    }
    correlation = kept.get("x-correlation-id") or kept.get("correlation-id")
    if correlation:
        metadata["correlation_id"] = correlation
    if "traceparent" in kept:
        metadata["traceparent"] = kept["traceparent"]
    return Message(
        body=record.value if isinstance(record.value, bytes) else _text(record.value).encode(),
        source=f"kafka:{record.topic}",
        fallback_id=fallback_id(record),
        headers=headers,
        ce_attributes=ce,
        content_type=content_type,
        key=None if record.key is None else _text(record.key),
        metadata=metadata,
    )


def parse(record: ConsumerRecord[Any, Any], fmt: EventFormat) -> EventSignal:
    """One record → one event, or :class:`EventRejected`; the record's timestamp is the event time
    unless it is a CloudEvent (which carries its own)."""
    event = decode(to_message(record), fmt)
    if "cloudevents" not in event.metadata and record.timestamp and record.timestamp > 0:
        event.time = datetime.fromtimestamp(record.timestamp / 1000, UTC).isoformat()
    return event


def dead_letter_headers(
    record: ConsumerRecord[Any, Any], exc: EventRejected, event: EventSignal | None = None
) -> list[tuple[str, bytes]]:
    """The original headers (minus any stale dead-letter ones) plus why and where from."""
    kept = [(k, v) for k, v in record.headers or () if k.lower() not in DLQ_HEADERS]
    extra = [
        (H_REASON, exc.reason),
        (H_ERROR, exc.message[:1000]),
        (H_TOPIC, record.topic),
        (H_PARTITION, str(record.partition)),
        (H_OFFSET, str(record.offset)),
        (H_TIMESTAMP, str(record.timestamp)),
    ]
    if event is not None:
        extra += [(H_EVENT_ID, event.id), (H_EVENT_NAME, event.name)]
    return kept + [(k, v.encode()) for k, v in extra]


def client_options(security: KafkaSecurity) -> dict[str, Any]:
    """aiokafka connection keywords for ``security:`` (shared by the consumer and the DLQ producer)."""
    opts: dict[str, Any] = {"security_protocol": security.protocol}
    if security.protocol in ("SSL", "SASL_SSL"):
        opts["ssl_context"] = create_ssl_context(
            cafile=security.ssl_cafile, certfile=security.ssl_certfile, keyfile=security.ssl_keyfile
        )
    if security.protocol.startswith("SASL_"):
        opts["sasl_mechanism"] = security.sasl_mechanism or "PLAIN"
        opts["sasl_plain_username"] = security.username
        opts["sasl_plain_password"] = security.password
    return opts


def default_group_id(config: BridgeConfig) -> str:
    return f"signal-bridge-{config.slug}"


# --- the consumer -------------------------------------------------------------------------------


@dataclass
class _Poison:
    record: ConsumerRecord[Any, Any]
    error: EventRejected
    event: EventSignal | None = None


class _GiveUp(Exception):
    """The batch in hand is abandoned: stopping, or a rebalance took its partitions."""


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, door: KafkaDoor) -> None:
        self.door = door

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.door._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.door._on_assigned(assigned)


class KafkaDoor:
    """One ``kafka:`` entry: a consumer in a group, plus a producer when dead-lettering."""

    def __init__(self, entry: KafkaConsumer, pipeline: Pipeline, config: BridgeConfig) -> None:
        self.entry = entry
        self.pipeline = pipeline
        self.group_id = entry.group_id or default_group_id(config)
        self.name = f"kafka:{','.join(entry.topics)}"
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._generation = 0
        self._failures = 0
        self._outage_since = 0.0
        self._broken = False

    @property
    def paused(self) -> bool:
        """True while Temporal (or the dead-letter topic) refuses and the partitions are paused."""
        return self._failures > 0

    def healthy(self) -> bool:
        """Consuming: the loop runs and its last batch did not fail unexpectedly."""
        return self._task is not None and not self._task.done() and not self._broken

    async def start(self) -> None:
        opts = client_options(self.entry.security)
        servers = self.entry.bootstrap_servers
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=servers,
            group_id=self.group_id,
            client_id=f"signal-bridge-{self.group_id}",
            enable_auto_commit=False,
            auto_offset_reset=self.entry.auto_offset_reset,
            isolation_level="read_committed",
            max_poll_records=self.entry.max_batch,
            **opts,
        )
        try:
            await self.consumer.start()
            # Subscribing after start: the group join runs in the background instead of holding
            # up the bridge's start (and every door after this one) until partitions are assigned.
            self.consumer.subscribe(self.entry.topics, listener=_Listener(self))
            if self.entry.dead_letter_topic:
                self.producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all", enable_idempotence=True, **opts)
                await self.producer.start()
        except KafkaError as exc:
            await self._close_clients()
            raise BridgeError(f"{self.name}: cannot connect to Kafka at {servers}: {exc}") from exc
        self._task = asyncio.create_task(self._run(), name=f"kafka-door-{self.group_id}")
        self._task.add_done_callback(self._on_exit)
        log.info(
            "kafka door started topics=%s group=%s dead_letter_topic=%s",
            ",".join(self.entry.topics),
            self.group_id,
            self.entry.dead_letter_topic,
        )

    async def stop(self) -> None:
        """Finish the batch in hand (its offsets are committed), then leave the group."""
        self._stopping.set()
        if self._task is not None and not self._task.done():
            done, _ = await asyncio.wait({self._task}, timeout=STOP_GRACE)
            if not done:
                log.warning("kafka door %s: batch not finished in %ss; leaving it uncommitted", self.name, STOP_GRACE)
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        await self._close_clients()
        log.info("kafka door stopped topics=%s group=%s", ",".join(self.entry.topics), self.group_id)

    async def _close_clients(self) -> None:
        for client in (self.consumer, self.producer):
            if client is not None:
                try:
                    await client.stop()
                except Exception:
                    log.exception("kafka door %s: client did not stop cleanly", self.name)

    def _on_exit(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("kafka door %s stopped consuming", self.name, exc_info=task.exception())

    # -- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self.consumer is not None
        while not self._stopping.is_set():
            try:
                batch = await self.consumer.getmany(timeout_ms=POLL_MS, max_records=self.entry.max_batch)
            except KafkaError as exc:
                log.warning("kafka door %s: poll failed: %r", self.name, exc)
                await self._sleep(1.0)
                continue
            if not batch:
                continue
            self._idle.clear()
            try:
                await self._handle(batch, self._generation)
                self._broken = False
            except _GiveUp:
                if not self._stopping.is_set():
                    # Partitions were revoked while Temporal was down: read the batch again from
                    # where it starts (its committed offset); the next attempt is that batch.
                    self._rewind(batch)
                    self._resume_all()
            except Exception:
                # Not a poison record, not an outage: a bug or an unexpected client error. Never
                # skip past the batch: read it again after a pause, and report unhealthy meanwhile.
                log.exception("kafka door %s: batch failed; reading it again in %ss", self.name, BACKOFF_MAX)
                self._broken = True
                self._rewind(batch)
                await self._sleep(BACKOFF_MAX)
            finally:
                self._idle.set()

    def _rewind(self, batch: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]) -> None:
        assert self.consumer is not None
        assigned = self.consumer.assignment()
        for tp, recs in batch.items():
            if recs and tp in assigned:
                self.consumer.seek(tp, recs[0].offset)

    async def _handle(self, batch: dict[TopicPartition, list[ConsumerRecord[Any, Any]]], gen: int) -> None:
        records = [r for recs in batch.values() for r in recs]
        good: list[EventSignal] = []
        origin: dict[int, ConsumerRecord[Any, Any]] = {}
        poison: list[_Poison] = []
        for record in records:
            try:
                event = parse(record, self.entry.event)
            except EventRejected as exc:
                self.pipeline.reject(DOOR, None, fallback_id(record), exc)
                poison.append(_Poison(record, exc))
                continue
            except Exception as exc:  # a decoder bug must not stall the partition: dead-letter it, loudly
                log.exception("kafka door %s: cannot decode %s", self.name, fallback_id(record))
                rejected = EventRejected("malformed", f"cannot decode: {exc!r}")
                self.pipeline.reject(DOOR, None, fallback_id(record), rejected)
                poison.append(_Poison(record, rejected))
                continue
            refused = self.pipeline.check(event)
            if refused is not None:
                self.pipeline.reject(DOOR, event.name, event.id, refused)
                poison.append(_Poison(record, refused, event))
                continue
            origin[id(event)] = record
            good.append(event)

        for event, exc in await self._until_done(lambda: self._submit(good), gen, "Temporal", Unavailable):
            poison.append(_Poison(origin[id(event)], exc, event))
        letters = []
        for p in poison:
            if self._dead_letters(p):
                letters.append(p)
            else:
                self._skip(p)
        if letters:
            await self._until_done(lambda: self._dead_letter(letters), gen, "dead-letter topic", KafkaError)
        await self._commit({tp: recs[-1].offset + 1 for tp, recs in batch.items() if recs}, gen)

    async def _submit(self, events: Sequence[EventSignal]) -> list[tuple[EventSignal, EventRejected]]:
        """One pipeline call for the batch; events refused for good come back (raises Unavailable).

        A batch too large for one signal is halved until it fits; a single event that does not fit
        is a poison message.
        """
        if not events:
            return []
        try:
            outcomes = await self.pipeline.submit(events, DOOR)
        except EventRejected as exc:
            if len(events) == 1:
                self.pipeline.reject(DOOR, events[0].name, events[0].id, exc)
                return [(events[0], exc)]
            mid = len(events) // 2
            return await self._submit(events[:mid]) + await self._submit(events[mid:])
        return [(o.event, o.rejected) for o in outcomes if o.rejected is not None]

    def _dead_letters(self, p: _Poison) -> bool:
        if self.producer is None or not self.entry.dead_letter_topic:
            return False
        return not (p.error.reason == "unroutable" and self.entry.on_unroutable == "skip")

    def _skip(self, p: _Poison) -> None:
        r = p.record
        self.pipeline.metrics.dropped.labels(DOOR, p.error.reason).inc()
        log.warning(
            "kafka record skipped topic=%s partition=%d offset=%d reason=%s id=%s name=%s: %s",
            r.topic,
            r.partition,
            r.offset,
            p.error.reason,
            p.event.id if p.event else fallback_id(r),
            p.event.name if p.event else None,
            p.error.message,
        )

    async def _dead_letter(self, letters: list[_Poison]) -> None:
        """Produce every letter and wait for the broker's acks; all or (retried) nothing."""
        assert self.producer is not None and self.entry.dead_letter_topic is not None
        topic = self.entry.dead_letter_topic
        acks = [
            await self.producer.send(
                topic, value=p.record.value, key=p.record.key, headers=dead_letter_headers(p.record, p.error, p.event)
            )
            for p in letters
        ]
        await asyncio.gather(*acks)
        for p in letters:
            log.info(
                "kafka record dead-lettered topic=%s partition=%d offset=%d reason=%s dlq=%s",
                p.record.topic,
                p.record.partition,
                p.record.offset,
                p.error.reason,
                topic,
            )

    async def _commit(self, offsets: dict[TopicPartition, int], gen: int) -> None:
        assert self.consumer is not None
        if gen != self._generation:
            log.info("kafka door %s: partitions rebalanced while submitting; not committing %s", self.name, offsets)
            return
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            log.warning("kafka door %s: commit refused after a rebalance (re-delivery follows): %s", self.name, exc)
        except KafkaError as exc:
            log.error("kafka door %s: commit failed (re-delivery follows): %r", self.name, exc)

    # -- backpressure --------------------------------------------------------------------------

    async def _until_done(
        self, attempt: Callable[[], Awaitable[T]], gen: int, what: str, retry_on: type[Exception]
    ) -> T:
        """Run ``attempt`` until it succeeds, partitions paused and the consumer polling meanwhile."""
        while True:
            try:
                result = await attempt()
            except retry_on as exc:
                self._failures += 1
                delay = self._backoff()
                if self._failures == 1:
                    self._outage_since = time.monotonic()
                    log.warning("kafka door %s: %s unavailable, pausing partitions: %s", self.name, what, exc)
                else:
                    log.info(
                        "kafka door %s: %s still unavailable (attempt %d, next in %.1fs): %s",
                        self.name,
                        what,
                        self._failures,
                        delay,
                        exc,
                    )
                self._pause_all()
                await self._wait(delay)
                if self._stopping.is_set() or gen != self._generation:
                    raise _GiveUp from None
                continue
            if self._failures:
                log.warning(
                    "kafka door %s: %s answers again after %.1fs and %d failed attempt(s); resuming",
                    self.name,
                    what,
                    time.monotonic() - self._outage_since,
                    self._failures,
                )
                self._failures = 0
                self._resume_all()
            return result

    def _backoff(self) -> float:
        delay = min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** (self._failures - 1))
        return delay * random.uniform(0.8, 1.0)

    async def _wait(self, seconds: float) -> None:
        """Sleep while polling the paused consumer, so the group keeps this member."""
        assert self.consumer is not None
        deadline = time.monotonic() + seconds
        while not self._stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                stray = await self.consumer.getmany(timeout_ms=max(1, int(min(left, 0.5) * 1000)))
            except KafkaError as exc:
                log.warning("kafka door %s: poll failed while paused: %r", self.name, exc)
                await self._sleep(min(left, 1.0))
                continue
            for tp, recs in stray.items():
                # A partition assigned just before the listener paused it: read it again later.
                self.consumer.seek(tp, recs[0].offset)
                self.consumer.pause(tp)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _pause_all(self) -> None:
        assert self.consumer is not None
        self.consumer.pause(*self.consumer.assignment())

    def _resume_all(self) -> None:
        assert self.consumer is not None
        self.consumer.resume(*self.consumer.assignment())

    # -- rebalances ------------------------------------------------------------------------------

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Let the batch in hand finish and commit (unless Temporal is down), then forget it."""
        if not self._idle.is_set() and not self._failures:
            try:
                await asyncio.wait_for(self._idle.wait(), REVOKE_WAIT)
            except TimeoutError:
                log.warning("kafka door %s: batch unfinished at rebalance; it will be re-delivered", self.name)
        self._generation += 1
        log.info("kafka door %s: partitions revoked %s", self.name, sorted(map(tuple, revoked)))

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        assert self.consumer is not None
        if self._failures and assigned:
            self.consumer.pause(*assigned)
        log.info(
            "kafka door %s: partitions assigned %s%s",
            self.name,
            sorted(map(tuple, assigned)),
            " (paused: Temporal unavailable)" if self._failures and assigned else "",
        )


def build(entry: KafkaConsumer, pipeline: Pipeline, config: BridgeConfig) -> KafkaDoor:
    return KafkaDoor(entry, pipeline, config)
