"""The RabbitMQ door without a broker: deliveries → events, and how a batch is settled."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from aio_pika.exceptions import ChannelInvalidStateError

from adapters import amqp
from bridge.config import AmqpConsumer
from bridge.errors import EventRejected, Unavailable
from bridge.event import EventSignal, content_digest
from bridge.pipeline import Pipeline
from bridge.routing import RouteTable
from tests.helpers import assert_eventually, config, runner

QUEUE = "bridge.events"


@dataclass
class FakeChannel:
    is_closed: bool = False


@dataclass
class FakeDelivery:
    """The attributes of ``aio_pika.IncomingMessage`` the door reads, and a record of settling."""

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
    channel: FakeChannel = field(default_factory=FakeChannel)
    settled: list[str] = field(default_factory=list)

    async def ack(self) -> None:
        self.settled.append("ack")

    async def reject(self, requeue: bool = False) -> None:
        self.settled.append(f"reject(requeue={requeue})")

    async def nack(self, requeue: bool = True) -> None:
        self.settled.append(f"nack(requeue={requeue})")

    @property
    def processed(self) -> bool:
        return bool(self.settled)


def delivery(body: Any = None, raw: bytes | None = None, **kw: Any) -> FakeDelivery:
    return FakeDelivery(body=raw if raw is not None else json.dumps(body).encode(), **kw)


def entry(**event: Any) -> AmqpConsumer:
    return AmqpConsumer.model_validate(
        {"url": "amqp://guest:guest@127.0.0.1/", "queue": QUEUE, "event": event or {"format": "envelope"}}
    )


def reason(d: FakeDelivery, e: AmqpConsumer) -> str:
    with pytest.raises(EventRejected) as exc:
        amqp.parse(d, e)
    return exc.value.reason


# --- names ---------------------------------------------------------------------------------


def test_envelope_gives_name_payload_and_id() -> None:
    event = amqp.parse(delivery({"name": "order.created", "payload": {"orderId": "A1"}, "id": "e-1"}), entry())
    assert (event.name, event.payload, event.id) == ("order.created", {"orderId": "A1"}, "e-1")
    assert event.source == f"amqp:{QUEUE}"
    assert event.key == "order.created"  # the routing key orders events within a dispatcher shard


def test_raw_name_from_routing_key() -> None:
    d = delivery({"orderId": "A1"}, routing_key="order.shipped")
    event = amqp.parse(d, entry(format="raw", name_from="routing_key"))
    assert (event.name, event.payload) == ("order.shipped", {"orderId": "A1"})


def test_raw_name_from_header_any_case_and_bytes_value() -> None:
    d = delivery({"n": 1}, headers={"X-Event-Name": b"order.paid"})
    assert amqp.parse(d, entry(format="raw", name_from="header:x-event-name")).name == "order.paid"


def test_raw_name_from_field_and_static_name() -> None:
    d = delivery({"meta": {"kind": "order.refunded"}})
    assert amqp.parse(d, entry(format="raw", name_from="field:meta.kind")).name == "order.refunded"
    assert amqp.parse(d, entry(format="raw", name="fixed.name")).name == "fixed.name"


def test_poison_reasons() -> None:
    assert reason(delivery(raw=b"\xff not json"), entry()) == "malformed"
    assert reason(delivery(["a", "list"]), entry()) == "malformed"
    assert reason(delivery({"payload": {}}), entry()) == "no_name"
    assert reason(delivery({"n": 1}, headers={}), entry(format="raw", name_from="header:x-name")) == "no_name"
    assert reason(delivery([1, 2]), entry(format="raw", name="x")) == "malformed"


# --- ids -----------------------------------------------------------------------------------


def test_id_precedence_body_then_id_from_then_message_id_then_hash() -> None:
    form = entry(format="envelope", id_from="header:x-order-id")
    body = {"name": "n", "payload": {}}
    headers = {"x-order-id": "ord-7"}
    assert amqp.parse(delivery({**body, "id": "e-1"}, headers=headers, message_id="m-1"), form).id == "e-1"
    assert amqp.parse(delivery(body, headers=headers, message_id="m-1"), form).id == "ord-7"
    assert amqp.parse(delivery(body, message_id="m-1"), form).id == "m-1"
    hashed = amqp.parse(delivery(body), form).id
    assert hashed == "hash:" + content_digest("events", "order.created", json.dumps(body).encode())


def test_content_hash_is_stable_across_redelivery_and_depends_on_exchange_key_and_body() -> None:
    """Without a message_id a redelivery (same exchange, key, body) must get the same id."""
    first = amqp.parse(delivery({"name": "n"}), entry()).id
    again = amqp.parse(delivery({"name": "n"}, headers={"x-retry": 1}, correlation_id="other"), entry()).id
    assert first == again and first.startswith("hash:")
    assert amqp.parse(delivery({"name": "n"}, routing_key="other.key"), entry()).id != first
    assert amqp.parse(delivery({"name": "n"}, exchange="other"), entry()).id != first
    assert amqp.parse(delivery({"name": "n", "payload": {"a": 1}}), entry()).id != first


# --- CloudEvents (AMQP binding) ------------------------------------------------------------


def _ce_headers(prefix: str) -> dict[str, Any]:
    return {
        f"{prefix}specversion": "1.0",
        f"{prefix}id": b"ce-1",
        f"{prefix}source": "/shop/orders",
        f"{prefix}type": "order.created",
        f"{prefix}time": datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        f"{prefix}subject": "A1",
        "traceparent": "00-abc-def-01",
    }


@pytest.mark.parametrize("prefix", ["cloudEvents_", "cloudEvents:"])
def test_binary_mode_cloudevent_routes_by_type(prefix: str) -> None:
    d = delivery({"orderId": "A1"}, headers=_ce_headers(prefix), content_type="application/json", message_id="m-9")
    event = amqp.parse(d, entry(format="cloudevents"))
    assert (event.name, event.id, event.source) == ("order.created", "ce-1", "/shop/orders")
    assert event.payload == {"orderId": "A1"}
    assert event.time == "2024-05-01T12:00:00+00:00"
    ce = event.metadata["cloudevents"]
    assert ce["subject"] == "A1" and ce["datacontenttype"] == "application/json"
    assert event.metadata["traceparent"] == "00-abc-def-01"
    assert not any(k.lower().startswith("cloudevents") for k in event.metadata["headers"])


def test_structured_mode_cloudevent_by_content_type_even_with_envelope_format() -> None:
    body = {
        "specversion": "1.0",
        "id": "ce-2",
        "source": "/shop",
        "type": "order.paid",
        "time": "2024-05-02T00:00:00Z",
        "data": {"amount": 5},
    }
    d = delivery(body, content_type="application/cloudevents+json; charset=utf-8", routing_key="misc")
    event = amqp.parse(d, entry(format="envelope"))
    assert (event.name, event.id, event.source, event.payload) == ("order.paid", "ce-2", "/shop", {"amount": 5})
    assert event.time == "2024-05-02T00:00:00Z"


def test_cloudevent_missing_attributes_is_malformed() -> None:
    headers = {"cloudEvents_id": "x", "cloudEvents_type": "t"}
    assert reason(delivery({}, headers=headers), entry(format="cloudevents")) == "malformed"


# --- metadata and time ---------------------------------------------------------------------


def test_metadata_keeps_properties_and_headers_as_text() -> None:
    stamp = datetime(2024, 1, 2, 3, 4, 5)  # AMQP timestamps arrive naive and mean UTC
    d = delivery(
        {"name": "n"},
        headers={"tenant": b"acme", "attempt": 3, "ratio": Decimal("1.5"), "flag": True, "nested": {"a": [1]}},
        message_id="m-1",
        correlation_id="corr-1",
        app_id="shop",
        timestamp=stamp,
    )
    event = amqp.parse(d, entry())
    meta = event.metadata
    assert meta["headers"] == {
        "tenant": "acme",
        "attempt": "3",
        "ratio": "1.5",
        "flag": "True",
        "nested": '{"a":[1]}',
    }
    assert meta["amqp"] == {
        "queue": QUEUE,
        "exchange": "events",
        "routing_key": "order.created",
        "message_id": "m-1",
        "correlation_id": "corr-1",
        "app_id": "shop",
    }
    assert meta["correlation_id"] == "corr-1"
    assert event.time == "2024-01-02T03:04:05+00:00"
    json.dumps(meta)  # it crosses into Temporal: it must be plain JSON


def test_correlation_id_from_header_when_no_property() -> None:
    meta = amqp.parse(delivery({"name": "n"}, headers={"X-Correlation-Id": "c-2"}), entry()).metadata
    assert meta["correlation_id"] == "c-2"


def test_dead_letter_copy_keeps_the_delivery_and_says_why() -> None:
    d = delivery(
        raw=b"not json",
        headers={"tenant": "acme", "x-dead-letter-reason": "stale"},
        content_type="text/plain",
        message_id="m-1",
        correlation_id="c-1",
        priority=3,
    )
    rej = EventRejected("malformed", "body is not JSON: " + "x" * 5000)
    event = EventSignal(id="m-1", name="n", payload={}, source="amqp:q")
    copy = amqp.dead_letter_copy(d, rej, QUEUE, event)  # type: ignore[arg-type]
    assert copy.body == b"not json"
    assert copy.headers["tenant"] == "acme"
    assert copy.headers["x-dead-letter-reason"] == "malformed"
    assert len(copy.headers["x-dead-letter-error"]) == 1000
    assert copy.headers["x-original-queue"] == QUEUE
    assert copy.headers["x-original-exchange"] == "events"
    assert copy.headers["x-original-routing-key"] == "order.created"
    assert copy.headers["x-event-id"] == "m-1" and copy.headers["x-event-name"] == "n"
    assert (copy.message_id, copy.correlation_id, copy.content_type, copy.priority) == ("m-1", "c-1", "text/plain", 3)
    assert copy.delivery_mode.value == 2


# --- settling a batch (fake sink and fake dead-letter exchange) ----------------------------


class FakeSink:
    def __init__(self, failures: int = 0, max_events: int | None = None) -> None:
        self.failures = failures
        self.max_events = max_events
        self.calls: list[list[str]] = []

    async def submit(self, events: Sequence[EventSignal]) -> None:
        self.calls.append([e.id for e in events])
        if self.failures:
            self.failures -= 1
            raise Unavailable("Temporal is down", 0.01)
        if self.max_events is not None and len(events) > self.max_events:
            raise EventRejected("too_large", "too many bytes for one signal")


class FakeExchange:
    def __init__(self) -> None:
        self.published: list[tuple[Any, str]] = []

    async def publish(self, message: Any, routing_key: str, **kw: Any) -> None:
        self.published.append((message, routing_key))


def make_door(sink: FakeSink, *, dlx: bool = True, **extra: Any) -> amqp.AmqpAdapter:
    wf = runner("typed", "order.created")
    wf["triggers"][0]["schema"] = {"type": "object", "required": ["orderId"]}
    cfg = config("unit", "127.0.0.1:7233", [wf])
    pipeline = Pipeline(RouteTable.from_config(cfg), sink)
    spec = {"url": "amqp://x/", "queue": QUEUE, "dead_letter_exchange": "dlx" if dlx else None, **extra}
    door = amqp.AmqpAdapter(AmqpConsumer.model_validate(spec), pipeline)
    if dlx:
        door._dlx = FakeExchange()  # type: ignore[assignment]
    return door


def good(i: int) -> FakeDelivery:
    return delivery({"name": "order.created", "payload": {"orderId": str(i)}}, message_id=f"m-{i}")


def counter(door: amqp.AmqpAdapter, name: str, *labels: str) -> float:
    sample = dict(zip(("door", "reason"), labels, strict=False))
    return door.pipeline.metrics.registry.get_sample_value(name, sample) or 0.0


async def test_accepted_are_acked_and_poison_dead_lettered_with_reason() -> None:
    sink = FakeSink()
    door = make_door(sink)
    batch = [
        good(1),
        delivery(raw=b"{oops", message_id="bad-json"),
        delivery({"name": "order.created", "payload": {"n": 1}}, message_id="no-order-id"),
        delivery({"name": "order.typo", "payload": {}}, message_id="typo"),
        good(2),
    ]
    await door._process(batch)  # type: ignore[arg-type]
    assert sink.calls == [["m-1", "m-2"]]  # one submission for the batch; the pipeline refused two
    assert [d.settled for d in batch] == [["ack"]] * 5
    dlx = door._dlx
    assert isinstance(dlx, FakeExchange)
    reasons = {m.message_id: m.headers["x-dead-letter-reason"] for m, _ in dlx.published}
    assert reasons == {"bad-json": "malformed", "no-order-id": "schema_invalid", "typo": "unroutable"}
    assert {rk for _, rk in dlx.published} == {"order.created"}
    assert counter(door, "signal_bridge_events_accepted_total", "amqp") == 2
    assert counter(door, "signal_bridge_events_rejected_total", "amqp", "malformed") == 1


async def test_unroutable_skip_acks_and_counts_dropped() -> None:
    door = make_door(FakeSink(), on_unroutable="skip")
    d = delivery({"name": "order.typo", "payload": {}}, message_id="typo")
    await door._process([d])  # type: ignore[list-item]
    assert d.settled == ["ack"]
    assert door._dlx.published == []  # type: ignore[union-attr]
    assert counter(door, "signal_bridge_events_dropped_total", "amqp", "unroutable") == 1


async def test_without_dead_letter_exchange_poison_is_rejected_without_requeue() -> None:
    door = make_door(FakeSink(), dlx=False)
    d = delivery(raw=b"nope")
    await door._process([d])  # type: ignore[list-item]
    assert d.settled == ["reject(requeue=False)"]
    assert counter(door, "signal_bridge_events_dropped_total", "amqp", "malformed") == 1


async def test_nothing_acked_while_temporal_is_unavailable_then_acked_once_it_answers() -> None:
    sink = FakeSink(failures=2)
    door = make_door(sink)
    batch = [good(1), good(2)]
    await door._process(batch)  # type: ignore[arg-type]
    assert len(sink.calls) == 3 and sink.calls[0] == sink.calls[2]
    assert [d.settled for d in batch] == [["ack"], ["ack"]]
    assert not door.waiting_for_temporal


async def test_stop_during_outage_leaves_the_batch_unacked() -> None:
    sink = FakeSink(failures=10**6)
    door = make_door(sink)
    batch = [good(1), good(2)]
    task = asyncio.create_task(door._process(batch))  # type: ignore[arg-type]
    await assert_eventually(lambda: len(sink.calls) >= 2, timeout=5, interval=0.01)
    assert door.waiting_for_temporal
    door._stopping.set()
    await asyncio.wait_for(task, 5)
    assert [d.settled for d in batch] == [[], []]


async def test_deliveries_from_a_lost_channel_are_not_submitted() -> None:
    """They cannot be acked any more; RabbitMQ redelivers them on the new channel."""
    sink = FakeSink()
    door = make_door(sink)
    lost = good(1)
    lost.channel.is_closed = True
    await door._process([lost, good(2)])  # type: ignore[list-item]
    assert sink.calls == [["m-2"]]
    assert lost.settled == []


async def test_batch_too_large_for_one_signal_is_split_until_it_fits() -> None:
    sink = FakeSink(max_events=2)
    door = make_door(sink)
    batch = [good(i) for i in range(5)]
    await door._process(batch)  # type: ignore[arg-type]
    assert [d.settled for d in batch] == [["ack"]] * 5
    assert sorted(i for call in sink.calls if len(call) <= 2 for i in call) == [f"m-{i}" for i in range(5)]


async def test_single_event_too_large_is_dead_lettered() -> None:
    door = make_door(FakeSink(max_events=0))
    d = good(1)
    await door._process([d])  # type: ignore[list-item]
    assert d.settled == ["ack"]
    [(message, _)] = door._dlx.published  # type: ignore[union-attr]
    assert message.headers["x-dead-letter-reason"] == "too_large"
    assert counter(door, "signal_bridge_events_rejected_total", "amqp", "too_large") == 1


async def test_a_bug_while_settling_requeues_what_was_not_settled_and_the_consumer_goes_on() -> None:
    class BrokenExchange(FakeExchange):
        async def publish(self, message: Any, routing_key: str, **kw: Any) -> None:
            raise ValueError("a bug")

    door = make_door(FakeSink())
    door._dlx = BrokenExchange()  # type: ignore[assignment]
    ok, bad, later = good(1), delivery(raw=b"nope", message_id="bad"), good(2)
    task = asyncio.create_task(door._run())
    for d in (ok, bad):
        door._inbox.put_nowait(d)  # type: ignore[arg-type]
    await assert_eventually(lambda: bad.settled, timeout=5, interval=0.01)
    door._inbox.put_nowait(later)  # type: ignore[arg-type]
    await assert_eventually(lambda: later.settled, timeout=5, interval=0.01)
    door._stopping.set()
    door._inbox.put_nowait(amqp._STOP)
    await asyncio.wait_for(task, 5)
    assert (ok.settled, bad.settled, later.settled) == (["ack"], ["nack(requeue=True)"], ["ack"])


async def test_failed_republish_falls_back_to_reject_so_rabbitmq_dead_letters_it() -> None:
    class LostChannel(FakeExchange):
        async def publish(self, message: Any, routing_key: str, **kw: Any) -> None:
            raise ChannelInvalidStateError("channel closed")

    door = make_door(FakeSink())
    door._dlx = LostChannel()  # type: ignore[assignment]
    d = delivery(raw=b"nope")
    await door._process([d])  # type: ignore[list-item]
    assert d.settled == ["reject(requeue=False)"]
