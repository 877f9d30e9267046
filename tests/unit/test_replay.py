"""Replays without a broker or Temporal (docs/replay.md): a dead letter gives back the message it
was made of (so the event its original id and source), a batch of letters is settled as the
adapter settles messages (held, written back with the new reason, kept), a replayed past event
gets ``replay:{n}:{original id}`` and never a nested one, and what the command prints."""

from __future__ import annotations

import asyncio
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiokafka.structs import ConsumerRecord, TopicPartition
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError, RPCStatusCode

from adapters import amqp_parse, amqp_replay, kafka_parse, kafka_replay
from adapters.replay_common import NO_ENTRY, NO_RECORD, NOT_A_DEAD_LETTER, TRIMMED, Tally
from bridge.config import AmqpConsumer, EventFormat, KafkaConsumer
from bridge.deadletter import H_EVENT_ID, H_EVENT_NAME, H_TRIMMED
from bridge.decode import decode
from bridge.errors import BridgeError, EventRejected
from bridge.event import EventSignal, content_digest, run_digest, target_workflow_id
from bridge.pipeline import Pipeline
from bridge.routing import RouteTable
from bridge.runtime import cli, replay_runs
from bridge.runtime import replay as replay_module
from bridge.runtime.progress import ProgressBar, render
from bridge.runtime.replay import replay_amqp, replay_kafka, summary
from bridge.runtime.replay_support import Existing, LookingSink, Outcome
from bridge.snapshot import Snapshot
from dispatcher import search
from tests.fakes import FakeSink
from tests.helpers import config, runner

TS = 1_714_557_600_000
ENVELOPE = EventFormat(format="envelope")


def record(
    value: bytes | None,
    *,
    key: bytes | None = b"k",
    headers: list[tuple[str, bytes]] | None = None,
    topic: str = "orders",
    partition: int = 2,
    offset: int = 41,
    timestamp: int = TS,
) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp=timestamp,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=len(key or b""),
        serialized_value_size=len(value or b""),
        headers=headers or [],
    )


def as_letter(
    letter: kafka_parse.Letter, *, topic: str = "orders.dlq", offset: int = 7
) -> ConsumerRecord[bytes, bytes]:
    """The dead letter as a replay reads it back from the dead-letter topic."""
    return record(letter.value, key=letter.key, headers=letter.headers, topic=topic, partition=0, offset=offset)


def unroutable() -> EventRejected:
    return EventRejected("unroutable", "no workflow is triggered by event 'order.created'")


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# --- Kafka: the record a letter was made of --------------------------------------------------------


def test_a_kafka_letter_gives_back_its_record_and_so_the_original_id_and_source() -> None:
    original = record(body(name="order.created", payload={"n": 1}), headers=[("traceparent", b"00-abc-01")])
    event = decode(kafka_parse.to_message(original), ENVELOPE)
    assert event.id == "kafka:orders:2:41"  # no id of its own: its offset
    letter = as_letter(kafka_parse.dead_letter(original, unroutable(), event))

    rebuilt = kafka_replay.original(letter)
    assert isinstance(rebuilt, ConsumerRecord)
    assert (rebuilt.topic, rebuilt.partition, rebuilt.offset, rebuilt.timestamp) == ("orders", 2, 41, TS)
    # The headers it had, and the event's name as the letter recorded it (EVENT_HEADERS); its id
    # too, were it not the record's offset id (which the record gets again without it).
    events = [(H_EVENT_NAME, event.name.encode())]
    assert (rebuilt.key, rebuilt.value, list(rebuilt.headers)) == (
        original.key,
        original.value,
        original.headers + events,
    )
    again = decode(kafka_parse.to_message(rebuilt), ENVELOPE)
    assert (again.id, again.source, again.time, again.metadata) == (event.id, event.source, event.time, event.metadata)


@pytest.mark.parametrize("decoded", [True, False], ids=["decoded", "refused-before-decoding"])
def test_an_id_read_from_an_x_event_id_header_is_the_same_when_replayed(decoded: bool) -> None:
    """``id_from: header:x-event-id``: the letter's own x-event-id was dropped when the replay
    rebuilt the record, so the replayed event fell back to its offset id and started again; and a
    letter written before decoding lost the record's x-event-id altogether."""
    fmt = EventFormat(format="raw", name="order.created", id_from="header:x-event-id")  # type: ignore[arg-type]
    original = record(body(n=1), headers=[("x-event-id", b"e-42")])
    event = decode(kafka_parse.to_message(original), fmt)
    assert event.id == "e-42"
    refused = unroutable() if decoded else EventRejected("malformed", "refused before it was decoded")
    letter = as_letter(kafka_parse.dead_letter(original, refused, event if decoded else None))
    rebuilt = kafka_replay.original(letter)
    assert isinstance(rebuilt, ConsumerRecord)
    assert decode(kafka_parse.to_message(rebuilt), fmt).id == "e-42"
    message = FakeMessage(body(n=1), headers={"x-event-id": "e-42"})
    amqp_event = decode(amqp_parse.to_message(message, "q"), fmt)  # type: ignore[arg-type]
    rebuilt_delivery = amqp_replay.original(amqp_letter(message, fmt=fmt, decoded=decoded), fmt)  # type: ignore[arg-type]
    assert not isinstance(rebuilt_delivery, str)
    queue, delivery = rebuilt_delivery
    assert decode(amqp_parse.to_message(delivery, queue), fmt).id == amqp_event.id == "e-42"


def test_a_letter_whose_own_event_headers_were_cut_is_replayed_unless_the_message_had_them() -> None:
    """A name of 4,000 'é' is 8,000 bytes: the letter's x-event-name was cut to 4 KiB, and that made
    the letter 'trimmed', never replayed, though the record in it was whole. Only where the record
    had such a header of its own (an entry may read the name from it) does the cut count."""
    name = "é" * 4000
    original = record(body(name=name, payload={"n": 1}))
    event = decode(kafka_parse.to_message(original), ENVELOPE)
    letter = as_letter(kafka_parse.dead_letter(original, unroutable(), event))
    rebuilt = kafka_replay.original(letter)
    assert isinstance(rebuilt, ConsumerRecord)
    assert decode(kafka_parse.to_message(rebuilt), ENVELOPE).name == name
    carrying = record(body(name=name), headers=[(H_EVENT_NAME, name.encode())])
    cut = as_letter(kafka_parse.dead_letter(carrying, unroutable(), event))
    assert kafka_replay.original(cut) == TRIMMED
    amqp_original = FakeMessage(json.dumps({"name": name}).encode(), message_id="m-1")
    assert not isinstance(amqp_replay.original(amqp_letter(amqp_original, fmt=ENVELOPE)), str)


def test_a_letter_of_a_record_without_an_id_read_from_a_header_replays_with_its_offset_id() -> None:
    """``id_from: header:x-event-id`` and a record without that header: its id was its offset id,
    which the letter wrote as its x-event-id. The replay kept that header, the entry read the id
    from it, and an id with the reserved ``kafka:orders:`` prefix was refused as malformed at every
    replay: the event could never be replayed."""
    fmt = EventFormat(format="raw", name="order.created", id_from="header:x-event-id")  # type: ignore[arg-type]
    original = record(body(n=1))
    event = decode(kafka_parse.to_message(original), fmt)
    assert event.id == "kafka:orders:2:41"
    letter = as_letter(kafka_parse.dead_letter(original, unroutable(), event))
    assert (H_EVENT_ID, b"kafka:orders:2:41") in letter.headers
    rebuilt = kafka_replay.original(letter)
    assert isinstance(rebuilt, ConsumerRecord)
    assert H_EVENT_ID not in dict(rebuilt.headers)
    assert decode(kafka_parse.to_message(rebuilt), fmt).id == event.id


def test_kafka_letters_that_cannot_be_replayed() -> None:
    assert kafka_replay.original(record(b"{}", headers=[("tenant", b"acme")])) == NOT_A_DEAD_LETTER
    original = record(b"x" * 2_000_000)
    cut = as_letter(kafka_parse.dead_letter(original, EventRejected("too_large", "big"), None))
    assert kafka_replay.original(cut) == TRIMMED


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []

    async def send(self, topic: str, *, key: Any = None, value: Any = None, headers: Any = None) -> asyncio.Future[Any]:
        self.sent.append((topic, key, value, list(headers or [])))
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def kafka_setup(*, dry_run: bool = False) -> tuple[kafka_replay.KafkaReplay, FakeSink, FakeProducer, io.StringIO]:
    sink = FakeSink()
    pipeline = Pipeline(RouteTable.from_config(config("unit", "127.0.0.1:1", [runner("w", "order.created")])), sink)
    entry = KafkaConsumer(bootstrap_servers="k:9092", topics=["orders"], dead_letter_topic="orders.dlq")
    out = io.StringIO()
    replay = kafka_replay.KafkaReplay(
        [entry],
        pipeline,
        topic="orders.dlq",
        group_id="g",
        bootstrap_servers="k:9092",
        security=entry.security,
        dry_run=dry_run,
        report=lambda line: print(line, file=out),
    )
    producer = FakeProducer()
    if not dry_run:
        replay.producer = producer  # type: ignore[assignment]
    replay.consumer = FakeEnds()  # type: ignore[assignment]

    async def describe(topic: str, opts: dict[str, Any]) -> set[int]:
        return {0, 1, 2} if topic in ("orders", "refunds") else set()

    replay._describe = describe  # type: ignore[method-assign]
    return replay, sink, producer, out


@dataclass
class FakeEnds:
    """The replay consumer's end offsets of the topics letters name: 100 on every partition,
    unless ``ends`` says otherwise."""

    ends: dict[TopicPartition, int] = field(default_factory=dict)
    asked: list[list[TopicPartition]] = field(default_factory=list)

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        self.asked.append(partitions)
        return {tp: self.ends.get(tp, 100) for tp in partitions}


def kafka_letters() -> list[ConsumerRecord[bytes, bytes]]:
    good = record(body(name="order.created", payload={"n": 1}, id="e-1"), offset=1)
    twice = record(body(name="order.created", payload={"n": 1}, id="e-1"), offset=2)  # the same event again
    never = record(body(name="order.never", payload={}), offset=3)
    elsewhere = record(body(name="order.created", payload={}), topic="refunds", offset=4)
    letters = [
        as_letter(kafka_parse.dead_letter(r, unroutable(), None), offset=i)
        for i, r in enumerate([good, twice, never, elsewhere])
    ]
    return [*letters, record(b"{}", topic="orders.dlq", offset=9)]  # not a letter at all


async def test_a_kafka_replay_holds_rewrites_and_keeps_and_nothing_is_left_behind() -> None:
    replay, sink, producer, _ = kafka_setup()
    letters = kafka_letters()
    await replay._settle(letters)
    t = replay.tally
    assert (t.read, t.accepted, dict(t.refused), dict(t.kept), t.duplicates) == (
        5,
        2,
        {"unroutable": 1},
        {NO_ENTRY: 1, NOT_A_DEAD_LETTER: 1},
        1,
    )
    assert [e.id for e in sink.held] == ["e-1", "e-1"]  # the dispatcher dedupes the second
    assert {e.source for e in sink.held} == {"kafka:orders"}
    # The still refused one as the adapter would dead-letter it now; the others as they were.
    rewritten, *copies = producer.sent
    headers = dict(rewritten[3])
    assert rewritten[0] == "orders.dlq" and headers["x-dead-letter-reason"] == b"unroutable"
    assert (headers["x-original-topic"], headers["x-original-offset"]) == (b"orders", b"3")
    assert [(c[1], c[2], c[3]) for c in copies] == [(r.key, r.value, list(r.headers)) for r in (letters[3], letters[4])]


async def test_a_letter_of_a_record_the_topic_does_not_hold_is_kept_not_replayed() -> None:
    """Anyone who may write to the dead-letter topic could write a letter naming an offset not yet
    written: replayed, its event took the offset id of the record to come there, and that record,
    without an id of its own, was then a repeat, never started."""
    replay, sink, producer, _ = kafka_setup()
    ends = cast(FakeEnds, replay.consumer)
    ends.ends[TopicPartition("orders", 2)] = 50
    made = [
        record(body(name="order.created", payload={}), offset=49),  # there
        record(body(name="order.created", payload={}), offset=50),  # the next to be written
        record(body(name="order.created", payload={}), offset=1_000_000),
        record(body(name="order.created", payload={}), partition=7, offset=1),  # no such partition
    ]
    letters = [as_letter(kafka_parse.dead_letter(r, unroutable(), None), offset=i) for i, r in enumerate(made)]
    await replay._settle(letters)
    assert [e.id for e in sink.held] == ["kafka:orders:2:49"]
    assert (replay.tally.accepted, dict(replay.tally.kept)) == (1, {NO_RECORD: 3})
    assert [(c[1], c[2], c[3]) for c in producer.sent] == [(r.key, r.value, list(r.headers)) for r in letters[1:]]
    # The topic grew: its end is asked again for a letter past the end it had.
    ends.ends[TopicPartition("orders", 2)] = 60
    later = record(body(name="order.created", payload={}), offset=55)
    await replay._settle([as_letter(kafka_parse.dead_letter(later, unroutable(), None), offset=9)])
    assert [e.id for e in sink.held][-1] == "kafka:orders:2:55"
    assert ends.asked == [[TopicPartition("orders", 2)], [TopicPartition("orders", 2)]]


async def test_a_fresh_group_writes_one_letter_of_a_record_still_refused_not_one_per_copy() -> None:
    """A replay with a fresh group reads every letter the topic holds: a record's letter and the
    ones earlier replays wrote of it again. Each still refused was written again, so every such
    replay doubled them, 1, 2, 4, 8…"""
    replay, sink, producer, _ = kafka_setup()
    never = record(body(name="order.never", payload={}), offset=3)
    elsewhere = record(body(name="order.created", payload={}), topic="refunds", offset=4)
    letters = [
        as_letter(kafka_parse.dead_letter(r, unroutable(), None), offset=i)
        for i, r in enumerate([never, elsewhere, never, elsewhere, never])
    ]
    await replay._settle(letters[:3])
    await replay._settle(letters[3:])  # a later batch of the same replay
    t = replay.tally
    assert (t.read, dict(t.refused), dict(t.kept), t.duplicates) == (5, {"unroutable": 1}, {NO_ENTRY: 1}, 3)
    assert len(producer.sent) == 2 and sink.calls == []
    assert [dict(sent[3])["x-original-offset"] for sent in producer.sent] == [b"3", b"4"]


async def test_a_letter_naming_a_record_with_another_body_is_no_copy_of_its_letter() -> None:
    """Copies were told by the record they name alone: a letter someone else wrote naming a real
    record (refused, written back) made the record's own letter, read after it, a copy: committed
    unwritten, never replayed."""
    replay, sink, _, _ = kafka_setup()
    genuine = record(body(name="order.created", payload={"n": 1}), offset=7)
    forged = record(body(name="order.never", payload={}), offset=7)
    letters = [
        as_letter(kafka_parse.dead_letter(r, unroutable(), None), offset=i) for i, r in enumerate([forged, genuine])
    ]
    await replay._settle(letters)
    assert [e.id for e in sink.held] == ["kafka:orders:2:7"]
    assert dict(replay.tally.refused) == {"unroutable": 1}  # the forged one, written back


def lookups_failing_once(monkeypatch: pytest.MonkeyPatch, replay: kafka_replay.KafkaReplay) -> list[Exception]:
    """The replay's first end-offsets lookup fails (a broker away), the next ones answer; its
    backoff made short. Returns the failures still to come."""
    from aiokafka.errors import KafkaConnectionError

    ends = cast(FakeEnds, replay.consumer)
    real = ends.end_offsets
    failures: list[Exception] = [KafkaConnectionError("broker away")]

    async def flaky(partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        if failures:
            raise failures.pop()
        return await real(partitions)

    monkeypatch.setattr(ends, "end_offsets", flaky)
    replay.backoff = kafka_replay.Backoff(0.01, 0.02)
    return failures


async def test_a_kafka_error_looking_up_the_named_records_is_waited_out(monkeypatch: pytest.MonkeyPatch) -> None:
    replay, sink, _, _ = kafka_setup()
    failures = lookups_failing_once(monkeypatch, replay)
    letter = as_letter(kafka_parse.dead_letter(record(body(name="order.created", payload={})), unroutable(), None))
    await replay._settle([letter])
    assert [e.id for e in sink.held] == ["kafka:orders:2:41"] and not failures


async def test_a_lookup_answered_ends_the_outage_it_waited_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """The clock of an outage started at a failed lookup, and a dry run never stopped it: a second
    error minutes later ended the replay at once, as if Kafka had been away all that time."""
    replay, _, _, _ = kafka_setup(dry_run=True)
    failures = lookups_failing_once(monkeypatch, replay)
    letter = as_letter(kafka_parse.dead_letter(record(body(name="order.created", payload={})), unroutable(), None))
    await replay._settle([letter])
    assert not failures and replay._outage_since is None


async def test_copies_of_a_letter_that_names_no_record_are_written_back_once() -> None:
    replay, _, producer, _ = kafka_setup()
    stray = record(b"{}", headers=[("tenant", b"acme")], topic="orders.dlq", offset=9)
    other = record(b"{}", headers=[("tenant", b"other")], topic="orders.dlq", offset=10)
    await replay._settle([stray, other, stray])
    await replay._settle([stray])
    assert (dict(replay.tally.kept), replay.tally.duplicates) == ({NOT_A_DEAD_LETTER: 2}, 2)
    assert [dict(sent[3])["tenant"] for sent in producer.sent] == [b"acme", b"other"]


async def test_a_kafka_dry_run_says_what_it_would_do_and_touches_nothing() -> None:
    replay, sink, producer, out = kafka_setup(dry_run=True)
    await replay._settle(kafka_letters())
    assert (replay.tally.accepted, dict(replay.tally.refused)) == (2, {"unroutable": 1})
    assert sink.calls == [] and producer.sent == []
    lines = out.getvalue().splitlines()
    assert sum(line.startswith("would accept") for line in lines) == 2
    assert sum("reason=unroutable" in line for line in lines) == 1
    assert sum("not replayable" in line for line in lines) == 2


# --- RabbitMQ: the delivery a letter was made of ----------------------------------------------------


@dataclass
class FakeChannel:
    is_closed: bool = False


@dataclass
class FakeMessage:
    body: bytes
    routing_key: str | None = "order.created"
    exchange: str | None = "events"
    headers: dict[str, Any] | None = None
    content_type: str | None = None
    content_encoding: str | None = None
    message_id: str | None = None
    correlation_id: str | None = None
    timestamp: datetime | None = None
    type: str | None = None
    app_id: str | None = None
    user_id: str | None = None
    priority: int | None = None
    delivery_tag: int = 1
    channel: FakeChannel = field(default_factory=FakeChannel)
    settled: list[str] = field(default_factory=list)

    async def ack(self) -> None:
        self.settled.append("ack")

    async def reject(self, requeue: bool = False) -> None:
        self.settled.append(f"reject(requeue={requeue})")

    async def nack(self, requeue: bool = True) -> None:
        self.settled.append(f"nack(requeue={requeue})")


RAW = EventFormat(format="raw", name_from="routing_key")  # type: ignore[arg-type]


def amqp_letter(
    original: FakeMessage,
    *,
    assigned_id: str | None = None,
    tag: int = 1,
    fmt: EventFormat = RAW,
    decoded: bool = True,
) -> FakeMessage:
    """What the dead-letter queue delivers: the adapter's copy, republished to the dead-letter
    exchange with the original routing key; the client gives a copy without message_id a random one.
    ``decoded``: refused as unroutable once decoded with ``fmt``, else as malformed before it was."""
    if decoded:
        event = decode(amqp_parse.to_message(original, "q"), fmt)  # type: ignore[arg-type]
        copy = amqp_parse.dead_letter_copy(original, unroutable(), "q", event)  # type: ignore[arg-type]
    else:
        refused = EventRejected("malformed", "refused before it was decoded")
        copy = amqp_parse.dead_letter_copy(original, refused, "q", None)  # type: ignore[arg-type]
    return FakeMessage(
        body=copy.body,
        routing_key=original.routing_key,
        exchange="events.dlx",
        headers=dict(copy.headers),
        message_id=copy.message_id or assigned_id,
        correlation_id=copy.correlation_id,
        timestamp=copy.timestamp,
        delivery_tag=tag,
    )


def test_an_amqp_letter_gives_back_its_delivery_and_so_the_original_id_and_source() -> None:
    stamp = datetime(2024, 5, 1, 10, tzinfo=UTC)
    original = FakeMessage(b'{"n": 1}', message_id="m-1", correlation_id="c-1", timestamp=stamp, headers={"a": "b"})
    event = decode(amqp_parse.to_message(original, "q"), RAW)  # type: ignore[arg-type]
    rebuilt = amqp_replay.original(amqp_letter(original), RAW)  # type: ignore[arg-type]
    assert not isinstance(rebuilt, str)
    queue, delivery = rebuilt
    assert (queue, delivery.exchange, delivery.routing_key, delivery.headers) == (
        "q",
        "events",
        "order.created",
        {"a": "b", H_EVENT_ID: event.id, H_EVENT_NAME: event.name},  # and the event's, as recorded
    )
    again = decode(amqp_parse.to_message(delivery, queue), RAW)
    assert (again.id, again.source, again.time, again.metadata) == (event.id, event.source, event.time, event.metadata)


def test_a_message_id_the_letters_publish_assigned_is_not_taken_for_the_original() -> None:
    original = FakeMessage(b'{"n": 4}')  # no message_id: its id is the hash of where it went and its body
    hashed = "hash:" + content_digest("events", "order.created", b'{"n": 4}')
    letter = amqp_letter(original, assigned_id="5f0c-random")
    rebuilt = amqp_replay.original(letter, RAW)  # type: ignore[arg-type]
    assert not isinstance(rebuilt, str)
    assert rebuilt[1].message_id is None
    assert decode(amqp_parse.to_message(rebuilt[1], "q"), RAW).id == hashed
    # A letter the replay wrote back says which message_id the delivery had.
    letter.headers = {**(letter.headers or {}), amqp_replay.H_MESSAGE_ID: ""}
    letter.headers.pop("x-event-id")
    rebuilt = amqp_replay.original(letter)  # type: ignore[arg-type]
    assert not isinstance(rebuilt, str) and rebuilt[1].message_id is None


def test_a_letter_of_a_delivery_rabbitmq_had_dead_lettered_before_is_replayed_with_its_death_headers() -> None:
    """A source queue fed through a retry or TTL queue gets deliveries with RabbitMQ's x-death
    headers. The letter carried them as they were, and the replay took it for a message RabbitMQ
    had dead-lettered itself: every letter of such a queue was kept for ever. (And a ``CC`` that
    is not an array made RabbitMQ refuse the letter: tests/unit/test_amqp_parse.py.)"""
    deaths = {
        "x-death": [{"queue": "orders.retry", "reason": "expired", "count": 1}],
        "x-first-death-queue": "orders.retry",
        "x-first-death-reason": "expired",
        "x-last-death-queue": "orders.retry",
        "CC": "ops@example.com",  # an AMQP 1.0 application property: text, which RabbitMQ refuses to route by
        "a": "b",
    }
    original = FakeMessage(b'{"n": 1}', message_id="m-1", headers=deaths)
    event = decode(amqp_parse.to_message(original, "q"), RAW)  # type: ignore[arg-type]
    letter = amqp_letter(original)
    assert not amqp_parse.BROKER_READS & {k.lower() for k in letter.headers or {}}
    rebuilt = amqp_replay.original(letter, RAW)  # type: ignore[arg-type]
    assert not isinstance(rebuilt, str)
    queue, delivery = rebuilt
    assert {k: v for k, v in delivery.headers.items() if k not in (H_EVENT_ID, H_EVENT_NAME)} == deaths
    again = decode(amqp_parse.to_message(delivery, queue), RAW)
    assert (again.id, again.source, again.metadata) == (event.id, event.source, event.metadata)


def test_amqp_letters_that_cannot_be_replayed() -> None:
    assert amqp_replay.original(FakeMessage(b"{}")) == NOT_A_DEAD_LETTER  # type: ignore[arg-type]
    cut = amqp_letter(FakeMessage(b"{}", message_id="m"))
    cut.headers = {**(cut.headers or {}), "x-dead-letter-trimmed": "headers"}
    assert amqp_replay.original(cut) == TRIMMED  # type: ignore[arg-type]


class FakeExchange:
    def __init__(self) -> None:
        self.published: list[tuple[Any, str]] = []

    async def publish(self, message: Any, routing_key: str, **kw: Any) -> None:
        self.published.append((message, routing_key))


@dataclass
class FakePublisher:
    default_exchange: FakeExchange = field(default_factory=FakeExchange)


async def test_an_amqp_replay_acks_what_is_held_republishes_the_refused_and_requeues_the_rest() -> None:
    sink = FakeSink()
    pipeline = Pipeline(RouteTable.from_config(config("unit", "127.0.0.1:1", [runner("w", "order.created")])), sink)
    entry = AmqpConsumer(url="amqp://x/", queue="q", event=RAW, dead_letter_exchange="dlx")
    replay = amqp_replay.AmqpReplay([entry], pipeline, queue="dead", url="amqp://x/")
    publisher = FakePublisher()
    replay.publisher = publisher  # type: ignore[assignment]
    held = amqp_letter(FakeMessage(b'{"n": 1}', message_id="m-1"), tag=1)
    refused = amqp_letter(FakeMessage(b'{"n": 2}', routing_key="order.never", message_id="m-2"), tag=2)
    foreign = FakeMessage(b"{}", delivery_tag=3)
    await replay._settle([held, refused, foreign])  # type: ignore[list-item]
    await replay._put_back()
    assert [e.id for e in sink.held] == ["m-1"]
    assert (held.settled, refused.settled, foreign.settled) == (["ack"], ["ack"], ["nack(requeue=True)"])
    [(copy, key)] = publisher.default_exchange.published
    assert key == "dead" and copy.message_id == "m-2"
    assert (
        copy.headers["x-dead-letter-reason"] == "unroutable" and copy.headers["x-original-routing-key"] == "order.never"
    )
    assert copy.headers[amqp_replay.H_MESSAGE_ID] == "m-2"
    t = replay.tally
    assert (t.accepted, dict(t.refused), dict(t.kept)) == (1, {"unroutable": 1}, {NOT_A_DEAD_LETTER: 1})


def letter_naming_payments(message_id: str, headers: dict[str, Any] | None = None) -> FakeMessage:
    """A letter an outsider who may publish to the dead-letter queue wrote: headers naming the
    ``payments`` queue and its id ``pay-123``, and ``headers`` beside them."""
    claimed = {
        "x-original-queue": "payments",
        "x-original-message-id": "pay-123",
        "x-original-routing-key": "order.created",
    }
    return FakeMessage(
        b'{"amount": 1000}',
        routing_key="order.created",
        exchange="",
        headers={**claimed, **(headers or {})},
        message_id=message_id,
    )


async def kept_by(replay: amqp_replay.AmqpReplay, letter: FakeMessage) -> dict[str, int]:
    """Settle ``letter`` alone and put back what was kept: the replay's kept tally, by reason."""
    await replay._settle([letter])  # type: ignore[list-item]
    await replay._put_back()
    return dict(replay.tally.kept)


async def test_a_message_rabbitmq_dead_lettered_itself_is_no_letter_whatever_its_headers_claim() -> None:
    """The adapter declares its queues with the dead-letter exchange the replay reads, so RabbitMQ
    puts there what expires or overflows, with its publisher's headers as they were: an outsider
    who may publish to one queue wrote x-original-* headers naming another queue and an id, let it
    expire, and the replay submitted it under that queue's source."""
    sink = FakeSink()
    pipeline = Pipeline(RouteTable.from_config(config("unit", "127.0.0.1:1", [runner("w", "order.created")])), sink)
    public = AmqpConsumer(url="amqp://x/", queue="public.events", event=RAW, dead_letter_exchange="events.dlx")
    payments = AmqpConsumer(url="amqp://x/", queue="payments", event=RAW, dead_letter_exchange="events.dlx")
    replay = amqp_replay.AmqpReplay([public, payments], pipeline, queue="events.dead", url="amqp://x/")
    replay.publisher = FakePublisher()  # type: ignore[assignment]
    expired_here = {
        "x-death": [{"queue": "public.events", "reason": "expired"}],
        "x-first-death-queue": "public.events",
    }
    forged = letter_naming_payments("whatever", expired_here)
    assert await kept_by(replay, forged) == {NOT_A_DEAD_LETTER: 1}
    assert sink.held == [] and forged.settled == ["nack(requeue=True)"]


async def test_a_letter_naming_a_queue_whose_entry_writes_no_letters_is_kept_not_replayed() -> None:
    """Only an entry with a dead_letter_exchange writes the letters replayed here. A letter with
    no x-death naming another entry's queue (published by anyone who may write to this queue or
    its exchange) was submitted as that queue's event, with the id it chose."""
    sink = FakeSink()
    pipeline = Pipeline(RouteTable.from_config(config("unit", "127.0.0.1:1", [runner("w", "order.created")])), sink)
    public = AmqpConsumer(url="amqp://x/", queue="public.events", event=RAW, dead_letter_exchange="events.dlx")
    payments = AmqpConsumer(url="amqp://x/", queue="payments", event=RAW)  # dead-letters nothing
    replay = amqp_replay.AmqpReplay([public, payments], pipeline, queue="events.dead", url="amqp://x/")
    replay.publisher = FakePublisher()  # type: ignore[assignment]
    forged = letter_naming_payments("pay-123")
    assert (replay.entry_for("public.events"), replay.entry_for("payments")) == (0, None)
    # No entry dead-letters (the exchange taken out of the config): a letter goes to its queue's reader.
    bare = AmqpConsumer(url="amqp://x/", queue="public.events", event=RAW)
    unlettered = amqp_replay.AmqpReplay([bare, payments], pipeline, queue="events.dead", url="amqp://x/")
    assert (unlettered.entry_for("public.events"), unlettered.entry_for("payments")) == (0, 1)
    assert await kept_by(replay, forged) == {NO_ENTRY: 1}
    assert sink.held == [] and forged.settled == ["nack(requeue=True)"]


async def test_two_copies_of_one_letter_in_a_batch_are_looked_up_and_counted_once() -> None:
    """A retried dead-letter write can leave two copies of a letter: the summary counted each,
    with twice the new runs the dispatcher then started."""

    class Absent:
        async def describe(self, **_: Any) -> None:
            raise RPCError("not found", RPCStatusCode.NOT_FOUND, b"")

    client = SimpleNamespace(get_workflow_handle=lambda workflow_id: Absent())
    two_targets = [runner("a", "order.created"), runner("b", "order.created")]
    routes = RouteTable.from_config(config("unit", "127.0.0.1:1", two_targets))
    sink = FakeSink()
    looking = LookingSink(cast(Any, sink), cast(Any, client), routes, "unit")
    event = EventSignal(id="e-1", name="order.created", payload={}, source="kafka:t")
    await looking.submit([event, event])
    assert (looking.existing.events, looking.existing.new_runs) == (1, 2)


# --- history ------------------------------------------------------------------------------------------


def target_input(event_id: str, **metadata: Any) -> dict[str, Any]:
    envelope = {"id": event_id, "name": "order.created", "source": "http:ci", "time": "2024-05-01T10:00:00+00:00"}
    return {
        "workflow_id": "w",
        "exec_id": "x",
        "input": {},
        "trigger": {"n": 1},
        "event": {**envelope, "metadata": metadata},
    }


def test_a_past_event_is_sent_again_as_replay_n_of_its_original_id() -> None:
    original = replay_runs.original_of(target_input("e-1", traceparent="00-abc"))
    assert original is not None
    again = replay_runs.replayed(original, 7, to="ship", at="now")
    assert (again.id, again.source, again.name, again.payload, again.time) == (
        "replay:7:ship:e-1",
        "http:ci",
        "order.created",
        {"n": 1},
        "2024-05-01T10:00:00+00:00",
    )
    assert again.metadata == {"traceparent": "00-abc", "replay": {"number": 7, "of": "e-1", "at": "now", "to": "ship"}}
    # A replayed event replayed again is its original event: ids never nest.
    assert replay_runs.root_id(again) == "e-1"
    assert replay_runs.replayed(again, 8).id == "replay:8:e-1"
    # One number to two entries: two events (one id, and the dispatcher took the second for the first).
    assert replay_runs.replayed(original, 7, to="bill").id != again.id


def test_what_is_not_a_target_input_is_not_replayed() -> None:
    for arg in (None, [], {"event": "x"}, {"event": {"id": "", "name": "n", "source": "s"}}, {"trigger": {}}):
        assert replay_runs.original_of(arg) is None


def test_to_names_an_entry_of_the_config() -> None:
    routes = RouteTable.from_config(config("unit", "127.0.0.1:1", [runner("w", "order.created")]))
    with pytest.raises(Exception, match="no workflow entry 'nope'"):
        replay_runs.only_entry(routes, "nope")


async def test_submit_retries_while_temporal_refuses_then_gives_up() -> None:
    from bridge.errors import Unavailable
    from bridge.settle import Backoff

    routes = RouteTable.from_config(config("unit", "127.0.0.1:1", [runner("w", "order.created")]))
    sink = FakeSink(outages=2)
    events = [EventSignal("e", "order.created", {}, "s"), EventSignal("f", "order.never", {}, "s")]
    done = await replay_runs.submit(Pipeline(routes, sink), events, Backoff(0.01, 0.02), 5.0)
    assert [d.rejected.reason if d.rejected else None for d in done] == [None, "unroutable"]
    sink.unavailable = Unavailable("down", 0.01)
    with pytest.raises(Unavailable):
        await replay_runs.submit(Pipeline(routes, sink), events[:1], Backoff(0.01, 0.02), 0.05)


# --- what the command shows ---------------------------------------------------------------------------


def test_the_progress_bar_is_drawn_only_on_a_terminal() -> None:
    assert render("replay", 5, 10, "x") == "replay [###############---------------] 5/10 x"
    assert render("replay", 3, None) == "replay 3"
    quiet = io.StringIO()
    ProgressBar("r", quiet).update(1, 2, force=True)
    assert quiet.getvalue() == ""
    shown = io.StringIO()
    bar = ProgressBar("r", shown, enabled=True)
    bar.update(1, 2, force=True)
    bar.finish(2, 2)
    assert "1/2" in shown.getvalue() and shown.getvalue().endswith("2/2\n")


def test_the_summary_counts_by_reason_and_says_what_became_of_the_refused() -> None:
    tally = Tally(read=6, accepted=3, refused=Counter(unroutable=2), kept=Counter(trimmed=1), duplicates=1, total=6)
    outcome = Outcome(
        "kafka topic t.dlq (group g)", False, tally, existing=Existing(3, 1, 2, 1), notes=["written back"]
    )
    text = "\n".join(summary(outcome))
    for part in (
        "letters read: 6",
        "accepted: 3",
        "still refused: 2 (unroutable: 2)",
        "not replayable, kept: 1 (trimmed: 1)",
        "duplicates: 1",
        "runs: 2 new, 1 existed already; 1 event(s) started nothing new",
        "written back",
    ):
        assert part in text, (part, text)
    dry = "\n".join(summary(Outcome("amqp queue d", True, Tally(read=1, accepted=1))))
    assert "dry run" in dry and "would be accepted: 1" in dry


# --- what a replay refuses to do ----------------------------------------------------------------


async def test_a_replay_of_runs_says_its_number_before_it_sends_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    """The number was printed only in the summary: a replay killed half-way printed none, and run
    again (with a new number, the default) it started every target of what it had sent twice."""
    events = [EventSignal("e", "order.created", {}, "s")]

    async def collect(*args: Any, **kwargs: Any) -> replay_runs.Collected:
        return replay_runs.Collected(events, runs=1)

    async def killed(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(replay_runs, "collect", collect)
    monkeypatch.setattr(replay_runs, "_send", killed)
    snapshot = Snapshot.compile(config("unit", "127.0.0.1:1", [runner("w", "order.created")]))
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        await replay_runs.replay_runs(
            snapshot, query="q", number=1717, confirm=None, client=cast(Any, object()), out=out
        )
    assert "--replay-number 1717" in out.getvalue()


def _two_sources() -> Snapshot:
    kafka = [
        {"bootstrap_servers": "127.0.0.1:1", "topics": ["orders"], "dead_letter_topic": "orders.dlq"},
        {"bootstrap_servers": "127.0.0.1:1", "topics": ["payments"], "dead_letter_topic": "payments.dlq"},
    ]
    amqp = [{"url": "amqp://x/", "queue": "orders-q", "dead_letter_exchange": "dlx"}]
    return Snapshot.compile(config("unit", "127.0.0.1:1", [runner("w", "order.created")], kafka=kafka, amqp=amqp))


async def test_a_replay_of_a_source_topic_or_queue_is_refused() -> None:
    """Records of a source topic are no letters: the replay wrote each back to the end of the topic,
    where the adapter read it again at a new offset, and one without an id of its own started again."""
    with pytest.raises(BridgeError, match="not a dead-letter topic"):
        await replay_kafka(_two_sources(), topic="orders", dry_run=True)
    with pytest.raises(BridgeError, match="not a dead-letter queue"):
        await replay_amqp(_two_sources(), queue="orders-q", dry_run=True)


def test_a_letter_in_one_entrys_dead_letter_topic_cannot_take_another_entrys_source() -> None:
    """A letter is believed on its word: one in orders.dlq naming the payments topic was replayed
    as kafka:payments, with whatever id it carried. Letters of a topic no entry dead-letters to (a
    topic the dead letters were moved to) still go to the entry that reads their topic."""
    snapshot = _two_sources()
    entries = snapshot.config.kafka
    pipeline = Pipeline(snapshot.routes, FakeSink())

    def replay(topic: str) -> kafka_replay.KafkaReplay:
        return kafka_replay.KafkaReplay(
            entries, pipeline, topic=topic, group_id="g", bootstrap_servers="127.0.0.1:1", security=entries[0].security
        )

    assert (replay("orders.dlq").entry_for("orders"), replay("orders.dlq").entry_for("payments")) == (0, None)
    assert (replay("moved.dlq").entry_for("orders"), replay("moved.dlq").entry_for("payments")) == (0, 1)


@pytest.mark.parametrize(
    "args",
    [
        ["kafka", "--topic", "t.dlq", "--batch", "0"],
        ["amqp", "--queue", "q.dead", "--batch", "-1"],
        ["amqp", "--queue", "q.dead", "--give-up-after", "0"],
        ["runs", "--query", "x", "--replay-number", "-3"],
        ["runs", "--query", "x", "--give-up-after", "nan"],
    ],
)
def test_replay_arguments_out_of_range_are_refused_with_a_clear_error(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A batch of 0 read nothing and reported success; --give-up-after 0 gave up at the first refusal."""
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["replay", *args])
    assert "must be" in capsys.readouterr().err


async def test_a_replay_that_stops_short_of_the_end_says_so() -> None:
    """A Kafka replay that read nothing for a while short of the end offsets stopped there and
    reported success (exit status 0), letters left unread."""

    class Short:
        tally = Tally()
        stopped = "nothing read for 30s short of the end offsets (partition, end) [(0, 9)]"

        async def run(self) -> Tally:
            return self.tally

    outcome = Outcome("kafka topic t.dlq", True, Tally())
    bar = ProgressBar("replay", enabled=False)
    done = await replay_module._replay(
        _two_sources(), outcome, lambda _: Short(), replay_module.KAFKA_WORDS, where="t.dlq", client=None, bar=bar
    )
    assert not done.ok and "short of the end offsets" in (done.stopped or "")


async def test_letters_written_back_end_an_outage_so_a_later_refusal_waits_its_full_time() -> None:
    """A copy-back that failed once started the outage clock, and nothing but a settle stopped it:
    a Temporal refusal long after made the replay give up at once."""

    class Producer:
        async def send(self, topic: str, **kw: Any) -> asyncio.Future[Any]:
            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

    snapshot = _two_sources()
    entries = snapshot.config.kafka
    replay = kafka_replay.KafkaReplay(
        entries,
        Pipeline(snapshot.routes, FakeSink()),
        topic="orders.dlq",
        group_id="g",
        bootstrap_servers="127.0.0.1:1",
        security=entries[0].security,
    )
    replay.producer = Producer()  # type: ignore[assignment]
    replay._outage_since = 0.0  # a copy-back refused long ago
    await replay._copy([record(b"{}")])
    assert replay._outage_since is None


async def test_an_event_whose_first_run_cannot_be_read_is_read_from_another_of_its_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Runs whose memo names an event already seen are not read; when the one run read for it could
    not be (its history gone, say), the event was counted unreadable and never sent, though another
    run listed held it."""

    @dataclass
    class Execution:
        id: str
        run_id: str | None = None

        async def memo(self) -> dict[str, Any]:
            return {"event_source": "http:ci", "event_id": "e-1"}

    class Listing:
        async def list_workflows(self, query: str) -> Any:
            for wid in ("gone", "ship-run", "audit-run"):
                yield Execution(wid)

    read: list[str] = []

    async def first_argument(client: Any, workflow_id: str, run_id: str | None) -> Any:
        read.append(workflow_id)
        if workflow_id == "gone":
            raise RPCError("workflow not found", RPCStatusCode.NOT_FOUND, b"")
        return target_input("e-1")

    monkeypatch.setattr(replay_runs, "first_argument", first_argument)
    found = await replay_runs.collect(Listing(), "q")  # type: ignore[arg-type]
    assert [e.id for e in found.events] == ["e-1"] and read == ["gone", "ship-run"]
    assert (found.runs, found.duplicates, found.unreadable) == (3, 1, 0)


async def test_runs_of_other_projects_are_not_replayed_and_a_continued_run_is_read_past(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A query lists runs of every project in the namespace (and runs an application started with
    an argument of the same shape): only those started for this project's events are replayed, by
    their project attribute, else by their id (the digest has the project in it; a project
    ``shop-2`` has dispatcher ids a sharded ``shop`` could have too). A run that continued-as-new
    keeps its memo but not its first argument, and is listed first: the event is read from another
    run of it, not counted a duplicate and lost."""

    @dataclass
    class Execution:
        id: str
        memo_of: dict[str, Any]
        project: str | None = None
        run_id: str | None = None

        async def memo(self) -> dict[str, Any]:
            return self.memo_of

        @property
        def typed_search_attributes(self) -> TypedSearchAttributes:
            if self.project is None:
                return TypedSearchAttributes.empty
            return TypedSearchAttributes([SearchAttributePair(search.PROJECT, self.project)])

    def memo(event_id: str) -> dict[str, Any]:
        return {"event_source": "http:ci", "event_id": event_id, "workflow_entry": "ship"}

    def run_of(project: str, event_id: str) -> str:
        return target_workflow_id("ship", run_digest(project, "http:ci", event_id))

    class Listing:
        async def list_workflows(self, query: str) -> Any:
            yield Execution("continued", memo("e-1"), project="shop")
            yield Execution(run_of("shop", "e-1"), memo("e-1"))
            yield Execution(run_of("shop", "e-2"), memo("e-2"))  # no attribute: told by its id
            yield Execution(run_of("shop-2", "e-3"), memo("e-3"))
            yield Execution("anything", memo("e-4"), project="shop-2")
            yield Execution("by-an-app", {"event_source": "http:ci", "event_id": "e-5"})

    arguments = {run_of("shop", "e-1"): "e-1", run_of("shop", "e-2"): "e-2"}

    async def first_argument(client: Any, workflow_id: str, run_id: str | None) -> Any:
        if workflow_id == "continued":
            return {"carried": "state"}
        return target_input(arguments.get(workflow_id, "x"))

    monkeypatch.setattr(replay_runs, "first_argument", first_argument)
    found = await replay_runs.collect(Listing(), "q", project="shop")  # type: ignore[arg-type]
    assert [e.id for e in found.events] == ["e-1", "e-2"]
    assert (found.runs, found.elsewhere, found.duplicates, found.not_target) == (6, 3, 0, 0)


async def test_a_letter_for_a_range_the_client_could_not_read_is_no_copy_of_one_for_its_first_offset() -> None:
    """After a redelivery the adapter may write a letter for the first unreadable offset alone (the
    fetch of its batch gave no answer), then one for the whole range. Taken for copies of each
    other, the range's letter was skipped, and the topic no longer said its other offsets were."""
    replay, _, producer, _ = kafka_setup()
    why = "UnicodeDecodeError: bad header"
    unreadable = kafka_parse.Unreadable
    alone, whole = unreadable.at("orders", 2, 40, why), unreadable.at("orders", 2, 40, why, last=90)
    letters = [as_letter(kafka_parse.dead_letter(r, refusal(r), None), offset=i) for i, r in enumerate([alone, whole])]
    await replay._settle(letters)
    assert replay.tally.duplicates == 0
    assert [dict(sent[3]).get("x-original-last-offset") for sent in producer.sent] == [None, b"90"]


def refusal(record: Any) -> EventRejected:
    try:
        kafka_parse.to_message(record)
    except EventRejected as exc:
        return exc
    raise AssertionError("an unreadable record is refused")


async def test_a_letter_whose_headers_were_cut_is_no_copy_of_the_records_whole_letter() -> None:
    """Copies were told by the record, its key and its value: a later letter of the record whose
    headers had to be cut (kept as trimmed), read first, made the record's whole letter a copy,
    committed and never replayed. Anyone who may write to the topic could do that on purpose.
    Read after the whole one, or after one cut alike, it is a copy still."""
    replay, sink, producer, _ = kafka_setup()
    genuine = record(body(name="order.created", payload={"n": 1}), offset=7, headers=[("tenant", b"acme")])
    whole = as_letter(kafka_parse.dead_letter(genuine, unroutable(), None), offset=5)
    cut_headers = [(k, v) for k, v in whole.headers if k != "tenant"] + [(H_TRIMMED, b"headers")]
    cut = record(whole.value, key=whole.key, headers=cut_headers, topic="orders.dlq", partition=1, offset=3)
    await replay._settle([cut, whole, cut])
    assert [e.id for e in sink.held] == ["kafka:orders:2:7"]
    assert dict(replay.tally.kept) == {"trimmed": 1} and replay.tally.duplicates == 1
    assert len(producer.sent) == 1, "the cut letter written back once"

    replay, sink, producer, _ = kafka_setup()
    await replay._settle([whole, cut])
    assert [e.id for e in sink.held] == ["kafka:orders:2:7"]
    assert (dict(replay.tally.kept), replay.tally.duplicates, producer.sent) == ({}, 1, [])
