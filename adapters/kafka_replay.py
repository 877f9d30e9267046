"""Replay of a Kafka dead-letter topic: ``signal-bridge replay kafka`` (docs/replay.md).

Every letter in ``dead_letter_topic`` is the refused record as it came (key, value, headers) plus
``x-original-topic``/``-partition``/``-offset``/``-timestamp``. :func:`original` rebuilds that
record, so :func:`adapters.kafka_parse.to_message` gives it the source (``kafka:{topic}``) and the
offset-based id (``kafka:{topic}:{partition}:{offset}``) it had, and the entry that reads its
topic settles it through the adapter's settle path. The replay reads, with its own consumer group
(offsets committed by hand, partitions assigned by hand: no rebalance), from the group's committed
offsets up to the topic's end offsets taken when it begins, so it ends even though it writes to
the same topic:

- an event Temporal holds is done;
- a letter still refused is written again to the end of the same topic with the new reason
  (exactly the dead letter the adapter writes), before the replay commits past it;
- a letter that cannot be replayed (:data:`adapters.replay_common.NOT_REPLAYABLE`) is written
  again as it is, for a later replay (with another config) or a person to look at.

Nothing is committed before its letter is settled one of these ways, so nothing is lost: a replay
stopped half-way is read again from the last commit, and the run ids dedupe what it re-sends.
``dry_run`` decodes and checks only: it commits, produces and submits nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from adapters.kafka import LETTERS_IDEMPOTENT, client_options, write_letters
from adapters.kafka_parse import (
    MAX_REQUEST_BYTES,
    Record,
    dead_letter,
    fallback_id,
    record_headers,
    to_message,
)
from adapters.replay_common import (
    NO_ENTRY,
    NO_RECORD,
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
from bridge.config import KafkaConsumer, KafkaSecurity
from bridge.deadletter import H_EVENT_ID, H_ORIGINAL, dropped_by_replay
from bridge.decode import Message
from bridge.errors import BridgeError
from bridge.pipeline import Pipeline
from bridge.settle import Abandoned, Backoff, Item, Settler, Transport

log = logging.getLogger(__name__)

POLL_MS = 500
IDLE_LIMIT = 30.0
"""Seconds without a record while a partition is short of its end offset: the replay stops there
(what it read is committed; a later replay goes on from it)."""


@dataclass(eq=False)
class Letter:
    """A dead letter as read, and the record it was made of."""

    record: Record  # the letter in the dead-letter topic
    original: Record  # rebuilt from it: topic, partition, offset and timestamp of the refused record
    headers: dict[str, str]  # the letter's headers as text

    @property
    def where(self) -> str:
        return where(self.record)


def where(record: Record) -> str:
    return f"{record.topic}:{record.partition}:{record.offset}"


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def original(letter: Record) -> Record | str:
    """The record ``letter`` was made of, or why it cannot be told (a reason of
    :data:`adapters.replay_common.NOT_REPLAYABLE`). Its headers are the letter's without the
    dead-letter ones: those the record had, as far as they fitted (a letter whose headers had to
    be cut says so, and is not replayed)."""
    headers = record_headers(letter)
    if is_trimmed(headers):
        return TRIMMED
    topic = headers.get(H_ORIGINAL + "topic")
    partition, offset = _int(headers.get(H_ORIGINAL + "partition")), _int(headers.get(H_ORIGINAL + "offset"))
    if not topic or partition is None or offset is None:
        return NOT_A_DEAD_LETTER
    stamp = _int(headers.get(H_ORIGINAL + "timestamp"))
    # An x-event-id that is the record's offset id is the letter's own, of a record without one
    # (the bridge's ids for those are reserved): kept, it made an entry that reads its id from
    # that header refuse the replayed record as malformed, at every replay.
    own = f"kafka:{topic}:{partition}:{offset}".encode()
    kept_headers = [
        (k, v)
        for k, v in letter.headers or ()
        if not dropped_by_replay(str(k)) and not (str(k).lower() == H_EVENT_ID and v == own)
    ]
    return ConsumerRecord(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp=stamp if stamp is not None else -1,
        timestamp_type=0,
        key=letter.key,
        value=letter.value,
        checksum=None,
        serialized_key_size=-1 if letter.key is None else len(letter.key),
        serialized_value_size=-1 if letter.value is None else len(letter.value),
        headers=kept_headers,
    )


T = TypeVar("T")


class KafkaReplay:
    """One replay of one dead-letter topic; :meth:`run` once."""

    def __init__(
        self,
        entries: Sequence[KafkaConsumer],
        pipeline: Pipeline,
        *,
        topic: str,
        group_id: str,
        bootstrap_servers: str,
        security: KafkaSecurity,
        batch: int = 500,
        dry_run: bool = False,
        give_up_after: float = 120.0,
        progress: Progress | None = None,
        report: Report | None = None,
    ) -> None:
        self.entries = list(entries)
        self.pipeline = pipeline
        self.topic = topic
        self.group_id = group_id
        self.bootstrap_servers = bootstrap_servers
        self.security = security
        self.batch = batch
        self.dry_run = dry_run
        self.give_up_after = give_up_after
        self.progress = progress or (lambda tally: None)
        self.report = report or (lambda line: None)
        self.tally = Tally()
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.backoff = Backoff()
        self._outage_since: float | None = None
        self.stopped: str | None = None  # why the replay stopped short of the end offsets, if it did
        self._opts: dict[str, Any] = {}
        self._topics: dict[str, set[int]] = {}  # original topic -> its partitions, as described
        self._ends: dict[TopicPartition, int] = {}  # their end offsets, as last asked
        self._records_read: set[tuple[str, int, int, bytes]] = set()  # letters read: their record, their content
        self._wholes_read: set[tuple[str, int, int, bytes]] = set()  # whole letters read: record, key and value
        self._settlers = [
            Settler(
                pipeline,
                _EntryTransport(self),
                adapter=REPLAY_ADAPTER,
                name=f"replay {topic} → kafka:{','.join(entry.topics)}",
                event=entry.event,
                on_unroutable="dead_letter",  # a replay never skips: what is refused stays a letter
                transient=(KafkaError,),
            )
            for entry in self.entries
        ]

    def entry_for(self, topic: str) -> int | None:
        """The entry that reads ``topic``. When entries dead-letter to this topic, only one of
        them: a letter is believed on its word (``x-original-topic``), and a letter naming another
        entry's topic (written by anyone who may write here) would otherwise take that entry's
        source scope and ids."""
        readers = [i for i, e in enumerate(self.entries) if topic in e.topics]
        if any(e.dead_letter_topic == self.topic for e in self.entries):
            readers = [i for i in readers if self.entries[i].dead_letter_topic == self.topic]
        return next(iter(readers), None)

    async def run(self) -> Tally:
        opts = self._opts = client_options(self.security)
        partitions = await self._partitions(opts)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            group_id=self.group_id,
            client_id=f"signal-bridge-{self.group_id}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            **opts,
        )
        try:
            await self.consumer.start()
            if not self.dry_run:
                self.producer = AIOKafkaProducer(
                    bootstrap_servers=self.bootstrap_servers,
                    acks="all",
                    enable_idempotence=LETTERS_IDEMPOTENT,
                    max_request_size=MAX_REQUEST_BYTES,
                    **opts,
                )
                await self.producer.start()
            await self._read(partitions)
        except KafkaError as exc:
            raise BridgeError(f"replay of {self.topic}: Kafka at {self.bootstrap_servers}: {exc!r}") from exc
        finally:
            for client in (self.consumer, self.producer):
                if client is not None:
                    await client.stop()
        return self.tally

    async def _partitions(self, opts: dict[str, Any]) -> list[TopicPartition]:
        """The topic's partitions."""
        numbers = await self._describe(self.topic, opts)
        if not numbers:
            raise BridgeError(f"topic {self.topic} does not exist (or this client may not read it)")
        return sorted(TopicPartition(self.topic, p) for p in numbers)

    async def _describe(self, topic: str, opts: dict[str, Any]) -> set[int]:
        """``topic``'s partitions, none when it has none (asked of an admin client: a consumer's or
        producer's metadata request could create a missing topic on a cluster that creates topics
        by itself)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers, **opts)
        try:
            await admin.start()
            [described] = await admin.describe_topics([topic])
        except KafkaError as exc:
            raise BridgeError(f"cannot reach Kafka at {self.bootstrap_servers}: {exc!r}") from exc
        finally:
            await admin.close()
        if described.get("error_code"):
            return set()
        return {p["partition"] for p in described.get("partitions") or ()}

    async def _unwritten(self, records: Sequence[Record]) -> list[bool]:
        """For each record a letter names, whether its topic lacks it: a partition the topic does
        not have, or an offset at or past the partition's end (asked again when past the end as
        last asked: the topic grows). Anyone who may write to the dead-letter topic can write a
        letter, so one is believed only of a record that is there."""
        if not records:
            return []
        consumer = self.consumer
        assert consumer is not None
        for topic in {r.topic for r in records} - self._topics.keys():
            self._topics[topic] = await self._describe(topic, self._opts)
        known = [r.partition in self._topics[r.topic] for r in records]
        ask = {
            TopicPartition(r.topic, r.partition)
            for r, there in zip(records, known, strict=True)
            if there and r.offset >= self._ends.get(TopicPartition(r.topic, r.partition), 0)
        }
        if ask:
            self._ends.update(await consumer.end_offsets(sorted(ask)))
        return [
            not there or r.offset < 0 or r.offset >= self._ends.get(TopicPartition(r.topic, r.partition), 0)
            for r, there in zip(records, known, strict=True)
        ]

    async def _read(self, partitions: list[TopicPartition]) -> None:
        """From the committed offsets (or the beginning) to the end offsets as they are now."""
        consumer = self.consumer
        assert consumer is not None
        consumer.assign(partitions)
        ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
        starts = {tp: await consumer.position(tp) for tp in partitions}
        self.tally.total = sum(max(0, ends[tp] - starts[tp]) for tp in partitions)
        self.progress(self.tally)
        pending = {tp for tp in partitions if starts[tp] < ends[tp]}
        idle_since = time.monotonic()
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=POLL_MS, max_records=self.batch)
            records: list[Record] = []
            offsets: dict[TopicPartition, int] = {}
            for tp, recs in batch.items():
                take = [r for r in recs if r.offset < ends[tp]]
                records.extend(take)
                if take:
                    offsets[tp] = take[-1].offset + 1
                if len(take) < len(recs) or (take and take[-1].offset + 1 >= ends[tp]):
                    pending.discard(tp)
            if records:
                idle_since = time.monotonic()
                await self._settle(records)
                if not self.dry_run:
                    await consumer.commit(offsets)
                self.progress(self.tally)
                continue
            for tp in list(pending):  # past transaction markers, nothing more to read
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
            if pending and time.monotonic() - idle_since > IDLE_LIMIT:
                short = sorted((tp.partition, ends[tp]) for tp in pending)
                log.warning(
                    "replay %s: nothing read for %.0fs short of the end offsets %s; stopping here",
                    self.topic,
                    IDLE_LIMIT,
                    short,
                )
                self.stopped = f"nothing read for {IDLE_LIMIT:.0f}s short of the end offsets (partition, end) {short}"
                break

    async def _settle(self, records: list[Record]) -> None:
        self.tally.read += len(records)
        report = self.report if self.dry_run else None
        keep: list[Record] = []
        named: list[tuple[int, Letter]] = []
        for record in records:
            if self._copy_of_one_read(record):
                if report is not None:
                    report(f"skip           {where(record)}: a copy of a letter this replay read before")
                continue
            rebuilt = original(record)
            entry = None if isinstance(rebuilt, str) else self.entry_for(rebuilt.topic)
            if isinstance(rebuilt, str) or entry is None:
                kept(self.tally, rebuilt if isinstance(rebuilt, str) else NO_ENTRY, where(record), report)
                keep.append(record)
            else:
                named.append((entry, Letter(record, rebuilt, record_headers(record))))
        groups: dict[int, list[Letter]] = {}
        unwritten = await self._retried(lambda: self._unwritten([letter.original for _, letter in named]), "look up")
        for (entry, letter), missing in zip(named, unwritten, strict=True):
            if missing:
                kept(self.tally, NO_RECORD, letter.where, report)
                keep.append(letter.record)
            else:
                groups.setdefault(entry, []).append(letter)
        for entry, letters in groups.items():
            if self.dry_run:
                fmt = self.entries[entry].event
                for letter in letters:
                    checked = inspect(self.pipeline, self._to_message, fmt, letter)
                    count_checked(self.tally, checked, letter_id(letter.headers), letter.where, self.report)
                continue
            items = await self._settlers[entry].settle(letters)
            self._outage_since = None
            count_settled(self.tally, items, lambda m: letter_id(m.headers), lambda m: m.where)
        if keep and not self.dry_run:
            await self._copy(keep)

    async def _retried(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        """``call`` until Kafka answers, waiting out its errors as the other calls' are (up to
        ``give_up_after``): the batch stays uncommitted if it never does."""
        attempt = 0
        while True:
            try:
                result = await call()
            except (KafkaError, BridgeError) as exc:
                attempt += 1
                if not await self.wait(self.backoff.delay(attempt)):
                    raise BridgeError(f"cannot {what} the topics letters name: {exc!r}") from exc
                continue
            self._outage_since = None  # answered: an outage's clock starts again at the next error
            return result

    def _copy_of_one_read(self, record: Record) -> bool:
        """Whether an earlier letter of this replay was of the same record (``x-original-*``) and
        holds the same key, value and headers of the record's (one naming no record: the same
        headers, all of them): the record's letter and the ones earlier replays wrote of it again.
        Each was settled, or kept, and written back once more: a replay with a fresh group (which
        reads every letter the topic holds) doubled a letter still refused, 1, 2, 4, 8… The first is
        settled; the others are counted as duplicates and committed, not written again.

        A letter whose headers were cut is a copy of a whole letter of its record read before, and
        of one cut alike; never the other way: read first, it made the record's whole letter a copy,
        committed and never replayed (anyone who may write to the topic could do that)."""
        headers = record_headers(record)
        topic = headers.get(H_ORIGINAL + "topic") or ""
        partition, offset = _int(headers.get(H_ORIGINAL + "partition")), _int(headers.get(H_ORIGINAL + "offset"))
        # With what it holds: a letter someone else wrote naming the same record is no copy of it,
        # and must not make the record's own letter skipped. A letter standing for a range the
        # client could not read names its end: one of the first offset alone (written when the
        # range was not found) is no copy of it.
        body = [record.key, record.value, headers.get(H_ORIGINAL + "last-offset", "").encode()]
        cut = is_trimmed(headers)
        named = bool(topic) and partition is not None and offset is not None
        if not topic or partition is None or offset is None:
            topic, partition, offset = "", -1, -1
        kept = [  # the record's headers of a whole letter naming it; of any other, all of them
            part
            for name, value in record.headers or ()
            if cut or not named or not dropped_by_replay(str(name))
            for part in (str(name).encode("utf-8", "surrogatepass"), bytes(value or b""))
        ]
        whole = (topic, partition, offset, _digest(body))
        seen = (topic, partition, offset, _digest([b"cut" if cut else b"", *body, *kept]))
        if seen in self._records_read or (cut and named and whole in self._wholes_read):
            self.tally.duplicates += 1
            return True
        self._records_read.add(seen)
        if named and not cut:
            self._wholes_read.add(whole)
        return False

    @staticmethod
    def _to_message(letter: Letter) -> Message:
        return to_message(letter.original)

    async def _copy(self, records: list[Record]) -> None:
        """Write letters that cannot be replayed again as they are, so the commit leaves none behind."""
        attempt = 0
        while True:
            try:
                producer = self.producer
                assert producer is not None
                acks = [
                    await producer.send(
                        self.topic,
                        key=r.key,
                        value=r.value if r.value is not None or r.key is not None else b"",
                        headers=list(r.headers or ()),
                    )
                    for r in records
                ]
                await asyncio.gather(*acks)
                self._outage_since = None  # an outage's clock starts again at the next refusal
                return
            except KafkaError as exc:
                attempt += 1
                if not await self.wait(self.backoff.delay(attempt)):
                    raise BridgeError(f"cannot write letters back to {self.topic}: {exc!r}") from exc

    async def wait(self, seconds: float) -> bool:
        """Wait before another attempt; False once Temporal (or Kafka) has refused for longer than
        ``give_up_after`` seconds: the replay stops, its batch uncommitted."""
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
        if now - self._outage_since >= self.give_up_after:
            return False
        await asyncio.sleep(min(seconds, self.give_up_after - (now - self._outage_since)))
        return True


class _EntryTransport(Transport[Letter]):
    """The settle path's view of the letters of one entry."""

    def __init__(self, replay: KafkaReplay) -> None:
        self.replay = replay

    def to_message(self, message: Letter) -> Message:
        return to_message(message.original)

    def fallback_id(self, message: Letter) -> str:
        return fallback_id(message.original)

    def can_dead_letter(self) -> bool:
        return self.replay.producer is not None

    async def dead_letter(self, items: Sequence[Item[Letter]]) -> None:
        """The letter the adapter would write for the record now, with the new reason: the same
        topic, and ``x-original-*`` still naming the record it was made of. A letter too large for
        the topic is written again a quarter as large, as the adapter does."""
        producer = self.replay.producer
        assert producer is not None

        async def produce(item: Item[Letter], budget: int) -> asyncio.Future[Any]:
            assert item.error is not None
            letter = dead_letter(item.message.original, item.error, item.event, budget)
            ack: asyncio.Future[Any] = await producer.send(
                self.replay.topic, key=letter.key, value=letter.value, headers=letter.headers
            )
            return ack

        await write_letters(items, produce)

    async def acknowledge(self, items: Sequence[Item[Letter]]) -> None:
        """Nothing one by one: the replay commits the batch's offsets once it is settled."""

    async def wait(self, seconds: float) -> bool:
        return await self.replay.wait(seconds)


__all__ = ["Abandoned", "KafkaReplay", "Letter", "original", "where"]


def _digest(parts: list[bytes | None]) -> bytes:
    content = hashlib.sha256()
    for part in parts:
        content.update(b"-" if part is None else len(part).to_bytes(8, "big") + part)
    return content.digest()
