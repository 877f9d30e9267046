"""The Kafka adapter: consumer-group records → the shared settle path → offsets committed.

One consumer per ``kafka:`` entry. This module is only the transport: it turns a record into a
:class:`bridge.decode.Message`, polls with ``getmany``, hands each batch to
:class:`bridge.settle.Settler`, produces the dead letters, and commits ``last offset + 1`` of every
partition in the batch once it is settled. It pauses its partitions (and keeps polling, so the
group keeps it) while Temporal refuses, and gives a batch up when a rebalance takes its partitions.
Configuration, event ids and what happens to a poison record: docs/kafka.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypeAlias

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.helpers import create_ssl_context
from aiokafka.structs import ConsumerRecord

from bridge.config import BridgeConfig, EventFormat, KafkaConsumer, KafkaSecurity
from bridge.decode import Message, decode, header_metadata
from bridge.errors import BridgeError, EventRejected
from bridge.event import EventSignal
from bridge.pipeline import Pipeline
from bridge.settle import Abandoned, Item, Settler, Transport, is_dead_letter_header
from bridge.settle import dead_letter_headers as letter_headers

log = logging.getLogger(__name__)

ADAPTER = "kafka"
CE_PREFIX = "ce_"
POLL_MS = 500
REVOKE_WAIT = 15.0
STOP_GRACE = 30.0

Record: TypeAlias = ConsumerRecord[Any, Any]
Batch: TypeAlias = dict[TopicPartition, list[Record]]


# --- parsing: ConsumerRecord → Message ------------------------------------------------------------


def _text(raw: bytes | str | None) -> str:
    if raw is None:
        return ""
    return raw if isinstance(raw, str) else raw.decode("utf-8", errors="replace")


def record_headers(record: Record) -> dict[str, str]:
    """Headers as ``str → str``; the first of repeated names wins, as in HTTP bindings."""
    out: dict[str, str] = {}
    for name, value in record.headers or ():
        out.setdefault(name, _text(value))
    return out


def fallback_id(record: Record) -> str:
    return f"kafka:{record.topic}:{record.partition}:{record.offset}"


def to_message(record: Record) -> Message:
    """What :func:`bridge.decode.decode` needs from a record; no aiokafka type goes further."""
    headers = record_headers(record)
    lowered = {k.lower(): v for k, v in headers.items()}
    ce = {k[len(CE_PREFIX) :]: v for k, v in lowered.items() if k.startswith(CE_PREFIX) and len(k) > 3}
    content_type = lowered.get("content-type")
    if ce and content_type and "datacontenttype" not in ce:
        ce["datacontenttype"] = content_type
    metadata = header_metadata(headers)
    metadata["kafka"] = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp,
    }
    stamp = record.timestamp
    return Message(
        body=record.value if isinstance(record.value, bytes) else _text(record.value).encode(),
        source=f"kafka:{record.topic}",
        fallback_id=fallback_id(record),
        headers=headers,
        ce_attributes=ce,
        content_type=content_type,
        key=None if record.key is None else _text(record.key),
        metadata=metadata,
        time=datetime.fromtimestamp(stamp / 1000, UTC).isoformat() if stamp and stamp > 0 else None,
    )


def parse(record: Record, fmt: EventFormat) -> EventSignal:
    """One record → one event, or :class:`EventRejected`; the record's timestamp is the event time
    unless it is a CloudEvent (which carries its own)."""
    return decode(to_message(record), fmt)


def dead_letter_headers(
    record: Record, exc: EventRejected, event: EventSignal | None = None
) -> list[tuple[str, bytes]]:
    """The original headers (minus any stale dead-letter ones) plus why and where from."""
    kept = [(k, v) for k, v in record.headers or () if not is_dead_letter_header(k)]
    origin = {
        "topic": record.topic,
        "partition": str(record.partition),
        "offset": str(record.offset),
        "timestamp": str(record.timestamp),
    }
    return kept + [(k, v.encode()) for k, v in letter_headers(exc, event, origin).items()]


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


# --- the consumer ---------------------------------------------------------------------------------


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, adapter: KafkaAdapter) -> None:
        self.adapter = adapter

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.adapter._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.adapter._on_assigned(assigned)


class KafkaAdapter(Transport[Record]):
    """One ``kafka:`` entry: a consumer in a group, plus a producer when dead-lettering."""

    def __init__(self, entry: KafkaConsumer, pipeline: Pipeline, config: BridgeConfig) -> None:
        self.entry = entry
        self.pipeline = pipeline
        self.group_id = entry.group_id or default_group_id(config)
        self.name = f"kafka:{','.join(entry.topics)}"
        self.settler = Settler(
            pipeline,
            self,
            adapter=ADAPTER,
            name=self.name,
            event=entry.event,
            on_unroutable=entry.on_unroutable,
            transient=(KafkaError,),
        )
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._generation = 0
        self._batch_generation = 0
        self._broken = False

    @property
    def paused(self) -> bool:
        """True while Temporal (or the dead-letter topic) refuses and the partitions are paused."""
        return self.settler.waiting

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
            # up the bridge's start (and every adapter after this one) until partitions are assigned.
            self.consumer.subscribe(self.entry.topics, listener=_Listener(self))
            if self.entry.dead_letter_topic:
                self.producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all", enable_idempotence=True, **opts)
                await self.producer.start()
        except KafkaError as exc:
            await self._close_clients()
            raise BridgeError(f"{self.name}: cannot connect to Kafka at {servers}: {exc}") from exc
        self._task = asyncio.create_task(self._run(), name=f"kafka-adapter-{self.group_id}")
        self._task.add_done_callback(self._on_exit)
        log.info(
            "kafka adapter started topics=%s group=%s dead_letter_topic=%s",
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
                log.warning(
                    "kafka adapter %s: batch not finished in %ss; leaving it uncommitted", self.name, STOP_GRACE
                )
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        await self._close_clients()
        log.info("kafka adapter stopped topics=%s group=%s", ",".join(self.entry.topics), self.group_id)

    async def _close_clients(self) -> None:
        for client in (self.consumer, self.producer):
            if client is not None:
                try:
                    await client.stop()
                except Exception:
                    log.exception("kafka adapter %s: client did not stop cleanly", self.name)

    def _on_exit(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("kafka adapter %s stopped consuming", self.name, exc_info=task.exception())

    # -- the loop ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self.consumer is not None
        while not self._stopping.is_set():
            try:
                batch = await self.consumer.getmany(timeout_ms=POLL_MS, max_records=self.entry.max_batch)
            except KafkaError as exc:
                log.warning("kafka adapter %s: poll failed: %r", self.name, exc)
                await self._sleep(1.0)
                continue
            if not batch:
                continue
            self._idle.clear()
            try:
                await self._handle(batch, self._generation)
                self._broken = False
            except Abandoned:
                if not self._stopping.is_set():
                    # Partitions were revoked while Temporal was down: read the batch again from
                    # where it starts (its committed offset); the next attempt is that batch.
                    self._rewind(batch)
                    self.resume()
            except Exception:
                # Not a poison record, not an outage: a bug or an unexpected client error. Never
                # skip past the batch: read it again after a pause, and report unhealthy meanwhile.
                cap = self.settler.backoff.cap
                log.exception("kafka adapter %s: batch failed; reading it again in %ss", self.name, cap)
                self._broken = True
                self._rewind(batch)
                self.resume()
                await self._sleep(cap)
            finally:
                self._idle.set()

    async def _handle(self, batch: Batch, gen: int) -> None:
        """Settle the batch, then commit every partition's ``last offset + 1``."""
        self._batch_generation = gen
        await self.settler.settle([r for recs in batch.values() for r in recs])
        await self._commit({tp: recs[-1].offset + 1 for tp, recs in batch.items() if recs}, gen)

    def _rewind(self, batch: Batch) -> None:
        assert self.consumer is not None
        assigned = self.consumer.assignment()
        for tp, recs in batch.items():
            if recs and tp in assigned:
                self.consumer.seek(tp, recs[0].offset)

    async def _commit(self, offsets: dict[TopicPartition, int], gen: int) -> None:
        assert self.consumer is not None
        if gen != self._generation:
            log.info("kafka adapter %s: partitions rebalanced while settling; not committing %s", self.name, offsets)
            return
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            log.warning("kafka adapter %s: commit refused after a rebalance (re-delivery follows): %s", self.name, exc)
        except KafkaError as exc:
            log.error("kafka adapter %s: commit failed (re-delivery follows): %r", self.name, exc)

    # -- the transport the settle path drives ------------------------------------------------------

    def to_message(self, message: Record) -> Message:
        return to_message(message)

    def fallback_id(self, message: Record) -> str:
        return fallback_id(message)

    def can_dead_letter(self) -> bool:
        return self.producer is not None and bool(self.entry.dead_letter_topic)

    async def dead_letter(self, items: Sequence[Item[Record]]) -> None:
        """Produce every letter and wait for the broker's acks; all or (retried) nothing."""
        producer, topic = self.producer, self.entry.dead_letter_topic
        assert producer is not None and topic is not None
        acks = []
        for item in items:
            assert item.error is not None
            record, headers = item.message, dead_letter_headers(item.message, item.error, item.event)
            acks.append(await producer.send(topic, value=record.value, key=record.key, headers=headers))
        await asyncio.gather(*acks)

    async def acknowledge(self, items: Sequence[Item[Record]]) -> None:
        """Nothing one by one: :meth:`_handle` commits the batch's offsets once it is settled."""

    async def wait(self, seconds: float) -> bool:
        """Sleep while polling the paused consumer, so the group keeps this member; False once
        stopping or a rebalance took the batch's partitions."""
        assert self.consumer is not None
        deadline = time.monotonic() + seconds
        while not self._stopping.is_set() and (left := deadline - time.monotonic()) > 0:
            try:
                stray = await self.consumer.getmany(timeout_ms=max(1, int(min(left, 0.5) * 1000)))
            except KafkaError as exc:
                log.warning("kafka adapter %s: poll failed while paused: %r", self.name, exc)
                await self._sleep(min(left, 1.0))
                continue
            for tp, recs in stray.items():
                # A partition assigned just before the listener paused it: read it again later.
                self.consumer.seek(tp, recs[0].offset)
                self.consumer.pause(tp)
        return not self._stopping.is_set() and self._batch_generation == self._generation

    def pause(self) -> None:
        assert self.consumer is not None
        self.consumer.pause(*self.consumer.assignment())

    def resume(self) -> None:
        assert self.consumer is not None
        self.consumer.resume(*self.consumer.assignment())

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # -- rebalances --------------------------------------------------------------------------------

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Let the batch in hand finish and commit (unless Temporal is down), then forget it."""
        if not self._idle.is_set() and not self.paused:
            try:
                await asyncio.wait_for(self._idle.wait(), REVOKE_WAIT)
            except TimeoutError:
                log.warning("kafka adapter %s: batch unfinished at rebalance; it will be re-delivered", self.name)
        self._generation += 1
        log.info("kafka adapter %s: partitions revoked %s", self.name, sorted(map(tuple, revoked)))

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        assert self.consumer is not None
        if self.paused and assigned:
            self.consumer.pause(*assigned)
        log.info(
            "kafka adapter %s: partitions assigned %s%s",
            self.name,
            sorted(map(tuple, assigned)),
            " (paused: Temporal unavailable)" if self.paused and assigned else "",
        )


def build(entry: KafkaConsumer, pipeline: Pipeline, config: BridgeConfig) -> KafkaAdapter:
    return KafkaAdapter(entry, pipeline, config)
