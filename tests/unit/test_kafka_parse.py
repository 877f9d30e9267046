"""The Kafka adapter without a broker: records → events, dead-letter headers, client options, and
the commit/pause rules of one batch (a fake consumer stands in for aiokafka's)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError, MessageSizeTooLargeError
from aiokafka.structs import ConsumerRecord

from adapters import kafka, kafka_parse
from bridge.config import EventFormat, KafkaConsumer, parse_config
from bridge.deadletter import MAX_HEADER_VALUE, MAX_HEADERS
from bridge.errors import ConfigError, EventRejected
from bridge.event import MAX_SIGNAL_BYTES, EventSignal
from bridge.pipeline import Pipeline
from bridge.routing import RouteTable
from bridge.settle import Abandoned, Backoff
from tests.fakes import FakeSink
from tests.helpers import assert_eventually

TS = 1_714_557_600_000  # 2024-05-01T10:00:00Z


def record(
    value: bytes | None,
    *,
    key: bytes | None = None,
    headers: Sequence[tuple[str, bytes]] = (),
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
        headers=list(headers),
    )


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def fmt(**fields: Any) -> EventFormat:
    return EventFormat(**fields)


CE_HEADERS = [
    ("ce_specversion", b"1.0"),
    ("ce_id", b"evt-1"),
    ("ce_source", b"/shop/orders"),
    ("ce_type", b"com.example.order.created"),
    ("ce_time", b"2024-05-01T09:00:00Z"),
    ("ce_tenant", b"acme"),
    ("content-type", b"application/json"),
]


# --- envelope ----------------------------------------------------------------------------------


def test_envelope_without_id_gets_topic_partition_offset_and_record_time():
    event = kafka.parse(record(body(name="order.created", payload={"orderId": "1"}), key=b"cust-7"), fmt())
    assert (event.id, event.name, event.payload) == ("kafka:orders:2:41", "order.created", {"orderId": "1"})
    assert event.source == "kafka:orders"
    assert event.key == "cust-7"
    assert event.time == "2024-05-01T10:00:00+00:00"
    assert event.metadata["kafka"] == {"topic": "orders", "partition": 2, "offset": 41, "timestamp": TS}


def test_redelivery_of_the_same_record_is_the_same_event():
    rec = record(body(name="order.created", payload={}))
    first, again = kafka.parse(rec, fmt()), kafka.parse(rec, fmt())
    assert (first.source, first.id) == (again.source, again.id) and first.to_dict() == again.to_dict()


def test_envelope_id_wins_over_the_offset_and_id_from_over_nothing():
    assert kafka.parse(record(body(name="a", id="order-9")), fmt()).id == "order-9"
    rec = record(body(name="a", payload={"order": {"id": 77}}))
    assert kafka.parse(rec, fmt(id_from="field:payload.order.id")).id == "77"


def test_a_value_no_signal_could_carry_is_too_large_before_it_is_parsed():
    """Parsed, a megabyte of ``[{},{},…]`` takes about 25 MB: 500 such records in one batch took
    the process's memory. AMQP refused such a body already; Kafka parsed it."""
    huge = record(b"[" * (MAX_SIGNAL_BYTES + 1))  # parsed, it would be malformed
    with pytest.raises(EventRejected) as exc:
        kafka.parse(huge, fmt())
    assert exc.value.reason == "too_large" and str(MAX_SIGNAL_BYTES) in exc.value.message
    assert kafka.parse(record(body(name="a", payload={"pad": "x" * 1000})), fmt()).name == "a"


@pytest.mark.parametrize(
    "value, id_from",
    [
        (body(name="a", id="kafka:orders:2:42"), None),
        (body(name="a", payload={"ref": "kafka:orders:0:7"}), "field:payload.ref"),
    ],
    ids=["envelope-id", "id_from"],
)
def test_an_id_of_the_form_the_bridge_gives_records_by_offset_is_malformed(value: bytes, id_from: str | None):
    """A producer that wrote ``"id": "kafka:orders:2:42"`` took the id of the record to come at
    that offset: another producer's record there without an id was skipped as a repeat, and lost."""
    with pytest.raises(EventRejected) as exc:
        kafka.parse(record(value), fmt(id_from=id_from))
    assert exc.value.reason == "malformed" and "kafka:orders:" in exc.value.message
    assert kafka.parse(record(body(name="a", id="kafka:other:2:42")), fmt()).id == "kafka:other:2:42"
    assert kafka.parse(record(body(name="a")), fmt()).id == "kafka:orders:2:41"  # its own, by its offset


def test_trace_headers_become_metadata_and_other_headers_stay_out():
    rec = record(
        body(name="a"),
        headers=[
            ("traceparent", b"00-abc-def-01"),
            ("X-Correlation-Id", b"corr-1"),
            ("secret-token", b"hunter2"),
        ],
    )
    meta = kafka.parse(rec, fmt()).metadata
    assert meta["traceparent"] == "00-abc-def-01"
    assert meta["correlation_id"] == "corr-1"
    assert "secret-token" not in json.dumps(meta)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{not json", "malformed"),
        (None, "malformed"),  # a tombstone
        (b"\xff\xfe", "malformed"),
        (b"[1, 2]", "malformed"),
        (body(name="a", payload=[1]), "malformed"),
        (body(payload={"x": 1}), "no_name"),
        (body(name="", payload={}), "no_name"),
    ],
)
def test_undecodable_envelopes_are_rejected_with_a_reason(value: bytes | None, reason: str):
    with pytest.raises(EventRejected) as exc:
        kafka.parse(record(value), fmt())
    assert exc.value.reason == reason


def test_envelope_without_name_may_take_it_from_config():
    assert kafka.parse(record(body(payload={})), fmt(name="fallback.name")).name == "fallback.name"


# --- raw ---------------------------------------------------------------------------------------


def test_raw_body_is_the_payload_and_name_comes_from_the_key():
    event = kafka.parse(record(body(orderId="1"), key=b"order.refunded"), fmt(format="raw", name_from="key"))
    assert (event.name, event.payload, event.key) == ("order.refunded", {"orderId": "1"}, "order.refunded")


def test_raw_name_from_header_field_or_static():
    rec = record(body(kind={"name": "from.field"}), headers=[("ce_type", b"from.header")])
    assert kafka.parse(rec, fmt(format="raw", name_from="header:ce_type")).name == "from.header"
    assert kafka.parse(rec, fmt(format="raw", name_from="field:kind.name")).name == "from.field"
    assert kafka.parse(rec, fmt(format="raw", name="static.name")).name == "static.name"


def test_raw_without_a_name_is_no_name():
    with pytest.raises(EventRejected) as exc:
        kafka.parse(record(body(x=1)), fmt(format="raw", name_from="header:missing"))
    assert exc.value.reason == "no_name"


def test_non_utf8_header_and_key_do_not_break_parsing():
    rec = record(body(x=1), key=b"\xff\x00k", headers=[("traceparent", b"\xff\xfe")])
    event = kafka.parse(rec, fmt(format="raw", name="a"))
    json.dumps(event.to_dict())
    assert event.key is not None


# --- CloudEvents -------------------------------------------------------------------------------


def test_binary_cloudevent_takes_its_attributes_from_ce_headers():
    rec = record(body(orderId="1"), key=b"k", headers=CE_HEADERS)
    event = kafka.parse(rec, fmt(format="cloudevents"))
    assert (event.id, event.source, event.name) == ("/shop/orders#evt-1", "kafka:orders", "com.example.order.created")
    assert event.payload == {"orderId": "1"}
    assert event.time == "2024-05-01T09:00:00Z"
    ce = event.metadata["cloudevents"]
    assert ce["tenant"] == "acme" and ce["datacontenttype"] == "application/json"
    assert event.key == "k"


def test_binary_cloudevent_ids_ignore_the_offset():
    a = kafka.parse(record(body(), headers=CE_HEADERS, offset=1), fmt(format="cloudevents"))
    b = kafka.parse(record(body(), headers=CE_HEADERS, offset=999, partition=0), fmt(format="cloudevents"))
    assert (a.source, a.id) == (b.source, b.id)


def test_structured_cloudevent_is_recognised_by_content_type_in_any_format():
    value = body(specversion="1.0", id="evt-2", source="/s", type="order.shipped", data={"orderId": "2"})
    rec = record(value, headers=[("Content-Type", b"application/cloudevents+json; charset=utf-8")])
    for f in ("cloudevents", "envelope", "raw"):
        event = kafka.parse(rec, fmt(format=f))
        assert (event.id, event.source, event.name, event.payload) == (
            "/s#evt-2",
            "kafka:orders",
            "order.shipped",
            {"orderId": "2"},
        )


def test_cloudevents_format_without_ce_headers_reads_a_structured_body():
    value = body(specversion="1.0", id="e", source="/s", type="t", data={"a": 1})
    assert kafka.parse(record(value), fmt(format="cloudevents")).name == "t"


@pytest.mark.parametrize(
    ("value", "headers"),
    [
        (body(orderId="1"), [h for h in CE_HEADERS if h[0] != "ce_source"]),
        (body(orderId="1"), []),
        (b"not json", CE_HEADERS),
    ],
)
def test_incomplete_or_undecodable_cloudevents_are_malformed(value: bytes, headers: list[tuple[str, bytes]]):
    with pytest.raises(EventRejected) as exc:
        kafka.parse(record(value, headers=headers), fmt(format="cloudevents"))
    assert exc.value.reason == "malformed"


# --- dead letters, options, config --------------------------------------------------------------


def test_dead_letter_headers_keep_the_originals_and_say_why_and_where_from():
    rec = record(
        b"{bad",
        headers=[("x-trace", b"t-1"), ("x-dead-letter-reason", b"stale"), ("x-original-offset", b"0")],
    )
    headers = kafka.dead_letter_headers(rec, EventRejected("malformed", "body is not JSON"))
    as_dict = {k: v.decode() for k, v in headers}
    assert as_dict == {
        "x-trace": "t-1",
        "x-dead-letter-reason": "malformed",
        "x-dead-letter-error": "body is not JSON",
        "x-original-topic": "orders",
        "x-original-partition": "2",
        "x-original-offset": "41",
        "x-original-timestamp": str(TS),
    }
    assert len(headers) == len(as_dict)
    event = EventSignal(id="e-1", name="order.created", payload={}, source="kafka:orders")
    named = dict(kafka.dead_letter_headers(rec, EventRejected("unroutable", "no"), event))
    assert (named["x-event-id"], named["x-event-name"]) == (b"e-1", b"order.created")


def test_client_options_for_plaintext_and_sasl_ssl(tmp_path):
    plain = KafkaConsumer(bootstrap_servers="k:9092", topics=["t"])
    assert kafka.client_options(plain.security) == {"security_protocol": "PLAINTEXT"}
    scram = KafkaConsumer.model_validate(
        {
            "bootstrap_servers": "k:9093",
            "topics": ["t"],
            "security": {
                "protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "username": "bridge",
                "password": "s3cret",
            },
        }
    )
    opts = kafka.client_options(scram.security)
    assert opts["security_protocol"] == "SASL_SSL"
    assert (opts["sasl_mechanism"], opts["sasl_plain_username"], opts["sasl_plain_password"]) == (
        "SCRAM-SHA-512",
        "bridge",
        "s3cret",
    )
    assert opts["ssl_context"] is not None


def kafka_config(**entry: Any) -> Any:
    return parse_config(
        {
            "project": "My Shop",
            "kafka": [{"bootstrap_servers": "k:9092", "topics": ["orders"], **entry}],
            "workflows": [
                {
                    "id": "w",
                    "workflow_type": "T",
                    "triggers": [{"name": "order.created", "schema": {"type": "object", "required": ["orderId"]}}],
                }
            ],
        },
        origin="test.yaml",
    )


def test_defaults_group_per_project_earliest_and_no_auto_commit_settings():
    cfg = kafka_config()
    entry = cfg.kafka[0]
    assert entry.auto_offset_reset == "earliest"
    assert kafka.default_group_id(cfg) == "signal-bridge-my-shop"
    adapter = kafka.build(entry, Pipeline(RouteTable.from_config(cfg), FakeSink()), cfg)
    assert isinstance(adapter, kafka.KafkaAdapter)
    assert adapter.group_id == "signal-bridge-my-shop" and adapter.name == "kafka:orders"


@pytest.mark.parametrize(
    "security",
    [
        {"protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "username": "u"},
        {"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "GSSAPI-ish", "username": "u", "password": "p"},
        {"protocol": "SASL_SSL", "user": "u"},
    ],
)
def test_incomplete_security_is_a_config_error(security: dict[str, Any]):
    with pytest.raises(ConfigError, match="security"):
        kafka_config(security=security)


# --- one batch through the adapter, with a fake consumer ----------------------------------------


class FakeConsumer:
    def __init__(self, partitions: set[TopicPartition]) -> None:
        self._assigned = set(partitions)
        self._paused: set[TopicPartition] = set()
        self.commits: list[dict[TopicPartition, int]] = []
        self.polls_while_paused = 0
        self.batches: list[dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]] = []
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.positions: dict[TopicPartition, int] = {}  # a partition missing here has no position yet
        self.committed_offsets: dict[TopicPartition, int] = {}
        self.resets: list[tuple[TopicPartition, str]] = []  # seek_to_beginning / seek_to_end

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    async def position(self, tp: TopicPartition) -> int:
        """Like aiokafka's, waits while the partition's position is not set (here: until cancelled)."""
        if tp not in self._assigned:
            raise IllegalStateError(f"{tp} is not assigned")
        if tp not in self.positions:
            await asyncio.get_running_loop().create_future()
        return self.positions[tp]

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.committed_offsets.get(tp)

    async def seek_to_committed(self, *tps: TopicPartition) -> dict[TopicPartition, int | None]:
        """aiokafka's rule: a partition whose commit is 0 or none keeps its position."""
        found = {tp: self.committed_offsets.get(tp) for tp in tps or self._assigned}
        for tp, offset in found.items():
            if offset:
                self.seek(tp, offset)
        return found

    async def seek_to_beginning(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self.resets.append((tp, "earliest"))
            self.positions[tp] = 0

    async def seek_to_end(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self.resets.append((tp, "latest"))
            self.positions[tp] = self.end_offset(tp)

    def end_offset(self, tp: TopicPartition) -> int:
        return 0

    def last_stable_offset(self, tp: TopicPartition) -> int:
        """As aiokafka's: what the last fetch said (here: the end of the log)."""
        return self.end_offset(tp)

    def highwater(self, tp: TopicPartition) -> int:
        return self.end_offset(tp)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def pause(self, *tps: TopicPartition) -> None:
        self._paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self._paused.difference_update(tps)

    async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> dict:
        if self._paused == self._assigned:
            self.polls_while_paused += 1
        elif self.batches:
            polled = self.batches.pop(0)
            self.positions.update({tp: recs[-1].offset + 1 for tp, recs in polled.items() if recs})
            return polled
        await asyncio.sleep(0.001)
        return {}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        if tp not in self._assigned:
            raise IllegalStateError(f"{tp} is not assigned")
        self.seeks.append((tp, offset))
        self.positions[tp] = offset

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        assert not self._paused, "committed while paused"
        self.commits.append(dict(offsets))
        self.committed_offsets.update(offsets)


TP0, TP1 = TopicPartition("orders", 0), TopicPartition("orders", 1)


def adapter_with(sink: FakeSink, **entry: Any) -> tuple[kafka.KafkaAdapter, FakeConsumer]:
    cfg = kafka_config(**entry)
    adapter = kafka.build(cfg.kafka[0], Pipeline(RouteTable.from_config(cfg), sink), cfg)
    adapter.consumer = FakeConsumer({TP0, TP1})  # type: ignore[assignment]
    adapter.settler.backoff = Backoff(initial=0.01, cap=0.02)
    return adapter, adapter.consumer  # type: ignore[return-value]


def batch(*per_partition: list[bytes | None]) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
    out = {}
    for p, values in enumerate(per_partition):
        tp = TopicPartition("orders", p)
        out[tp] = [record(v, partition=p, offset=10 + i) for i, v in enumerate(values)]
    return out


def good(n: int) -> bytes:
    return body(name="order.created", payload={"orderId": str(n)})


async def test_a_batch_is_submitted_in_one_call_then_committed_per_partition():
    sink = FakeSink()
    adapter, consumer = adapter_with(sink)
    calls = []
    submit = adapter.pipeline.submit

    async def spy(events: Sequence[EventSignal], d: str, **_: Any) -> Any:
        calls.append(len(events))
        return await submit(events, d)

    adapter.pipeline.submit = spy  # type: ignore[method-assign]
    await adapter._handle(batch([good(1), good(2)], [good(3)]), adapter._generation)
    assert calls == [3]
    assert [e.payload["orderId"] for e in sink.held] == ["1", "2", "3"]
    assert consumer.commits == [{TP0: 12, TP1: 11}]


async def test_temporal_down_pauses_polls_and_commits_only_after_it_holds_the_events():
    sink = FakeSink(outages=3)
    adapter, consumer = adapter_with(sink)
    await adapter._handle(batch([good(1)], [good(2)]), adapter._generation)
    assert consumer.polls_while_paused >= 3
    assert len(sink.held) == 2 and not consumer.paused() and not adapter.paused
    assert consumer.commits == [{TP0: 11, TP1: 11}]
    text = adapter.pipeline.metrics.render().decode()
    assert 'signal_bridge_temporal_unavailable_total{adapter="kafka"} 3.0' in text


async def test_a_rebalance_during_an_outage_abandons_the_batch_uncommitted():
    sink = FakeSink(outages=10**6)
    adapter, consumer = adapter_with(sink)
    gen = adapter._generation
    adapter._generation += 1  # as on_partitions_revoked does
    with pytest.raises(Abandoned):
        await adapter._handle(batch([good(1)]), gen)
    assert consumer.commits == [] and sink.held == []


async def test_poison_without_dead_letter_topic_is_counted_skipped_and_committed(caplog):
    sink = FakeSink()
    adapter, consumer = adapter_with(sink)
    values = [
        good(1),
        b"{bad",
        body(payload={}),
        body(name="order.created", payload={"x": 1}),
        body(name="nobody.cares", payload={}),
        good(2),
    ]
    await adapter._handle(batch(values), adapter._generation)
    assert [e.payload["orderId"] for e in sink.held] == ["1", "2"]
    assert consumer.commits == [{TP0: 16}]
    text = adapter.pipeline.metrics.render().decode()
    for reason in ("malformed", "no_name", "schema_invalid", "unroutable"):
        assert f'signal_bridge_events_dropped_total{{adapter="kafka",reason="{reason}"}} 1.0' in text
    skipped = [r.getMessage() for r in caplog.records if "kafka message dropped" in r.getMessage()]
    assert len(skipped) == 4 and any("from=kafka:orders:0:14 reason=unroutable" in m for m in skipped)


async def test_a_batch_too_large_for_one_signal_is_halved_and_an_oversized_event_is_poison():
    sink = FakeSink(max_events=2)
    adapter, consumer = adapter_with(sink)
    await adapter._handle(batch([good(i) for i in range(5)]), adapter._generation)
    assert sorted(e.payload["orderId"] for e in sink.held) == ["0", "1", "2", "3", "4"]
    assert consumer.commits == [{TP0: 15}]

    sink = FakeSink(max_events=0)
    adapter, consumer = adapter_with(sink)
    await adapter._handle(batch([good(1)]), adapter._generation)
    text = adapter.pipeline.metrics.render().decode()
    assert 'signal_bridge_events_dropped_total{adapter="kafka",reason="too_large"} 1.0' in text
    assert consumer.commits == [{TP0: 11}]


async def test_an_unexpected_failure_reads_the_batch_again_instead_of_skipping_it():
    sink = FakeSink(bugs=1)
    adapter, consumer = adapter_with(sink)
    first = batch([good(1), good(2)], [good(3)])
    consumer.batches = [first]
    adapter._task = asyncio.create_task(adapter._run())
    try:
        await assert_eventually(lambda: consumer.seeks, timeout=5, interval=0.005)
        assert sorted(consumer.seeks) == [(TP0, 10), (TP1, 10)]
        assert consumer.commits == [] and not adapter.healthy()
        consumer.batches = [first]  # what the seek makes the next fetch return
        await assert_eventually(lambda: consumer.commits, timeout=5, interval=0.005)
        assert consumer.commits == [{TP0: 12, TP1: 11}] and adapter.healthy()
    finally:
        adapter._stopping.set()
        await adapter._task


class FakeProducer:
    """Fails the first ``failures`` sends with a transient KafkaError, then keeps every letter."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.sent: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []

    async def send(self, topic: str, *, value: bytes | None, key: bytes | None, headers: Any) -> asyncio.Future[None]:
        if self.failures:
            self.failures -= 1
            raise KafkaError("broker away")
        self.sent.append((topic, value, key, list(headers)))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def test_dead_letters_are_produced_with_headers_retried_while_paused_then_committed():
    adapter, consumer = adapter_with(FakeSink(), dead_letter_topic="orders.dlq")
    producer = adapter.producer = FakeProducer(failures=2)  # type: ignore[assignment]
    await adapter._handle(batch([good(1), b"{bad", body(name="nobody.cares", payload={})]), adapter._generation)
    assert consumer.polls_while_paused >= 2 and not consumer.paused()
    assert consumer.commits == [{TP0: 13}]
    assert [(topic, value) for topic, value, _, _ in producer.sent] == [
        ("orders.dlq", b"{bad"),
        ("orders.dlq", body(name="nobody.cares", payload={})),
    ]
    headers = [{k: v.decode() for k, v in h} for _, _, _, h in producer.sent]
    assert [(h["x-dead-letter-reason"], h["x-original-offset"]) for h in headers] == [
        ("malformed", "11"),
        ("unroutable", "12"),
    ]
    assert headers[1]["x-event-name"] == "nobody.cares" and headers[1]["x-original-topic"] == "orders"


async def test_a_bug_during_an_outage_leaves_the_partitions_resumed_and_reads_the_batch_again():
    sink = FakeSink(outages=1)
    adapter, consumer = adapter_with(sink)
    first = batch([good(1)])
    consumer.batches = [first]

    real_wait = adapter.wait

    async def wait_then_break(seconds: float) -> bool:
        sink.bugs = 1  # Temporal answers again, with an error nobody expected
        return await real_wait(seconds)

    adapter.wait = wait_then_break  # type: ignore[method-assign]
    adapter._task = asyncio.create_task(adapter._run())
    try:
        await assert_eventually(lambda: consumer.seeks, timeout=5, interval=0.005)
        assert consumer.seeks == [(TP0, 10)] and not consumer.paused() and consumer.commits == []
        consumer.batches = [first]
        await assert_eventually(lambda: consumer.commits, timeout=5, interval=0.005)
        assert consumer.commits == [{TP0: 11}] and adapter.healthy() and not adapter.paused
    finally:
        adapter._stopping.set()
        await adapter._task


# --- reading ahead while a batch is settled ----------------------------------------------------


def polled(tp: TopicPartition, start: int, n: int) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
    """What one poll returns: ``n`` records of ``tp`` from offset ``start``."""
    return {tp: [record(good(start + i), partition=tp.partition, offset=start + i) for i in range(n)]}


def offsets_held(sink: FakeSink) -> list[str]:
    return [e.payload["orderId"] for e in sink.held]


@contextlib.asynccontextmanager
async def signalling(
    first: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]], sink: FakeSink, **entry: Any
) -> AsyncIterator[tuple[kafka.KafkaAdapter, FakeConsumer]]:
    """The adapter running, with ``first``'s signal in flight until ``sink.release`` is set."""
    sink.release = asyncio.Event()
    adapter, consumer = adapter_with(sink, **entry)
    consumer.batches = [first]
    adapter._task = asyncio.create_task(adapter._run())
    try:
        await asyncio.wait_for(sink.entered.wait(), 5)
        yield adapter, consumer
    finally:
        adapter._stopping.set()
        adapter._arrived.set()
        sink.release.set()
        await adapter._task


async def test_the_next_polls_are_read_while_a_batch_is_signalled_and_go_in_one_signal_committed_in_order():
    sink = FakeSink()
    async with signalling(polled(TP0, 10, 2), sink) as (adapter, consumer):
        consumer.batches = [polled(TP0, 12, 1), polled(TP1, 5, 1)]
        await assert_eventually(lambda: not consumer.batches and adapter._ahead_records == 2, timeout=5)
        assert consumer.commits == [], "nothing read ahead is committed before it is settled"
        assert sink.release is not None
        sink.release.set()
        await assert_eventually(lambda: len(consumer.commits) == 2, timeout=5)
        assert consumer.commits == [{TP0: 12}, {TP0: 13, TP1: 6}]
        assert [len(call) for call in sink.calls] == [2, 2]
        assert offsets_held(sink) == ["10", "11", "12", "5"]


async def test_the_reader_stops_max_batch_records_ahead():
    sink = FakeSink()
    async with signalling(polled(TP0, 0, 1), sink, max_batch=3) as (adapter, consumer):
        consumer.batches = [polled(TP0, 1, 2), polled(TP0, 3, 2), polled(TP0, 5, 2)]
        await assert_eventually(lambda: adapter._ahead_records == 4, timeout=5)
        await asyncio.sleep(0.05)
        assert adapter._ahead_records == 4 and len(consumer.batches) == 1, "no poll past max_batch ahead"
        assert sink.release is not None
        sink.release.set()
        await assert_eventually(lambda: consumer.commits and consumer.commits[-1] == {TP0: 7}, timeout=5)
        assert [len(call) for call in sink.calls] == [1, 2, 2, 2], "at most max_batch records per batch"
        assert offsets_held(sink) == [str(i) for i in range(7)]


async def test_a_failed_batch_is_read_again_from_its_start_and_what_was_read_after_it_too():
    sink = FakeSink(bugs=1)
    async with signalling(polled(TP0, 10, 2), sink) as (adapter, consumer):
        consumer.batches = [polled(TP0, 12, 1), polled(TP1, 5, 1)]
        await assert_eventually(lambda: not consumer.batches and adapter._ahead_records == 2, timeout=5)
        assert sink.release is not None
        sink.release.set()  # the first batch meets an unexpected error
        await assert_eventually(lambda: consumer.seeks, timeout=5)
        assert sorted(consumer.seeks) == [(TP0, 10), (TP1, 5)]
        assert adapter._ahead_records == 0 and consumer.commits == [] and sink.held == []
        consumer.batches = [polled(TP0, 10, 3), polled(TP1, 5, 1)]  # what the seeks make the fetches return
        await assert_eventually(lambda: sorted(offsets_held(sink)) == ["10", "11", "12", "5"], timeout=5)
        committed: dict[TopicPartition, int] = {}
        for commit in consumer.commits:
            committed.update(commit)
        assert committed == {TP0: 13, TP1: 6}


async def test_what_was_read_ahead_when_partitions_are_revoked_is_dropped_uncommitted():
    sink = FakeSink()
    async with signalling(polled(TP0, 10, 1), sink) as (adapter, consumer):
        consumer.batches = [polled(TP1, 5, 1)]
        await assert_eventually(lambda: adapter._ahead_records == 1, timeout=5)
        revoking = asyncio.create_task(adapter._on_revoked({TP0, TP1}))
        await asyncio.sleep(0.01)
        assert adapter._ahead_records == 0, "dropped before the batch in hand is waited for"
        assert sink.release is not None
        sink.release.set()
        await asyncio.wait_for(revoking, 5)
        await asyncio.sleep(0.05)
        assert consumer.commits == [{TP0: 11}], "the batch in hand finished and committed; the rest is re-read"
        assert offsets_held(sink) == ["10"]


# --- bad input that must not stall a partition ------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        b"[" * 2_500 + b"]" * 2_500,
        body(name="order.created", payload={"x": float("nan")}),  # json.dumps writes NaN
        b'{"name": "order.created", "payload": {"x": ' + b"1" * 5_000 + b"}}",
        b'{"name": "order.created", "payload": {"x": "\xff\xfe"}}',
    ],
    ids=["deep", "nan", "huge-int", "invalid-utf8"],
)
@pytest.mark.parametrize("form", ["envelope", "raw", "cloudevents"])
def test_poison_values_are_malformed_in_every_format(value: bytes, form: str):
    with pytest.raises(EventRejected) as exc:
        kafka.parse(record(value), fmt(format=form, name="n"))
    assert exc.value.reason == "malformed"


@pytest.mark.parametrize("stamp", [2**62, 2**63 - 1, -(2**63), -1, 0, None])
def test_a_timestamp_out_of_any_calendar_stamps_the_event_now(stamp: int | None):
    event = kafka.parse(record(body(name="a"), timestamp=stamp), fmt())  # type: ignore[arg-type]
    assert event.time and event.time.startswith("20")


def test_two_ids_in_a_header_that_are_not_utf8_are_two_events():
    """Read with U+FFFD for each bad byte, two binary ids read alike: the second event got the
    first's id, and Temporal refused its start as a duplicate."""
    ids = {
        kafka.parse(record(body(name="a"), headers=[("x-id", raw)]), fmt(id_from="header:x-id")).id  # type: ignore[list-item]
        for raw in (b"\xff\x01", b"\xfe\x01")
    }
    assert len(ids) == 2


def test_null_and_non_utf8_header_values_and_names_are_text():
    rec = record(body(name="a"), headers=[("x-null", None), ("traceparent", b"\xff"), ("ce_x", b"")])  # type: ignore[list-item]
    msg = kafka.to_message(rec)
    assert msg.headers == {"x-null": "", "traceparent": "\\xff", "ce_x": ""}


def test_cloudevent_data_is_never_dropped_binary_non_json_is_kept_structured_base64_decoded():
    value = b"\x00\x01 not json"
    headers = [h for h in CE_HEADERS if h[0] != "content-type"] + [("content-type", b"application/octet-stream")]
    event = kafka.parse(record(value, headers=headers), fmt(format="cloudevents"))
    assert event.payload == {
        "data_base64": base64.b64encode(value).decode(),
        "datacontenttype": "application/octet-stream",
    }
    ce = {"specversion": "1.0", "id": "e", "source": "/s", "type": "t"}
    data = base64.b64encode(body(orderId="1")).decode()
    structured = [("content-type", b"application/cloudevents+json")]
    assert kafka.parse(record(body(**ce, data_base64=data), headers=structured), fmt()).payload == {"orderId": "1"}
    kept = body(**ce, data_base64=data, datacontenttype="text/csv")
    assert kafka.parse(record(kept, headers=structured), fmt()).payload == {
        "data_base64": data,
        "datacontenttype": "text/csv",
    }


# --- dead letters that always fit ----------------------------------------------------------------


def header_dict(letter: kafka_parse.Letter) -> dict[str, bytes | None]:
    return dict(letter.headers)


def test_a_600kb_unroutable_envelope_makes_a_letter_that_fits_with_capped_headers():
    """The letter once copied the event id and name into headers: 600 KB became 1.2 MB."""
    big = "x" * 300_000
    value = body(name=big, id=big, payload={})  # 600 KB
    event = EventSignal(id=big, name=big, payload={}, source="kafka:orders")
    rec = record(value, key=b"k", headers=[("traceparent", b"00-abc-def-01"), ("x-blob", b"b" * 300_000)])
    letter = kafka.dead_letter(rec, EventRejected("unroutable", "no trigger names " + big), event)
    headers = header_dict(letter)
    assert letter.size <= kafka_parse.LETTER_BYTES < kafka_parse.MAX_REQUEST_BYTES
    assert letter.value == value and letter.key == b"k"  # the value fits once the headers are capped
    assert headers["x-dead-letter-trimmed"] == b"headers" and letter.trimmed == ("headers",)
    assert headers["x-event-id"] == b"x" * MAX_HEADER_VALUE and headers["x-event-name"] == b"x" * MAX_HEADER_VALUE
    assert headers["traceparent"] == b"00-abc-def-01" and headers["x-blob"] == b"b" * MAX_HEADER_VALUE
    assert sum(len(k) + len(v or b"") for k, v in letter.headers) <= MAX_HEADERS + 100
    assert headers["x-dead-letter-reason"] == b"unroutable" and headers["x-original-offset"] == b"41"


def test_a_letter_over_the_budget_has_its_key_and_value_cut_and_says_so():
    value, key = b"v" * 1_040_000, b"k" * 20_000
    rec = record(value, key=key, headers=[(f"h{i}", b"x" * 2_000) for i in range(40)])
    letter = kafka.dead_letter(rec, EventRejected("too_large", "too large"))
    assert letter.size <= kafka_parse.LETTER_BYTES
    assert letter.trimmed == ("headers", "key", "value")
    assert header_dict(letter)["x-dead-letter-trimmed"] == b"headers,key,value"
    assert letter.key == key[:MAX_HEADER_VALUE] and value.startswith(letter.value or b"x")
    assert len(letter.value or b"") > 900_000  # as much of it as fits

    small = kafka.dead_letter(rec, EventRejected("too_large", "too large"), budget=20_000)
    assert small.size <= 20_000 and small.trimmed == ("headers", "key", "value")


def test_a_letter_that_fits_is_not_touched_and_a_keyless_tombstone_gets_an_empty_value():
    rec = record(b"{bad", key=b"k", headers=[("x-trace", b"t-1")])
    letter = kafka.dead_letter(rec, EventRejected("malformed", "body is not JSON"))
    assert (letter.key, letter.value, letter.trimmed) == (b"k", b"{bad", ())
    assert "x-dead-letter-trimmed" not in header_dict(letter)
    tombstone = kafka.dead_letter(record(None), EventRejected("malformed", "a tombstone"))
    assert (tombstone.key, tombstone.value) == (None, b"")


class SizeLimitedProducer(FakeProducer):
    """A dead-letter topic whose max.message.bytes is below the bridge's letter budget."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.refused = 0

    async def send(self, topic: str, *, value: bytes | None, key: bytes | None, headers: Any) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        size = len(value or b"") + len(key or b"") + sum(len(k) + len(v or b"") for k, v in headers)
        if size > self.limit:
            self.refused += 1
            done.set_exception(MessageSizeTooLargeError("the broker refused it"))
        else:
            self.sent.append((topic, value, key, list(headers)))
            done.set_result(None)
        return done


async def test_a_letter_the_topic_refuses_for_its_size_is_written_smaller_and_committed():
    adapter, consumer = adapter_with(FakeSink(), dead_letter_topic="orders.dlq")
    producer = adapter.producer = SizeLimitedProducer(limit=100_000)  # type: ignore[assignment]
    await adapter._handle(batch([good(1), b"{" + b"x" * 600_000]), adapter._generation)
    assert producer.refused == 2 and len(producer.sent) == 1  # 1,000,000 → 250,000 → 62,500 bytes
    [(_, value, _, headers)] = producer.sent
    assert value is not None and len(value) < 62_500 and dict(headers)["x-dead-letter-trimmed"] == b"value"
    assert consumer.commits == [{TP0: 12}] and not adapter.paused


async def test_overloaded_pauses_the_partitions_and_commits_only_once_through():
    sink = FakeSink()
    adapter, consumer = adapter_with(sink)
    adapter.pipeline.max_pending, adapter.pipeline.pending = 1, 1  # another adapter's events in flight
    real_wait = adapter.wait
    paused_during: list[bool] = []

    async def wait(seconds: float) -> bool:
        paused_during.append(consumer.paused() == consumer.assignment() and adapter.paused)
        if len(paused_during) == 3:
            adapter.pipeline.pending = 0
        return await real_wait(seconds)

    adapter.wait = wait  # type: ignore[method-assign]
    await adapter._handle(batch([good(1)], [good(2)]), adapter._generation)
    assert paused_during == [True] * 3 and consumer.polls_while_paused >= 3
    assert consumer.commits == [{TP0: 11, TP1: 11}] and len(sink.held) == 2 and not consumer.paused()
    text = adapter.pipeline.metrics.render().decode()
    assert 'signal_bridge_overloaded_total{adapter="kafka"} 3.0' in text


async def test_the_dead_letter_producer_sets_max_request_size(monkeypatch):
    made: dict[str, dict[str, Any]] = {}

    class Client:
        def __init__(self, kind: str, **kw: Any) -> None:
            made[kind] = kw

        async def start(self) -> None: ...
        async def stop(self) -> None: ...
        def subscribe(self, topics: list[str], listener: Any) -> None: ...
        async def getmany(self, *a: Any, **kw: Any) -> dict:
            await asyncio.sleep(0.01)
            return {}

    monkeypatch.setattr(kafka, "AIOKafkaConsumer", lambda **kw: Client("consumer", **kw))
    monkeypatch.setattr(kafka, "AIOKafkaProducer", lambda **kw: Client("producer", **kw))
    adapter, _ = adapter_with(FakeSink(), dead_letter_topic="orders.dlq")
    await adapter.start()
    await adapter.stop()
    assert made["producer"]["max_request_size"] == kafka_parse.MAX_REQUEST_BYTES == 1024 * 1024
    assert made["producer"]["acks"] == "all" and made["consumer"]["enable_auto_commit"] is False


async def test_a_record_the_client_cannot_read_keeps_the_loop_alive_rereading_where_the_poll_began(
    monkeypatch: pytest.MonkeyPatch,
):
    """aiokafka refuses a header name that is not UTF-8 inside getmany: nothing reaches the
    bridge. The loop must not die: it reads again from where the poll began (not past the commit)."""

    class Unreadable(FakeConsumer):
        def __init__(self, partitions: set[TopicPartition]) -> None:
            super().__init__(partitions)
            self.failures = 2

        async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> dict:
            if self.failures:
                self.failures -= 1
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
            return await super().getmany(*tps, timeout_ms=timeout_ms, max_records=max_records)

    sink = FakeSink()
    adapter, _ = adapter_with(sink)
    consumer = adapter.consumer = Unreadable({TP0, TP1})  # type: ignore[assignment]
    consumer.positions = {TP0: 10, TP1: 0}
    adapter._task = asyncio.create_task(adapter._run())
    try:
        await assert_eventually(lambda: len(consumer.seeks) == 4, timeout=5, interval=0.005)
        assert consumer.seeks == [(TP0, 10), (TP1, 0)] * 2
        assert not adapter._task.done()
        consumer.batches = [batch([good(1)])]
        await assert_eventually(lambda: consumer.commits, timeout=5, interval=0.005)
        assert consumer.commits == [{TP0: 11}] and adapter.healthy(), "two failed polls are not an outage"
    finally:
        adapter._stopping.set()
        await adapter._task


def test_the_record_key_orders_unless_key_from_says_otherwise():
    rec = record(body(name="order.created", payload={"orderId": "A1"}), key=b"cust-7", headers=[("x-entity", b"e-3")])
    assert kafka.parse(rec, fmt()).key == "cust-7"
    assert kafka.parse(rec, fmt(key_from="field:payload.orderId")).key == "A1"
    assert kafka.parse(rec, fmt(key_from="header:x-entity")).key == "e-3"
    assert kafka.parse(record(body(name="n"), key=None), fmt()).key is None
