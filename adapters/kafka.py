"""The Kafka adapter: consumer-group records → the shared settle path → offsets committed.

One consumer per ``kafka:`` entry. This module is only the transport: it polls with ``getmany``,
hands each batch to :class:`bridge.settle.Settler` (records become messages and dead letters in
:mod:`adapters.kafka_parse`), produces the dead letters, and commits ``last offset + 1`` of every
partition in the batch once it is settled. It pauses its partitions (and keeps polling, so the
group keeps it) while Temporal refuses, and gives a batch up when a rebalance takes its partitions.
It refreshes the cluster's metadata every ``metadata_refresh_seconds``, so a topic created after
the start is read from the rebalance that follows; a subscribed topic the cluster lacks is logged
once (and once when it appears), and :meth:`KafkaAdapter.readiness` shows it in ``/readyz``.
Configuration, event ids and what happens to a poison record: docs/kafka.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    CorruptRecordException,
    IllegalStateError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    UnsupportedCodecError,
)
from aiokafka.helpers import create_ssl_context

from adapters.kafka_batches import bad_span, fetch_first_batch
from adapters.kafka_parse import (
    ADAPTER,
    CE_PREFIX,
    LETTER_BYTES,
    MAX_REQUEST_BYTES,
    MIN_LETTER_BYTES,
    Record,
    Unreadable,
    dead_letter,
    dead_letter_headers,
    fallback_id,
    last_offset,
    parse,
    record_headers,
    to_message,
)
from bridge.adapter import ConsumerReadiness, ConsumerState
from bridge.aio import how_it_ended, within
from bridge.config import BridgeConfig, KafkaConsumer, KafkaSecurity
from bridge.decode import Message
from bridge.errors import BridgeError
from bridge.pipeline import Pipeline
from bridge.settle import Abandoned, Disposition, Item, Settler, Transport

__all__ = [
    "ADAPTER",
    "CE_PREFIX",
    "KafkaAdapter",
    "build",
    "client_options",
    "dead_letter",
    "dead_letter_headers",
    "default_group_id",
    "fallback_id",
    "parse",
    "record_headers",
    "to_message",
]

log = logging.getLogger(__name__)

TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)
LETTERS_IDEMPOTENT = False
"""Dead letters are produced with ``acks=all`` but not idempotently. An idempotent producer whose
letter the topic refused as too large has spent that sequence number: its next letter to the
partition (the same one a quarter as large) is refused as ``OutOfOrderSequenceNumber`` for good,
and the consumer stays paused (measured on Kafka 4.1 with aiokafka). Nor would its batches ever
expire: a partition that answers ``NOT_ENOUGH_REPLICAS`` held a letter's ack, and the consumer,
without an error. A letter written twice by a retry is harmless: both name the same original
record, and a replay of either has that record's event id."""
POLL_MS = 500
UNREADABLE_AFTER = 3
"""Polls of one partition alone that fail in a row at one position before the record there is
taken to be one the client cannot read, dead-lettered and skipped: a record that cannot be read
fails every time, and an error that passes must not cost a good record."""
UNREADABLE_PAUSE = 0.2  # seconds between those polls
UNREADABLE_FOLLOWING = 2
"""The same, for the record just after one stubbed that fails with the very same complaint: the
records after a bad one in its producer batch cannot be read either (aiokafka parses the batch from
its first record). Two, not one, so that an error that passes at once costs no record there."""
UNREADABLE_FOLLOWING_PAUSE = 0.02
AROUND_MS = 200  # how long a lone poll waits for a partition's records: a quiet one holds up the others
AROUND_EMPTY = 10  # lone polls in a row that may come back empty while the broker holds more: 2 s
REVOKE_WAIT = 15.0
REBALANCE_MARGIN = 20.0
"""The group's rebalance timeout past REVOKE_WAIT (the rejoin, a slow commit): 35 s in all, within
aiokafka's 40 s request timeout, which its JoinGroup request (answered when the group is formed)
does not stretch as the Java client does."""
ORIGIN_WAIT = 60.0  # how long to wait for where the group starts a partition just assigned
STOP_GRACE = 30.0
POLL_FAILURES_UNHEALTHY = 3  # failed polls in a row that make the consumer unhealthy
POLL_RECOVERY = 30.0  # seconds without a failed poll that end a run of them
FAILURE_LOG_EVERY = 60.0  # the same poll failure again is logged at most this often above DEBUG

Batch: TypeAlias = dict[TopicPartition, list[Record]]
State: TypeAlias = ConsumerState


class _MissingTopicLines(logging.Filter):
    """aiokafka logs a subscribed topic the cluster lacks at every metadata refresh (every
    ``metadata_refresh_seconds``) and at every group assignment. The adapter says it once itself
    (:meth:`KafkaAdapter._check_topics`), so these lines are dropped for the adapters' topics."""

    LINES = frozenset({"Topic %s not found in cluster metadata", "No partition metadata for topic %s"})
    LOGGERS = ("aiokafka.cluster", "aiokafka.coordinator.assignors.roundrobin", "aiokafka.coordinator.assignors.range")

    def __init__(self) -> None:
        super().__init__()
        self.topics: Counter[str] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (
            isinstance(record.msg, str)
            and record.msg in self.LINES
            and isinstance(args, tuple)
            and bool(args)
            and args[0] in self.topics
        )

    def watch(self, topics: Iterable[str]) -> None:
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            if self not in logger.filters:
                logger.addFilter(self)
        self.topics.update(topics)

    def unwatch(self, topics: Iterable[str]) -> None:
        self.topics.subtract(topics)
        self.topics = +self.topics  # drop the topics no started adapter reads any more


_QUIET = _MissingTopicLines()


# --- clients ----------------------------------------------------------------------------------------


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
        self.adapter._note_origins(assigned)  # not awaited: aiokafka sends no heartbeat meanwhile


def _unreadable(exc: Exception) -> bool:
    """A poll failed on a record the client cannot read, not on the broker: reading again fails
    again at the same place."""
    return isinstance(exc, CorruptRecordException) or not isinstance(exc, KafkaError)


PRODUCER_WRITTEN = (UnicodeDecodeError, CorruptRecordException)
"""Poll failures on a record any producer can write (a header name that is not UTF-8, a checksum
that fails): the record is read around and dead-lettered, which is no outage of the consumer."""


@dataclass(eq=False)
class _Poll:
    """A ``getmany`` in flight: where each partition's next fetch started, kept up to date by the
    adapter's own seeks meanwhile, so a poll that fails can be undone (:meth:`KafkaAdapter._undo`)."""

    generation: int
    before: dict[TopicPartition, int]


M = TypeVar("M")


async def write_letters(
    items: Sequence[Item[M]], produce: Callable[[Item[M], int], Awaitable[asyncio.Future[Any]]]
) -> None:
    """Produce every item's dead letter (``produce(item, byte budget)`` sends one and returns its
    ack) and wait for the broker's acks. A letter the topic refuses for its size is written again a
    quarter as large, down to MIN_LETTER_BYTES; any other failure is raised (and retried). Each
    item written is marked DEAD_LETTERED. The adapter's and the replay's dead letters both go here."""
    pending = [(item, LETTER_BYTES) for item in items]
    while pending:
        sent: list[tuple[Item[M], int]] = []
        acks: list[asyncio.Future[Any]] = []
        smaller: list[tuple[Item[M], int]] = []
        failed: BaseException | None = None
        try:
            for item, budget in pending:
                try:
                    acks.append(await produce(item, budget))
                except TOO_LARGE:  # refused before it was sent (the client's own size check)
                    if (less := smaller_letter(budget)) is None:
                        raise
                    smaller.append((item, less))
                    continue
                sent.append((item, budget))
        except Exception as exc:  # what was sent before is still marked: a retry writes it not again
            failed = exc
        finally:  # what was sent is awaited either way, so no ack is left unread
            results = await asyncio.gather(*acks, return_exceptions=True)
        for (item, budget), result in zip(sent, results, strict=True):
            if not isinstance(result, BaseException):
                item.disposition = Disposition.DEAD_LETTERED
            elif isinstance(result, TOO_LARGE) and (less := smaller_letter(budget)) is not None:
                smaller.append((item, less))
            else:
                failed = failed or result
        if failed is not None:
            raise failed
        pending = smaller


def smaller_letter(budget: int) -> int | None:
    """The size a letter refused at ``budget`` is written again at: a quarter as large, and
    MIN_LETTER_BYTES last (1,000,000 went to 62,500 and stopped, so a topic taking 40 KB letters
    refused the letter for good and held its partition). None below that."""
    return max(MIN_LETTER_BYTES, budget // 4) if budget > MIN_LETTER_BYTES else None


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
        self._ahead: deque[tuple[int, int, Batch]] = deque()  # (generation, records, batch) polled, not settled
        self._ahead_records = 0
        self._held = False  # the settle path paused the partitions: :meth:`wait` polls, not the reader
        self._arrived = asyncio.Event()  # something was read ahead
        self._room = asyncio.Event()  # the reader may poll again (taken, resumed, stopping)
        self._generation = 0
        self._batch_generation = 0
        self._broken = False
        self._joined = False  # the group assigned this member its partitions (maybe none) once
        self._missing: set[str] = set()  # subscribed topics the cluster lacks, as last logged
        self._registered = False
        self._polls: list[_Poll] = []
        self._origins: dict[TopicPartition, int] = {}  # where this generation began each partition
        self._noting: set[asyncio.Task[None]] = set()  # what _note_origins still waits for
        self._rewinds = 0  # times _rewind moved the positions back
        self._poll_failures = 0  # failed polls in a row (each within POLL_RECOVERY of the one before)
        self._client_stubs = 0  # records stubbed for an error not in PRODUCER_WRITTEN: the client failing
        # Where the fetch of a bad batch found no span (kafka_batches): not fetched again for each poll there.
        self._no_span: tuple[TopicPartition, int] | None = None
        self._failed_at = -POLL_RECOVERY
        self._failure_logged: tuple[str, float] = ("", -FAILURE_LOG_EVERY)  # (the error, when) last logged
        self._failure_repeats = 0
        self._failure_metric = pipeline.metrics.kafka_poll_failures

    @property
    def paused(self) -> bool:
        """True while Temporal (or the dead-letter topic) refuses and the partitions are paused."""
        return self.settler.waiting

    def ended(self) -> str | None:
        task = self._task
        if task is None or not task.done() or self._stopping.is_set():
            return None
        return "its loop ended" + how_it_ended(task)

    def healthy(self) -> bool:
        """Consuming: the loop runs, its last batch did not fail unexpectedly, its polls do not
        keep failing, and neither do its dead letters (docs/kafka.md#readiness)."""
        return (
            self._task is not None
            and not self._task.done()
            and not self._broken
            and not self._polls_failing()
            and not self.settler.letters_failing()
        )

    def _polls_failing(self) -> bool:
        recent = time.monotonic() - self._failed_at < POLL_RECOVERY
        return recent and self._poll_failures >= POLL_FAILURES_UNHEALTHY

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
            # How long the group waits for a member to rejoin at a rebalance: a member that lets
            # its batch finish (REVOKE_WAIT) past it (by default the 10 s session timeout) was put
            # out of the group, its commit failed, and the partitions' next owner did the batch again.
            rebalance_timeout_ms=int((REVOKE_WAIT + REBALANCE_MARGIN) * 1000),
            # A topic created after the start is seen at the next refresh (aiokafka's default: 5 min).
            metadata_max_age_ms=self.entry.metadata_refresh_seconds * 1000,
            **opts,
        )
        try:
            await self.consumer.start()
            # Subscribing after start: the group join runs in the background instead of holding
            # up the bridge's start (and every adapter after this one) until partitions are assigned.
            self.consumer.subscribe(self.entry.topics, listener=_Listener(self))
            if self.entry.dead_letter_topic:
                self.producer = AIOKafkaProducer(
                    bootstrap_servers=servers,
                    acks="all",
                    enable_idempotence=LETTERS_IDEMPOTENT,
                    max_request_size=MAX_REQUEST_BYTES,
                    **opts,
                )
                await self.producer.start()
        except KafkaError as exc:
            await self._close_clients()
            raise BridgeError(f"{self.name}: cannot connect to Kafka at {servers}: {exc}") from exc
        self._task = asyncio.create_task(self._run(), name=f"kafka-adapter-{self.group_id}")
        self._task.add_done_callback(self._on_exit)
        _QUIET.watch(self.entry.topics)
        self._registered = True
        log.info(
            "kafka adapter started topics=%s group=%s dead_letter_topic=%s",
            ",".join(self.entry.topics),
            self.group_id,
            self.entry.dead_letter_topic,
        )

    async def stop(self) -> None:
        """Finish the batch in hand (its offsets are committed), then leave the group. What was
        read ahead of it is not committed: the group's next member reads it."""
        self._stopping.set()
        self._arrived.set()
        self._room.set()
        for task in self._noting:
            task.cancel()
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
        if self._registered:
            _QUIET.unwatch(self.entry.topics)
            self._registered = False
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
        """Settle what :meth:`_read` reads ahead, one batch at a time, committing each."""
        assert self.consumer is not None
        reader = asyncio.create_task(self._read(), name=f"kafka-reader-{self.group_id}")
        try:
            while not self._stopping.is_set():
                gen, batch = await self._take()
                if not batch:
                    continue
                self._idle.clear()
                try:
                    await self._handle(batch, gen)
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
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    # -- reading ahead -----------------------------------------------------------------------------

    async def _read(self) -> None:
        """Poll while the batch before is settled, up to ``max_batch`` records ahead.

        aiokafka fetches a partition again only once what it fetched of it was taken: polling only
        between batches left a record that reached the broker during one batch's signal to wait for
        the next batch's as well. Nothing read ahead is committed before it is settled; a rebalance
        or a rewind drops it, and it is read again from the committed offset. While the settle path
        holds the partitions paused, :meth:`wait` polls instead."""
        while not self._stopping.is_set():
            if self._held or self._ahead_records >= self.entry.max_batch:
                self._room.clear()
                await within(POLL_MS / 1000, self._room.wait())
                continue
            batch = await self._poll()
            if batch:
                size = sum(len(recs) for recs in batch.values())
                self._ahead.append((self._generation, size, batch))
                self._ahead_records += size
                self._arrived.set()

    async def _take(self) -> tuple[int, Batch]:
        """What was read ahead in this generation, merged by partition up to ``max_batch`` records
        (at least one poll's worth); nothing once stopping or after ``POLL_MS`` without records."""
        if not self._ahead:
            self._arrived.clear()
            await within(POLL_MS / 1000, self._arrived.wait())
        gen, count = self._generation, 0
        merged: Batch = {}
        while self._ahead and not self._stopping.is_set():
            polled_gen, size, batch = self._ahead[0]
            if polled_gen == gen and count and count + size > self.entry.max_batch:
                break
            self._ahead.popleft()
            self._ahead_records -= size
            if polled_gen != gen:
                continue  # polled before a rebalance: read again from the committed offsets
            count += size
            for tp, recs in batch.items():
                merged.setdefault(tp, []).extend(recs)
        self._room.set()
        return gen, merged

    def _drop_ahead(self) -> None:
        self._ahead.clear()
        self._ahead_records = 0
        self._room.set()

    async def _poll(self) -> Batch:
        """The next batch, or nothing: a failed poll is undone (:meth:`_getmany`) and waited out here."""
        try:
            batch = await self._getmany(POLL_MS, self.entry.max_batch)
        except Exception as exc:
            # A broker error, a batch in a codec the client lacks, or a record it cannot read. Read
            # again from where the poll began: with backoff, or around a record it cannot read.
            delay = self._poll_failed(exc)
            if _unreadable(exc):
                stubs = self._client_stubs
                batch = await self._read_around()
                # Read past records a producer wrote so: not a run of failures a trickle of them adds to.
                if batch and self._client_stubs == stubs and isinstance(exc, PRODUCER_WRITTEN):
                    self._poll_failures = 0
                return batch
            await self._sleep(delay)
            return {}
        self._check_topics()
        return batch

    async def _read_around(self) -> Batch:
        """After a poll failed on a record the client cannot read (aiokafka refuses a header name
        that is not UTF-8; a record whose checksum fails): every poll would fail on it again, and
        nothing of it reaches the bridge to dead-letter. So each partition is read alone, a record
        at a time, from where the failed poll began, a share of ``max_batch`` each so that every
        partition has its turn. Where one fails alone UNREADABLE_AFTER times in a row, an
        :class:`Unreadable` takes the record's place and the partition is sought past it: the
        settle path dead-letters it, naming the offset, and commits past it. aiokafka reads a
        producer's batch from its first record, so the records after it in that batch fail too,
        and are stubbed in turn. What was read around them is the batch.

        A rebalance or a rewind meanwhile (:meth:`_rewind`) moves the positions under it: what it
        read is then put back (each partition sought to the lowest offset it read, unless already
        before it) and it returns nothing; the next poll reads on from there. A pause (the settle
        path waits out an outage) ends it with what it read, unless the positions moved too."""
        assert self.consumer is not None
        gen, rewinds = self._generation, self._rewinds
        parts = sorted(self.consumer.assignment() - self.consumer.paused())
        share = max(1, self.entry.max_batch // max(1, len(parts)))
        batch: Batch = {}

        def moved() -> bool:
            return gen != self._generation or rewinds != self._rewinds or self._stopping.is_set()

        for tp in parts:
            records = batch.setdefault(tp, [])
            failed = empty = 0  # in a row: polls that failed at this position; that came back empty
            last: tuple[int, str] | None = None  # the offset just stubbed, and the complaint
            while len(records) < share and not self._held:
                try:
                    got = await self._getmany(AROUND_MS, 1, tp)
                except Exception as exc:
                    if moved():
                        return await self._put_back(batch)
                    if not _unreadable(exc):
                        break  # a broker error: the next poll waits it out
                    failed, empty = failed + 1, 0  # it was fetched: the empty ones in a row are over
                    if isinstance(exc, UnicodeDecodeError) and (span := await self._stub_batch(tp)) is not None:
                        records.append(span)  # the rest of its producer batch, found by one fetch
                        failed, last = 0, (span.last, repr(exc))
                        continue
                    # Not yet known to fail there whatever happens. Failing as the record just
                    # before it did, it is most likely the rest of that record's producer batch:
                    # confirmed sooner, so that a batch of hundreds passes in seconds, not minutes.
                    at = await self._position(tp)
                    follows = last is not None and at is not None and last == (at - 1, repr(exc))
                    if failed < (UNREADABLE_FOLLOWING if follows else UNREADABLE_AFTER):
                        await self._sleep(UNREADABLE_FOLLOWING_PAUSE if follows else UNREADABLE_PAUSE)
                        continue
                    stub = await self._stub(tp, exc)
                    if stub is None:
                        break
                    records.append(stub)
                    failed, last = 0, (stub.offset, repr(exc))
                    continue
                if moved():
                    for part, recs in got.items():
                        batch.setdefault(part, []).extend(recs)
                    return await self._put_back(batch)
                if not got.get(tp):
                    # A seek drops what was fetched of the partition, and the fetch again may wait for
                    # one in flight to its broker (up to fetch_max_wait_ms): empty is not the end
                    # while the broker said it holds more. The failures in a row still count.
                    empty += 1
                    if empty < AROUND_EMPTY and await self._behind(tp):
                        continue
                    break  # read to its end, for now
                failed = empty = 0
                records.extend(got[tp])
            if moved():  # while it slept, or held: what it read may be of another generation
                return await self._put_back(batch)
        return {tp: recs for tp, recs in batch.items() if recs}

    async def _behind(self, tp: TopicPartition) -> bool:
        """Whether the last fetch said the broker holds records of ``tp`` past its position (up to
        the last stable offset, as this consumer reads committed records only)."""
        assert self.consumer is not None
        try:
            end = self.consumer.last_stable_offset(tp)
            if end is None or end < 0:
                end = self.consumer.highwater(tp)
        except (IllegalStateError, AssertionError):  # revoked meanwhile
            return False
        position = await self._position(tp)
        return end is not None and position is not None and position < end

    async def _stub(self, tp: TopicPartition, exc: Exception) -> Unreadable | None:
        """The stand-in for the record at ``tp``'s position, which the client cannot read; the
        partition is sought past it. None when the position is not known (revoked, or reset)."""
        offset = await self._position(tp, wait=1.0)  # the failed poll went back to it
        if offset is None:
            return None
        self._seek(tp, offset + 1)
        log.error(
            "kafka adapter %s: the record at %s offset %d cannot be read; it is dead-lettered by its offset and "
            "skipped: %r",
            self.name,
            tp,
            offset,
            exc,
        )
        if not isinstance(exc, PRODUCER_WRITTEN):  # the client failing: reported now, and kept so
            self._client_stubs += 1
            self._poll_failures = max(self._poll_failures, POLL_FAILURES_UNHEALTHY)
            self._failed_at = time.monotonic()
        return Unreadable.at(tp.topic, tp.partition, offset, f"{type(exc).__name__}: {exc}")

    async def _stub_batch(self, tp: TopicPartition) -> Unreadable | None:
        """The stand-in for the records from ``tp``'s position to the end of their producer batch,
        when a fetch of that batch of its own shows a record there failing the client's parse
        (:mod:`adapters.kafka_batches`); the partition is sought past the batch. None when the
        fetch or the parse does not show that: the records are then read one at a time."""
        assert self.consumer is not None
        position = await self._position(tp, wait=1.0)  # the failed poll went back to it
        if position is None or self._no_span == (tp, position):  # fetched already, for the same answer
            return None
        raw = await fetch_first_batch(self.consumer, tp, position)
        span = bad_span(raw, position) if raw is not None else None
        if span is None:
            self._no_span = (tp, position)
            return None
        if await self._position(tp) != position:  # moved meanwhile: read on from there
            return None
        self._seek(tp, span.last + 1)
        log.error(
            "kafka adapter %s: the records at %s offsets %d to %d (%d, the rest of one producer batch) cannot be "
            "read; they are dead-lettered in one letter by their offsets and skipped: %s",
            self.name,
            tp,
            span.first,
            span.last,
            span.last - span.first + 1,
            span.why,
        )
        return Unreadable.at(tp.topic, tp.partition, span.first, span.why, span.last)

    async def _put_back(self, batch: Batch) -> Batch:
        """Seek each partition that is still assigned back to the lowest offset ``batch`` read of
        it (records read before and after a rewind are both in it), unless its position is already
        before it (a rebalance or a rewind set it there); the records are read again. Returns
        nothing, the batch it was not to deliver."""
        assert self.consumer is not None
        positions = await self._positions()
        for tp, recs in batch.items():
            if recs and tp in positions:
                with contextlib.suppress(IllegalStateError):
                    self._seek(tp, min(min(r.offset for r in recs), positions[tp]))
        return {}

    async def _getmany(self, timeout_ms: int, max_records: int | None = None, *partitions: TopicPartition) -> Batch:
        """``getmany`` (of ``partitions`` only, when named), undone when it raises (:meth:`_undo`)."""
        assert self.consumer is not None
        poll = _Poll(self._generation, {})
        self._polls.append(poll)  # first: a seek while the positions are read is noted in it (_seek)
        try:
            for tp, offset in (await self._positions()).items():
                poll.before.setdefault(tp, offset)
        except BaseException:  # nothing was polled: nothing to undo (a group error position() raised)
            self._polls.remove(poll)
            raise
        try:
            batch: Batch = await self.consumer.getmany(*partitions, timeout_ms=timeout_ms, max_records=max_records)
        except Exception:
            await self._undo(poll)
            raise
        finally:
            self._polls.remove(poll)
        return batch

    async def _positions(self) -> dict[TopicPartition, int]:
        """Where the next fetch of each assigned partition starts, for those whose position is set:
        one just assigned or reset waits for its offset, and is not waited for here."""
        assert self.consumer is not None
        found = {}
        for tp in self.consumer.assignment():
            if (offset := await self._position(tp)) is not None:
                found[tp] = offset
        return found

    async def _position(self, tp: TopicPartition, wait: float = 0.0) -> int | None:
        """Where the next fetch of ``tp`` starts; None when it is revoked, or its position is not
        set within ``wait`` seconds (just assigned or reset). A position that is set is returned
        without waiting."""
        assert self.consumer is not None
        with contextlib.suppress(TimeoutError, IllegalStateError):
            async with asyncio.timeout(wait):
                return int(await self.consumer.position(tp))
        return None

    async def _undo(self, poll: _Poll) -> None:
        """Seek every assigned partition back to where the failed poll began. aiokafka advances the
        position of each partition whose records a poll takes, and a poll that raises (another
        partition's batch in a codec the client lacks, a record it cannot read) has taken some of
        them first and drops them: the next batch's commit would pass them. A partition whose
        position was not set before the poll (or each one, after a rebalance during it) goes back
        to where the group starts it: its committed offset, else ``auto_offset_reset``."""
        assert self.consumer is not None
        gen = self._generation
        before = poll.before if poll.generation == gen else {}
        unset = []
        for tp in sorted(self.consumer.assignment()):
            if tp not in before:
                unset.append(tp)
                continue
            with contextlib.suppress(IllegalStateError):  # revoked meanwhile
                self._seek(tp, before[tp])
        # A rebalance meanwhile sets every position from the commits itself.
        while unset and gen == self._generation and not self._stopping.is_set():
            try:
                await self._seek_to_start(unset[0])
            except IllegalStateError:
                pass
            except KafkaError as exc:
                log.warning("kafka adapter %s: cannot read %s's committed offset: %r", self.name, unset[0], exc)
                await self._sleep(1.0)
                continue
            unset.pop(0)

    async def _seek_to_start(self, tp: TopicPartition) -> None:
        """Seek to the committed offset, or where ``auto_offset_reset`` starts a partition without
        one (``seek_to_committed`` leaves a partition alone whose commit is 0 or none)."""
        assert self.consumer is not None
        for poll in self._polls:
            poll.before.pop(tp, None)
        committed = await self.consumer.committed(tp)
        if committed is not None:
            self._seek(tp, committed)
        elif tp in self._origins:  # not reset again: with `latest`, that would skip what came since
            self._seek(tp, self._origins[tp])
        elif self.entry.auto_offset_reset == "earliest":
            await self.consumer.seek_to_beginning(tp)
        else:
            await self.consumer.seek_to_end(tp)

    def _seek(self, tp: TopicPartition, offset: int) -> None:
        """Seek, and tell the polls in flight: one that fails takes its records from here."""
        assert self.consumer is not None
        self.consumer.seek(tp, offset)
        for poll in self._polls:
            poll.before[tp] = offset

    def _poll_failed(self, exc: Exception) -> float:
        """Count and log a failed poll; the seconds to wait before the next. The consumer is
        unhealthy after ``POLL_FAILURES_UNHEALTHY`` in a row, and at once for an error that is
        neither the broker's nor a record's a producer wrote (the client failing). A record any
        producer can write (:data:`PRODUCER_WRITTEN`) is not reported at once: it is read around
        and dead-lettered (a drop, logged and counted), and each turned the whole bridge's /readyz
        red for POLL_RECOVERY s. The same error again is logged at most every
        ``FAILURE_LOG_EVERY`` seconds above DEBUG."""
        now = time.monotonic()
        if now - self._failed_at >= POLL_RECOVERY:
            self._poll_failures = 0
        self._poll_failures += 1
        if not isinstance(exc, (KafkaError, *PRODUCER_WRITTEN)):
            self._poll_failures = max(self._poll_failures, POLL_FAILURES_UNHEALTHY)
        self._failed_at = now
        self._failure_metric.labels(self.name, type(exc).__name__).inc()
        delay = self.settler.backoff.delay(self._poll_failures)
        what = repr(exc)
        last, logged_at = self._failure_logged
        if what == last and now - logged_at < FAILURE_LOG_EVERY:
            self._failure_repeats += 1
            log.debug("kafka adapter %s: poll failed again (%d in a row): %s", self.name, self._poll_failures, what)
            return delay
        hint = ""
        if isinstance(exc, UnsupportedCodecError):
            hint = "; install aiokafka's lz4, snappy and zstd extras (docs/kafka.md#compression)"
        elif _unreadable(exc):
            hint = "; a record the client cannot read: reading each partition alone around it"
            hint += " (docs/kafka.md#dead-letters)"
        log.log(
            logging.WARNING if isinstance(exc, KafkaError) else logging.ERROR,
            "kafka adapter %s: poll failed (%d in a row; %d more since the last line, at DEBUG): %s%s; reading "
            "again from where it began%s",
            self.name,
            self._poll_failures,
            self._failure_repeats,
            what,
            hint,
            "" if _unreadable(exc) else f" in {delay:.1f}s",
            exc_info=not isinstance(exc, KafkaError),
        )
        self._failure_logged, self._failure_repeats = (what, now), 0
        return delay

    async def _handle(self, batch: Batch, gen: int) -> None:
        """Settle the batch, then commit every partition's ``last offset + 1``. Nothing is logged
        per record above DEBUG: one DEBUG line per batch (refusals log themselves)."""
        self._batch_generation = gen
        records = [r for recs in batch.values() for r in recs]
        await self.settler.settle(records)
        offsets = {tp: last_offset(recs[-1]) + 1 for tp, recs in batch.items() if recs}
        log.debug("kafka adapter %s: %d record(s) settled; committing %s", self.name, len(records), offsets)
        await self._commit(offsets, gen)

    def _rewind(self, batch: Batch) -> None:
        """Read the batch again from its first record, and drop what was read after it."""
        assert self.consumer is not None
        self._rewinds += 1  # a read-around in flight puts back what it read (_put_back)
        first = {tp: recs[0].offset for tp, recs in batch.items() if recs}
        for gen, _, ahead in self._ahead:
            for tp, recs in ahead.items():
                if recs and gen == self._generation and tp not in first:
                    first[tp] = recs[0].offset
        self._drop_ahead()
        assigned = self.consumer.assignment()
        for tp, offset in first.items():
            if tp in assigned:
                self._seek(tp, offset)

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
        """Produce every letter and wait for the broker's acks. A letter the topic refuses for its
        size is written again a quarter as large; any other failure is raised (and retried)."""
        await write_letters(items, self._produce)

    async def _produce(self, item: Item[Record], budget: int) -> asyncio.Future[Any]:
        producer, topic = self.producer, self.entry.dead_letter_topic
        assert producer is not None and topic is not None and item.error is not None
        letter = dead_letter(item.message, item.error, item.event, budget)
        if letter.trimmed and not isinstance(item.message, Unreadable):
            log.warning(
                "kafka adapter %s: the dead letter of %s is trimmed to fit %d bytes (%s cut)",
                self.name,
                fallback_id(item.message),
                budget,
                ",".join(letter.trimmed),
            )
        ack: asyncio.Future[Any] = await producer.send(
            topic, value=letter.value, key=letter.key, headers=letter.headers
        )
        return ack

    async def acknowledge(self, items: Sequence[Item[Record]]) -> None:
        """Nothing one by one: :meth:`_handle` commits the batch's offsets once it is settled."""

    async def wait(self, seconds: float) -> bool:
        """Sleep while polling the paused consumer, so the group keeps this member; False once
        stopping or a rebalance took the batch's partitions."""
        assert self.consumer is not None
        deadline = time.monotonic() + seconds
        while not self._stopping.is_set() and (left := deadline - time.monotonic()) > 0:
            try:
                stray = await self._getmany(max(1, int(min(left, 0.5) * 1000)))
            except Exception as exc:  # undone by _getmany; counted and logged as any failed poll
                await self._sleep(min(left, self._poll_failed(exc)))
                continue
            for tp, recs in stray.items():
                # A partition assigned just before the listener paused it: read it again later.
                self._seek(tp, recs[0].offset)
                self.consumer.pause(tp)
            self._check_topics()
        return not self._stopping.is_set() and self._batch_generation == self._generation

    def pause(self) -> None:
        assert self.consumer is not None
        self._held = True
        self.consumer.pause(*self.consumer.assignment())

    def resume(self) -> None:
        assert self.consumer is not None
        self._held = False
        self.consumer.resume(*self.consumer.assignment())
        self._room.set()

    async def _sleep(self, seconds: float) -> None:
        await within(seconds, self._stopping.wait())

    # -- topics the cluster lacks, and readiness ---------------------------------------------------

    def _missing_now(self) -> set[str]:
        """Subscribed topics absent from the metadata the consumer last fetched (which names only
        them): known once the group has assigned this member its partitions, even none."""
        if not self._joined or self.consumer is None:
            return set()
        return {t for t in self.entry.topics if self.consumer.partitions_for_topic(t) is None}

    def _check_topics(self) -> None:
        """Log once when a subscribed topic is missing from the cluster, and once when it appears
        (not at every metadata refresh)."""
        missing = self._missing_now()
        if missing == self._missing:
            return
        for topic in sorted(missing - self._missing):
            log.warning(
                "kafka adapter %s: topic %s is not in the cluster (it does not exist, or this client may "
                "not read it); its partitions are read once it appears (checked every %ss)",
                self.name,
                topic,
                self.entry.metadata_refresh_seconds,
            )
        for topic in sorted(self._missing - missing):
            log.info("kafka adapter %s: topic %s now exists; it is read from the next rebalance", self.name, topic)
        self._missing = missing

    def readiness(self) -> ConsumerReadiness:
        """What ``/readyz`` shows of this consumer. No partitions is not a failure: a group with
        more members than partitions leaves some with none (docs/kafka.md#readiness)."""
        consumer = self.consumer if self._task is not None and not self._task.done() else None
        assigned = len(consumer.assignment()) if consumer is not None else 0
        state: State
        if consumer is None:
            state = "stopped"
        elif not self._joined:
            state = "joining"
        elif not assigned:
            state = "no partitions assigned"
        else:
            state = "paused" if self.paused else "consuming"
        return {
            "check": self.name,
            "group_id": self.group_id,
            "topics": list(self.entry.topics),
            "state": state,
            "assigned_partitions": assigned,
            "missing_topics": sorted(self._missing_now()) if consumer is not None else [],
        }

    # -- rebalances --------------------------------------------------------------------------------

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Let the batch in hand finish and commit (unless Temporal is down), then forget it. What
        was read ahead of it is dropped first, so no batch is begun meanwhile: the new assignment
        reads from the committed offsets."""
        self._drop_ahead()
        if not self._idle.is_set() and not self._held:
            if not await within(REVOKE_WAIT, self._idle.wait()):
                log.warning("kafka adapter %s: batch unfinished at rebalance; it will be re-delivered", self.name)
        self._generation += 1
        self._origins.clear()
        for task in self._noting:
            task.cancel()
        self._drop_ahead()
        log.info("kafka adapter %s: partitions revoked %s", self.name, sorted(map(tuple, revoked)))

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        assert self.consumer is not None
        self._joined = True
        self._check_topics()
        held = self._held and not self._idle.is_set()  # a batch waits, paused (not just a stale count)
        if held and assigned:
            self.consumer.pause(*assigned)
        log.info(
            "kafka adapter %s: partitions assigned %s%s",
            self.name,
            sorted(map(tuple, assigned)),
            " (paused: Temporal unavailable)" if held and assigned else "",
        )

    def _note_origins(self, assigned: set[TopicPartition]) -> asyncio.Future[list[BaseException | None]]:
        """Note where the group starts each partition just assigned: its committed offset, or where
        ``auto_offset_reset`` puts it. A poll that fails in this generation before its positions
        were noted goes back there (:meth:`_seek_to_start`), not to a second reset, which with
        ``latest`` would pass what was written since the first. aiokafka sets the positions after
        the rebalance listener is called and may fetch meanwhile, so each is noted the moment it is
        set, before a fetch can have taken records of it, each for itself. A task of its own does
        it: the listener must not wait (aiokafka sends no heartbeat until it returns, and a slow
        broker would cost the member its session). One not set within ORIGIN_WAIT keeps the old
        way, a reset; a rebalance cancels what is still waited for. With ``latest``, each origin
        is committed as it is noted."""
        gen = self._generation

        async def note(tp: TopicPartition) -> None:
            offset = await self._position(tp, ORIGIN_WAIT)
            if offset is not None and gen == self._generation:
                self._origins[tp] = offset
                if self.entry.auto_offset_reset == "latest":
                    # Committed at once: a partition the group has no commit for was reset to its
                    # end, and until its first batch settled a crash, a stop or a rebalance left
                    # it so, and its next owner reset it to the end again, past what was read.
                    await self._commit({tp: offset}, gen)

        tasks = [asyncio.ensure_future(note(tp)) for tp in sorted(assigned)]
        for task in tasks:
            self._noting.add(task)
            task.add_done_callback(self._noting.discard)
        return asyncio.gather(*tasks, return_exceptions=True)


def build(entry: KafkaConsumer, pipeline: Pipeline, config: BridgeConfig) -> KafkaAdapter:
    return KafkaAdapter(entry, pipeline, config)
