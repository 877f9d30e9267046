"""The RabbitMQ adapter without a broker: deliveries → events, and how a batch is settled."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import aio_pika
import pamqp.frame
import pytest
from aio_pika.exceptions import ChannelInvalidStateError, ChannelPreconditionFailed
from aio_pika.queue import consumer as aio_pika_consumer
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from adapters import amqp, amqp_parse
from bridge.config import AmqpConsumer
from bridge.deadletter import MAX_HEADER_VALUE
from bridge.errors import EventRejected
from bridge.event import MAX_SIGNAL_BYTES, EventSignal, content_digest
from bridge.pipeline import Pipeline
from bridge.routing import RouteTable
from bridge.settle import Backoff
from tests.fakes import FakeSink
from tests.helpers import assert_eventually, config, runner

QUEUE = "bridge.events"


@dataclass
class FakeChannel:
    is_closed: bool = False


@dataclass
class FakeDelivery:
    """The attributes of ``aio_pika.IncomingMessage`` the adapter reads, and a record of settling."""

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
    assert event.key is None  # a routing key names a kind of event: no ordering key unless configured


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
    assert (event.name, event.id, event.source) == ("order.created", "/shop/orders#ce-1", "amqp:bridge.events")
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
    assert (event.name, event.id, event.source, event.payload) == (
        "order.paid",
        "/shop#ce-2",
        "amqp:bridge.events",
        {"amount": 5},
    )
    assert event.time == "2024-05-02T00:00:00Z"


def test_cloudevent_missing_attributes_is_malformed() -> None:
    headers = {"cloudEvents_id": "x", "cloudEvents_type": "t"}
    assert reason(delivery({}, headers=headers), entry(format="cloudevents")) == "malformed"


# --- metadata and time ---------------------------------------------------------------------


def test_headers_become_text_and_only_trace_and_correlation_headers_reach_metadata() -> None:
    """Every header is text for ``name_from``/``id_from``; metadata (Temporal history) keeps only
    the trace and correlation headers (bridge.decode.KEPT_HEADERS), and the properties."""
    stamp = datetime(2024, 1, 2, 3, 4, 5)  # AMQP timestamps arrive naive and mean UTC
    d = delivery(
        {"name": "n"},
        headers={
            "tenant": b"acme",
            "attempt": 3,
            "ratio": Decimal("1.5"),
            "flag": True,
            "nested": {"a": [1]},
            "Traceparent": b"00-abc-def-01",
            "x-request-id": "r-1",
            "authorization": "Bearer secret",
        },
        message_id="m-1",
        correlation_id="corr-1",
        app_id="shop",
        timestamp=stamp,
    )
    assert amqp.to_message(d, QUEUE).headers == {  # type: ignore[arg-type]
        "tenant": "acme",
        "attempt": "3",
        "ratio": "1.5",
        "flag": "True",
        "nested": '{"a":[1]}',
        "Traceparent": "00-abc-def-01",
        "x-request-id": "r-1",
        "authorization": "Bearer secret",
    }
    event = amqp.parse(d, entry())
    meta = event.metadata
    assert meta["headers"] == {"traceparent": "00-abc-def-01", "x-request-id": "r-1"}
    assert "secret" not in json.dumps(meta)
    assert meta["traceparent"] == "00-abc-def-01"
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


def test_name_from_reads_a_header_metadata_does_not_keep() -> None:
    d = delivery({"n": 1}, headers={"tenant": 7})
    event = amqp.parse(d, entry(format="raw", name="x", id_from="header:tenant"))
    assert event.id == "7" and event.metadata["headers"] == {}


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


class FakeExchange:
    """Writes what it is given as aiormq's ``basic_publish`` would (so what pamqp cannot write
    raises here too), refuses what RabbitMQ refuses to route (``rabbit_basic:header_routes``: a
    ``CC`` or ``BCC`` that is not an array closes the channel), and keeps it."""

    def __init__(self) -> None:
        self.published: list[tuple[Any, str]] = []

    async def publish(self, message: Any, routing_key: str, **kw: Any) -> None:
        for routed_by in ("CC", "BCC"):
            if not isinstance((message.headers or {}).get(routed_by, []), list):
                raise ChannelPreconditionFailed(f"invalid message: unacceptable_type_in_header {routed_by}")
        ContentHeader(0, len(message.body), message.properties).marshal()
        Basic.Publish(exchange="dlx", routing_key=routing_key).marshal()
        self.published.append((message, routing_key))


def make_adapter(sink: FakeSink, *, dlx: bool = True, **extra: Any) -> amqp.AmqpAdapter:
    wf = runner("typed", "order.created")
    wf["triggers"][0]["schema"] = {"type": "object", "required": ["orderId"]}
    cfg = config("unit", "127.0.0.1:7233", [wf])
    pipeline = Pipeline(RouteTable.from_config(cfg), sink)
    spec = {"url": "amqp://x/", "queue": QUEUE, "dead_letter_exchange": "dlx" if dlx else None, **extra}
    adapter = amqp.AmqpAdapter(AmqpConsumer.model_validate(spec), pipeline)
    adapter.settler.backoff = Backoff(initial=0.01, cap=0.02)
    if dlx:
        adapter._dlx = FakeExchange()  # type: ignore[assignment]
    return adapter


def good(i: int) -> FakeDelivery:
    return delivery({"name": "order.created", "payload": {"orderId": str(i)}}, message_id=f"m-{i}")


def counter(adapter: amqp.AmqpAdapter, name: str, *labels: str) -> float:
    sample = dict(zip(("adapter", "reason"), labels, strict=False))
    return adapter.pipeline.metrics.registry.get_sample_value(name, sample) or 0.0


async def test_accepted_are_acked_and_poison_dead_lettered_with_reason() -> None:
    sink = FakeSink()
    adapter = make_adapter(sink)
    batch = [
        good(1),
        delivery(raw=b"{oops", message_id="bad-json"),
        delivery({"name": "order.created", "payload": {"n": 1}}, message_id="no-order-id"),
        delivery({"name": "order.typo", "payload": {}}, message_id="typo"),
        good(2),
    ]
    await adapter._process(batch)  # type: ignore[arg-type]
    assert sink.calls == [["m-1", "m-2"]]  # one submission for the batch; the pipeline refused two
    assert [d.settled for d in batch] == [["ack"]] * 5
    dlx = adapter._dlx
    assert isinstance(dlx, FakeExchange)
    reasons = {m.message_id: m.headers["x-dead-letter-reason"] for m, _ in dlx.published}
    assert reasons == {"bad-json": "malformed", "no-order-id": "schema_invalid", "typo": "unroutable"}
    assert {rk for _, rk in dlx.published} == {"order.created"}
    assert counter(adapter, "signal_bridge_events_accepted_total", "amqp") == 2
    assert counter(adapter, "signal_bridge_events_rejected_total", "amqp", "malformed") == 1


async def test_a_poison_message_with_a_cc_header_rabbitmq_cannot_route_by_is_dead_lettered() -> None:
    """An AMQP 1.0 publisher's application property ``CC`` reaches a 0-9-1 consumer as text.
    The letter carried it so, RabbitMQ refused every publish of it (closing the channel), the
    letter was retried for ever, and the queue stalled behind it."""
    adapter = make_adapter(FakeSink())
    poison = delivery(raw=b"not json", message_id="p", headers={"CC": "ops@example.com", "BCC": "audit"})
    await asyncio.wait_for(adapter._process([poison]), 5)  # type: ignore[list-item]
    assert poison.settled == ["ack"]
    [(letter, _)] = adapter._dlx.published  # type: ignore[union-attr]
    assert "CC" not in letter.headers and "BCC" not in letter.headers
    assert (letter.headers["x-original-header-CC"], letter.headers["x-original-header-BCC"]) == (
        "ops@example.com",
        "audit",
    )


async def test_unroutable_skip_acks_and_counts_dropped() -> None:
    adapter = make_adapter(FakeSink(), on_unroutable="skip")
    d = delivery({"name": "order.typo", "payload": {}}, message_id="typo")
    await adapter._process([d])  # type: ignore[list-item]
    assert d.settled == ["ack"]
    assert adapter._dlx.published == []  # type: ignore[union-attr]
    assert counter(adapter, "signal_bridge_events_dropped_total", "amqp", "unroutable") == 1


async def test_without_dead_letter_exchange_poison_is_rejected_without_requeue() -> None:
    adapter = make_adapter(FakeSink(), dlx=False)
    d = delivery(raw=b"nope")
    await adapter._process([d])  # type: ignore[list-item]
    assert d.settled == ["reject(requeue=False)"]
    assert counter(adapter, "signal_bridge_events_dropped_total", "amqp", "malformed") == 1


async def test_nothing_acked_while_temporal_is_unavailable_then_acked_once_it_answers() -> None:
    sink = FakeSink(outages=2)
    adapter = make_adapter(sink)
    batch = [good(1), good(2)]
    await adapter._process(batch)  # type: ignore[arg-type]
    assert len(sink.calls) == 3 and sink.calls[0] == sink.calls[2]
    assert [d.settled for d in batch] == [["ack"], ["ack"]]
    assert not adapter.waiting_for_temporal


async def test_stop_during_outage_leaves_the_batch_unacked() -> None:
    sink = FakeSink(outages=10**6)
    adapter = make_adapter(sink)
    batch = [good(1), good(2)]
    task = asyncio.create_task(adapter._process(batch))  # type: ignore[arg-type]
    await assert_eventually(lambda: len(sink.calls) >= 2, timeout=5, interval=0.01)
    assert adapter.waiting_for_temporal
    adapter._stopping.set()
    await asyncio.wait_for(task, 5)
    assert [d.settled for d in batch] == [[], []]


async def test_deliveries_from_a_lost_channel_are_not_submitted() -> None:
    """They cannot be acked any more; RabbitMQ redelivers them on the new channel."""
    sink = FakeSink()
    adapter = make_adapter(sink)
    lost = good(1)
    lost.channel.is_closed = True
    await adapter._process([lost, good(2)])  # type: ignore[list-item]
    assert sink.calls == [["m-2"]]
    assert lost.settled == []


async def test_batch_too_large_for_one_signal_is_split_until_it_fits() -> None:
    sink = FakeSink(max_events=2)
    adapter = make_adapter(sink)
    batch = [good(i) for i in range(5)]
    await adapter._process(batch)  # type: ignore[arg-type]
    assert [d.settled for d in batch] == [["ack"]] * 5
    assert sorted(i for call in sink.calls if len(call) <= 2 for i in call) == [f"m-{i}" for i in range(5)]


async def test_single_event_too_large_is_dead_lettered() -> None:
    adapter = make_adapter(FakeSink(max_events=0))
    d = good(1)
    await adapter._process([d])  # type: ignore[list-item]
    assert d.settled == ["ack"]
    [(message, _)] = adapter._dlx.published  # type: ignore[union-attr]
    assert message.headers["x-dead-letter-reason"] == "too_large"
    assert counter(adapter, "signal_bridge_events_rejected_total", "amqp", "too_large") == 1


async def test_a_body_no_signal_could_carry_is_too_large_before_it_is_parsed() -> None:
    adapter = make_adapter(FakeSink())
    d = delivery(raw=b"[" * (MAX_SIGNAL_BYTES + 1), message_id="huge")  # parsed, it would be malformed
    await adapter._process([d])  # type: ignore[list-item]
    assert d.settled == ["ack"]
    [(message, _)] = adapter._dlx.published  # type: ignore[union-attr]
    assert message.headers["x-dead-letter-reason"] == "too_large" and message.body == d.body
    assert counter(adapter, "signal_bridge_events_rejected_total", "amqp", "too_large") == 1


async def test_a_bug_while_settling_requeues_what_was_not_settled_and_the_consumer_goes_on() -> None:
    class BrokenExchange(FakeExchange):
        async def publish(self, message: Any, routing_key: str, **kw: Any) -> None:
            raise KeyError("a bug")  # not a transport error, nor a copy pamqp cannot write

    adapter = make_adapter(FakeSink())
    adapter._dlx = BrokenExchange()  # type: ignore[assignment]
    ok, bad, later = good(1), delivery(raw=b"nope", message_id="bad"), good(2)
    task = asyncio.create_task(adapter._run())
    for d in (ok, bad):
        adapter._inbox.put(d)  # type: ignore[arg-type]
    await assert_eventually(lambda: bad.settled, timeout=5, interval=0.01)
    adapter._inbox.put(later)  # type: ignore[arg-type]
    await assert_eventually(lambda: later.settled, timeout=5, interval=0.01)
    adapter._stopping.set()
    adapter._inbox.close()
    await asyncio.wait_for(task, 5)
    assert (ok.settled, bad.settled, later.settled) == (["ack"], ["nack(requeue=True)"], ["ack"])


class FlakyExchange(FakeExchange):
    """Fails the first ``failures`` publishes with a transport error, then keeps every letter."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        super().__init__()
        self.failures = failures
        self.error = error or ChannelInvalidStateError("channel closed")
        self.attempts = 0

    async def publish(self, message: Any, routing_key: str, **kw: Any) -> None:
        self.attempts += 1
        if self.failures:
            self.failures -= 1
            raise self.error
        await super().publish(message, routing_key, **kw)


@pytest.mark.parametrize(
    "error",
    [
        ChannelInvalidStateError("channel closed"),
        aio_pika.exceptions.DeliveryError(None, Basic.Nack(delivery_tag=1)),  # the broker nacked it
        TimeoutError(),
    ],
    ids=["channel-closed", "nacked", "timeout"],
)
async def test_a_failed_republish_is_retried_with_backoff_holding_the_delivery_never_dropped(error: Exception) -> None:
    adapter = make_adapter(FakeSink())
    dlx = adapter._dlx = FlakyExchange(failures=3, error=error)  # type: ignore[assignment]
    ok, bad = good(1), delivery(raw=b"nope", message_id="bad")
    seen_while_failing: list[list[str]] = []
    real_wait = adapter.wait

    async def wait(seconds: float) -> bool:
        seen_while_failing.append(list(bad.settled))
        return await real_wait(seconds)

    adapter.wait = wait  # type: ignore[method-assign]
    await adapter._process([ok, bad])  # type: ignore[list-item]
    assert seen_while_failing == [[], [], []]  # held, unacked, while the publish failed
    assert (ok.settled, bad.settled) == (["ack"], ["ack"])
    assert dlx.attempts == 4 and [m.message_id for m, _ in dlx.published] == ["bad"]
    assert counter(adapter, "signal_bridge_events_dropped_total", "amqp", "malformed") == 0
    assert not adapter.waiting_for_temporal


async def test_a_letter_whose_delivery_lost_its_channel_while_retrying_is_left_for_redelivery() -> None:
    adapter = make_adapter(FakeSink())
    adapter._dlx = FlakyExchange(failures=10**6)  # type: ignore[assignment]
    bad = delivery(raw=b"nope", message_id="bad")
    real_wait = adapter.wait

    async def wait(seconds: float) -> bool:
        bad.channel.is_closed = True  # the connection dropped: RabbitMQ will deliver it again
        return await real_wait(seconds)

    adapter.wait = wait  # type: ignore[method-assign]
    await asyncio.wait_for(adapter._process([bad]), 5)  # type: ignore[list-item]
    assert bad.settled == [] and adapter._dlx.published == []  # type: ignore[union-attr]


async def test_overloaded_holds_the_window_unacked_like_an_outage_then_acks() -> None:
    """More events wait for Temporal than dispatcher.max_pending_events allows: the batch waits,
    unacked (so RabbitMQ sends nothing more), and goes once the others are through."""
    sink = FakeSink()
    adapter = make_adapter(sink)
    adapter.pipeline.max_pending, adapter.pipeline.pending = 2, 2  # another adapter's events in flight
    batch = [good(1), good(2)]
    waits: list[list[list[str]]] = []
    real_wait = adapter.wait

    async def wait(seconds: float) -> bool:
        waits.append([list(d.settled) for d in batch])
        assert adapter.waiting_for_temporal
        if len(waits) == 3:
            adapter.pipeline.pending = 0  # they are through
        return await real_wait(seconds)

    adapter.wait = wait  # type: ignore[method-assign]
    await adapter._process(batch)  # type: ignore[arg-type]
    assert waits == [[[], []]] * 3 and sink.calls == [["m-1", "m-2"]]
    assert [d.settled for d in batch] == [["ack"], ["ack"]] and not adapter.waiting_for_temporal
    assert counter(adapter, "signal_bridge_overloaded_total", "amqp") == 3


async def test_an_unexpected_error_from_temporal_is_not_retried_the_batch_is_requeued() -> None:
    """Only Unavailable is retried: anything else is a bug, and RabbitMQ gets the batch back."""
    sink = FakeSink(bugs=1)
    adapter = make_adapter(sink)
    first, later = [good(1), good(2)], good(3)
    task = asyncio.create_task(adapter._run())
    for d in first:
        adapter._inbox.put(d)  # type: ignore[arg-type]
    await assert_eventually(lambda: all(d.settled for d in first), timeout=5, interval=0.01)
    adapter._inbox.put(later)  # type: ignore[arg-type]
    await assert_eventually(lambda: later.settled, timeout=5, interval=0.01)
    adapter._stopping.set()
    adapter._inbox.close()
    await asyncio.wait_for(task, 5)
    assert [d.settled for d in first] == [["nack(requeue=True)"]] * 2 and later.settled == ["ack"]
    assert sink.calls == [["m-1", "m-2"], ["m-3"]] and not adapter.waiting_for_temporal


async def test_a_dead_letter_that_reaches_no_queue_is_counted_dropped_and_acked() -> None:
    class NoRoute(aio_pika.exceptions.PublishError):
        def __init__(self) -> None:
            Exception.__init__(self, "NO_ROUTE")

    class Unbound(FakeExchange):
        async def publish(self, message: Any, routing_key: str, **kw: Any) -> None:
            raise NoRoute()

    adapter = make_adapter(FakeSink())
    adapter._dlx = Unbound()  # type: ignore[assignment]
    d = delivery(raw=b"nope")
    await adapter._process([d])  # type: ignore[list-item]
    assert d.settled == ["ack"]
    assert counter(adapter, "signal_bridge_events_dropped_total", "amqp", "malformed") == 1


async def test_two_letters_with_one_message_id_are_not_in_flight_together() -> None:
    """aiormq matches a letter RabbitMQ returns (routed to no queue) to its publish by
    ``message_id``, the last publish with it winning. Two in flight at once with one id had the
    return given to the other: the unroutable one was counted written and its delivery acked."""

    class NoRoute(aio_pika.exceptions.PublishError):
        def __init__(self) -> None:
            Exception.__init__(self, "NO_ROUTE")

    class Returns(FakeExchange):
        """Routes every routing key but ``nowhere``; a return goes to the last publish in flight
        with its ``message_id``, as aiormq's ``message_id_delivery_tag`` gives it."""

        def __init__(self) -> None:
            super().__init__()
            self.in_flight: dict[str, asyncio.Future[None]] = {}

        async def publish(self, message: Any, routing_key: str, **kw: Any) -> None:
            answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.in_flight[message.message_id] = answer
            await asyncio.sleep(0)  # the others of the batch are published meanwhile
            if routing_key == "nowhere":
                self.in_flight[message.message_id].set_exception(NoRoute())
            if not answer.done():
                answer.set_result(None)
            await asyncio.sleep(0)
            await answer
            self.published.append((message, routing_key))

    adapter = make_adapter(FakeSink())
    adapter._dlx = Returns()  # type: ignore[assignment]
    lost = delivery(raw=b"nope", message_id="same", routing_key="nowhere")
    routed = delivery(raw=b"nope", message_id="same")
    await adapter._process([lost, routed])  # type: ignore[list-item]
    assert [key for _, key in adapter._dlx.published] == ["order.created"]  # only the routed one went out
    assert lost.settled == ["ack"] and routed.settled == ["ack"]
    assert counter(adapter, "signal_bridge_events_dropped_total", "amqp", "malformed") == 1


def test_letters_go_in_as_few_waves_as_their_repeated_ids_need_in_linear_time() -> None:
    """A letter without an id (or with an empty one) gets a random one from aiormq: it waits for
    none. A batch of letters with one constant id goes one by one, grouped in linear time."""
    ids = ["a", "b", "a", None, "", None, "a"]
    items = [SimpleNamespace(message=SimpleNamespace(message_id=i)) for i in ids]
    waves = amqp._by_message_id(items)  # type: ignore[arg-type]
    assert [[item.message.message_id for item in wave] for wave in waves] == [["a", "b", None, "", None], ["a"], ["a"]]
    same = [SimpleNamespace(message=SimpleNamespace(message_id="same")) for _ in range(20_000)]
    assert len(amqp._by_message_id(same)) == 20_000  # type: ignore[arg-type]


# --- bad input that must not stall the queue ---------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 2_500 + b"]" * 2_500,
        b'{"name": "order.created", "payload": {"x": NaN}}',
        b'{"name": "order.created", "payload": {"x": ' + b"1" * 5_000 + b"}}",
        b'{"name": "order.created", "payload": {"x": "\xff"}}',
    ],
    ids=["deep", "nan", "huge-int", "invalid-utf8"],
)
@pytest.mark.parametrize("form", ["envelope", "raw", "cloudevents"])
def test_poison_bodies_are_malformed_in_every_format(raw: bytes, form: str) -> None:
    assert reason(delivery(raw=raw), entry(format=form, name="n")) == "malformed"


def test_header_tables_of_any_shape_become_text_or_are_left_out() -> None:
    deep: Any = "leaf"
    for _ in range(5_000):
        deep = {"t": deep}
    d = delivery({"name": "n"}, headers={"deep": deep, "list": [1, b"\xff", None], "none": None, "ok": "v"})
    headers = amqp.to_message(d, QUEUE).headers  # type: ignore[arg-type]
    assert headers == {"list": "[1,\"b'\\\\xff'\",null]", "ok": "v"}


def test_cloudevent_data_is_never_dropped_binary_non_json_is_kept_structured_base64_decoded() -> None:
    headers = {
        "cloudEvents_specversion": "1.0",
        "cloudEvents_id": "c",
        "cloudEvents_source": "/s",
        "cloudEvents_type": "t",
    }
    d = delivery(raw=b"a,b\n1,2", headers=headers, content_type="text/csv")
    assert amqp.parse(d, entry(format="cloudevents")).payload == {
        "data_base64": base64.b64encode(b"a,b\n1,2").decode(),
        "datacontenttype": "text/csv",
    }
    ce = {"specversion": "1.0", "id": "c2", "source": "/s", "type": "t"}
    data = base64.b64encode(b'{"orderId": "A1"}').decode()
    structured = delivery({**ce, "data_base64": data}, content_type="application/cloudevents+json")
    assert amqp.parse(structured, entry()).payload == {"orderId": "A1"}


def test_dead_letter_copy_caps_its_headers_so_the_frame_limit_cannot_close_the_connection() -> None:
    big = "x" * 300_000
    headers: dict[str, Any] = {f"h{i}": "v" * 3_000 for i in range(60)}  # ~180 KB of headers
    headers |= {"blob": b"b" * 50_000, "table": {"k": "v" * 10_000}, "keep": "me"}
    d = delivery(raw=b"{}", headers=headers, message_id="m-1")
    event = EventSignal(id=big, name=big, payload={}, source="amqp:q")
    copy = amqp.dead_letter_copy(d, EventRejected("unroutable", "no trigger"), QUEUE, event)  # type: ignore[arg-type]
    assert copy.headers["x-dead-letter-trimmed"] == "headers"
    assert copy.headers["x-event-id"] == "x" * MAX_HEADER_VALUE and copy.headers["x-dead-letter-reason"] == "unroutable"
    assert "table" not in copy.headers and copy.headers["h0"] == "v" * 3_000
    encoded = len(ContentHeader(0, len(copy.body), copy.properties).marshal())
    assert encoded < 48 * 1024 < 128 * 1024  # one frame, whatever frame_max the broker allows

    small = amqp.dead_letter_copy(delivery(raw=b"{}", headers={"a": 1}), EventRejected("malformed", "x"), QUEUE)  # type: ignore[arg-type]
    assert "x-dead-letter-trimmed" not in small.headers and small.headers["a"] == 1


def test_dead_letter_copy_writes_again_what_pamqp_read() -> None:
    """pamqp reads a long string that is not UTF-8 as bytes and a double as float, and cannot write
    either back as they are (bytes; a float wider than single precision): the copy must encode."""
    headers = {"raw": b"\xff\xfe", "nested": {"l": [b"\x00", 1e300]}, "double": 1e300, "single": 0.5}
    copy = amqp.dead_letter_copy(delivery(raw=b"x", headers=headers), EventRejected("malformed", "x"), QUEUE)  # type: ignore[arg-type]
    ContentHeader(0, 1, copy.properties).marshal()
    assert copy.headers["raw"] == bytearray(b"\xff\xfe") and copy.headers["double"] == "1e+300"
    assert copy.headers["single"] == 0.5 and copy.headers["nested"] == {"l": [bytearray(b"\x00"), "1e+300"]}


async def test_a_copy_whose_headers_cannot_be_written_goes_with_the_dead_letter_headers_only() -> None:
    class Picky(FakeExchange):
        async def publish(self, message: Any, routing_key: str, **kw: Any) -> None:
            if "odd" in message.headers:
                raise TypeError("Unknown type: <class 'object'>")
            await super().publish(message, routing_key, **kw)

    adapter = make_adapter(FakeSink())
    dlx = adapter._dlx = Picky()  # type: ignore[assignment]
    d = delivery(raw=b"nope", headers={"odd": object(), "keep": "v"}, message_id="bad")
    await adapter._process([d])  # type: ignore[list-item]
    assert d.settled == ["ack"]
    [(letter, _)] = dlx.published
    assert (
        letter.headers["x-dead-letter-reason"] == "malformed" and letter.headers["x-dead-letter-trimmed"] == "headers"
    )
    assert "keep" not in letter.headers


async def test_a_poison_message_whose_properties_grew_when_read_is_dead_lettered_not_back_for_ever() -> None:
    """90 bytes 0xFF in ``message_id`` (or any short string) are read as 90 ``\\xff``: 360 bytes,
    more than a short string holds. The letter's copy had them as they were read, pamqp refused to
    write it (with or without its headers), and the delivery went back to the queue's head again
    and again. The copy's properties and routing key are cut to fit; the whole id is a header."""
    adapter = make_adapter(FakeSink())
    grown = "\\xff" * 90
    props = {p: grown for p in ("content_encoding", "correlation_id", "message_id", "type", "app_id")}
    d = delivery(raw=b"nope", routing_key="order." + grown, **props)
    await adapter._process([d])  # type: ignore[list-item]
    assert d.settled == ["ack"]
    [(letter, routing_key)] = adapter._dlx.published  # type: ignore[union-attr]
    assert letter.headers["x-dead-letter-reason"] == "malformed"
    assert letter.message_id == grown[:255] and len(routing_key.encode()) <= 255
    assert letter.headers["x-original-message-id"] == grown


async def test_a_letter_nothing_of_which_can_be_written_is_rejected_and_counted_not_requeued(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Refusing(FakeExchange):
        async def publish(self, message: Any, routing_key: str, **kw: Any) -> None:
            raise ValueError("cannot write it")

    adapter = make_adapter(FakeSink())
    adapter._dlx = Refusing()  # type: ignore[assignment]
    d = delivery(raw=b"nope", message_id="bad")
    await adapter._process([d])  # type: ignore[list-item]
    assert d.settled == ["reject(requeue=False)"]
    assert counter(adapter, "signal_bridge_events_dropped_total", "amqp", "malformed") == 1
    assert any("cannot be dead-lettered" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


def test_properties_and_headers_the_client_would_refuse_are_read_not_a_closed_connection() -> None:
    """pamqp refused a message_id that is not UTF-8, a timestamp past any datetime, a header name
    that is not UTF-8 and tables nested past the recursion limit: aiormq closed the connection
    and RabbitMQ delivered the message again, for ever. adapters.amqp_parse makes it read them."""
    deep: Any = "leaf"
    for _ in range(300):
        deep = {"t": deep}
    stamp = datetime(2000, 1, 1, tzinfo=UTC)
    props = Basic.Properties(message_id="AAAA", timestamp=stamp, headers={"kkkk": "v", "deep": deep, "ok": 1})
    raw = pamqp.frame.marshal(ContentHeader(0, 2, props), 1)
    raw = raw.replace(b"\x04AAAA", b"\x04\xff\xfeAA").replace(b"\x04kkkk", b"\x04\xffkkk")
    raw = raw.replace(struct.pack(">Q", int(stamp.timestamp())), struct.pack(">Q", 2**63 - 1))
    _, _, header = pamqp.frame.unmarshal(raw)
    assert isinstance(header, ContentHeader)
    read = header.properties
    assert (read.message_id, read.timestamp) == ("\\xff\\xfeAA", None)
    assert read.headers["\\xffkkk"] == "v" and read.headers["ok"] == 1
    depth, table = 0, read.headers["deep"]
    while table:
        table, depth = table["t"], depth + 1
    assert depth == amqp_parse.MAX_TABLE_DEPTH - 1  # the headers table itself is the first level
    event = amqp.parse(delivery({"name": "n"}, headers=read.headers, message_id=read.message_id), entry())  # type: ignore[arg-type]
    assert event.name == "n" and event.id == "\\xff\\xfeAA"


def _from_the_wire(props: Basic.Properties, patch: tuple[bytes, bytes] = (b"", b"")) -> Basic.Properties:
    raw = pamqp.frame.marshal(ContentHeader(0, 2, props), 1).replace(*patch)
    _, _, header = pamqp.frame.unmarshal(raw)
    assert isinstance(header, ContentHeader)
    return header.properties


@pytest.mark.parametrize(
    ("props", "patch"),
    [
        (Basic.Properties(delivery_mode=2, message_id="m-1"), (b"\x02\x03m-1", b"\x03\x03m-1")),
        (Basic.Properties(expiration="abc", message_id="m-1"), (b"", b"")),
    ],
    ids=["delivery-mode-3", "expiration-not-a-number"],
)
async def test_properties_aio_pika_would_refuse_reach_the_adapter(props: Basic.Properties, patch: tuple[bytes, bytes]):
    """RabbitMQ 4 passes on a delivery_mode other than 1 or 2 and an expiration that is not a
    number (from an AMQP 1.0 publisher's annotations). aio-pika raised on them before the adapter's
    callback, leaving the delivery unacked for good, holding a prefetch slot: enough of them
    stopped the queue."""
    read = _from_the_wire(props, patch)
    delivered = DeliveredMessage(
        delivery=Basic.Deliver(consumer_tag="c", delivery_tag=1, exchange="events", routing_key="order.created"),
        header=ContentHeader(0, 2, read),
        body=b"{}",
        channel=None,  # type: ignore[arg-type]
    )
    seen: list[Any] = []

    async def on_message(message: Any) -> None:
        seen.append(message)

    await aio_pika_consumer(on_message, delivered, no_ack=False)
    assert [m.message_id for m in seen] == ["m-1"]


def test_two_message_ids_that_are_not_utf8_are_two_events() -> None:
    """Read with U+FFFD for each bad byte, two binary ids read alike: the second event got the
    first's id, and Temporal refused its start as a duplicate. Nothing of it ran."""
    ids = []
    for raw_id in (b"\xff\x01\x9c", b"\xfe\x01\x80"):
        read = _from_the_wire(Basic.Properties(message_id="AAA"), (b"\x03AAA", b"\x03" + raw_id))
        ids.append(amqp.parse(delivery({"name": "n"}, message_id=read.message_id), entry()).id)  # type: ignore[arg-type]
    assert ids[0] != ids[1]
    header_ids = [
        amqp.parse(delivery({"name": "n"}, headers={"x-id": v}), entry(id_from="header:x-id")).id  # type: ignore[arg-type]
        for v in (b"\xff\x01", b"\xfe\x01")
    ]
    assert header_ids[0] != header_ids[1]


def test_the_ordering_key_comes_from_key_from() -> None:
    """Events of one key start in order; a routing key is one only when asked for."""
    body = {"name": "order.created", "payload": {"orderId": "A1"}}
    d = delivery(body, routing_key="order.created", headers={"x-entity": "order-9"})
    assert amqp.parse(d, entry(key_from="routing_key")).key == "order.created"
    assert amqp.parse(d, entry(key_from="header:X-Entity")).key == "order-9"
    assert amqp.parse(d, entry(key_from="field:payload.orderId")).key == "A1"
    assert amqp.parse(d, entry(key_from="field:payload.absent")).key is None


async def test_readyz_is_red_while_rabbitmq_has_no_consumer_and_green_once_it_has_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """RabbitMQ cancels a consumer whose queue was deleted; aio-pika tries to consume again every
    few seconds, saying so at DEBUG only, and /readyz stayed green while nothing was read."""
    monkeypatch.setattr(amqp, "CONSUMER_CHECK", 0.01)
    adapter = make_adapter(FakeSink())
    underlay = SimpleNamespace(consumers={"ctag": object()}, is_closed=False)

    async def get_underlay_channel() -> Any:
        return underlay

    connected = asyncio.Event()
    connected.set()
    adapter._connection = SimpleNamespace(is_closed=False, connected=connected)  # type: ignore[assignment]
    adapter._channel = SimpleNamespace(get_underlay_channel=get_underlay_channel)  # type: ignore[assignment]
    adapter._tag = "ctag"
    adapter._task = asyncio.create_task(adapter._stopping.wait())
    adapter._watch = asyncio.create_task(adapter._watch_consumer())
    try:
        await asyncio.sleep(0.05)
        assert adapter.healthy()
        underlay.consumers.clear()  # the broker's basic.cancel
        await assert_eventually(lambda: not adapter.healthy(), timeout=2, interval=0.01)
        assert "has no consumer of queue" in caplog.text
        underlay.consumers["ctag"] = object()  # aio-pika consumed again
        await assert_eventually(adapter.healthy, timeout=2, interval=0.01)
    finally:
        adapter._stopping.set()
        await adapter._watch
        await adapter._task


async def test_a_closed_channel_that_still_lists_the_consumer_is_no_consumer() -> None:
    """aiormq keeps a closed channel's consumer tags, and aio-pika hands that channel back until a
    new one is open: the adapter read it as consuming."""
    adapter = make_adapter(FakeSink())
    closed = SimpleNamespace(consumers={"ctag": object()}, is_closed=True)

    async def get_underlay_channel() -> Any:
        return closed

    adapter._channel = SimpleNamespace(get_underlay_channel=get_underlay_channel)  # type: ignore[assignment]
    adapter._tag = "ctag"
    assert await adapter._has_consumer() is False
    closed.is_closed = False
    assert await adapter._has_consumer() is True
