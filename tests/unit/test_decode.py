"""Queue message bodies → events: envelope, raw and CloudEvents, names and ids."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from bridge.config import EventFormat
from bridge.decode import Message, decode
from bridge.errors import EventRejected


def msg(body: Any = None, raw: bytes | None = None, **kw: Any) -> Message:
    kw.setdefault("source", "kafka:orders")
    kw.setdefault("fallback_id", "kafka:orders:0:42")
    return Message(body=raw if raw is not None else json.dumps(body).encode(), **kw)


def fmt(**kw: Any) -> EventFormat:
    return EventFormat(**kw)


def rejected(message: Message, form: EventFormat) -> str:
    with pytest.raises(EventRejected) as exc:
        decode(message, form)
    return exc.value.reason


# --- envelope ------------------------------------------------------------------------------


def test_envelope_name_payload_and_id() -> None:
    m = msg({"name": "order.created", "payload": {"orderId": "A1"}, "id": "evt-1"}, key="k1", metadata={"m": 1})
    event = decode(m, fmt(format="envelope"))
    assert (event.name, event.payload, event.id) == ("order.created", {"orderId": "A1"}, "evt-1")
    assert event.source == "kafka:orders"
    assert event.key == "k1"
    assert event.metadata == {"m": 1}


def test_envelope_without_id_uses_the_door_fallback() -> None:
    event = decode(msg({"name": "order.created", "payload": {}}), fmt())
    assert event.id == "kafka:orders:0:42"


def test_envelope_without_payload_is_empty_object() -> None:
    assert decode(msg({"name": "ping"}), fmt()).payload == {}


def test_envelope_id_wins_over_id_from_which_wins_over_fallback() -> None:
    form = fmt(id_from="field:payload.orderId")
    body = {"name": "n", "payload": {"orderId": "A1"}}
    assert decode(msg({**body, "id": "evt-1"}), form).id == "evt-1"
    assert decode(msg(body), form).id == "A1"
    assert decode(msg({"name": "n", "payload": {}}), form).id == "kafka:orders:0:42"


def test_envelope_name_falls_back_to_configured_name() -> None:
    assert decode(msg({"payload": {}}), fmt(name="order.default")).name == "order.default"


@pytest.mark.parametrize("body", [[1, 2], "text", 3])
def test_envelope_that_is_not_an_object_is_malformed(body: Any) -> None:
    assert rejected(msg(body), fmt()) == "malformed"


def test_envelope_payload_that_is_not_an_object_is_malformed() -> None:
    assert rejected(msg({"name": "n", "payload": [1]}), fmt()) == "malformed"


def test_envelope_without_name_is_no_name() -> None:
    assert rejected(msg({"payload": {}}), fmt()) == "no_name"
    assert rejected(msg({"name": "", "payload": {}}), fmt()) == "no_name"


# --- raw -----------------------------------------------------------------------------------


def test_raw_static_name_takes_whole_body_as_payload() -> None:
    event = decode(msg({"orderId": "A1", "name": "ignored"}), fmt(format="raw", name="order.created"))
    assert event.name == "order.created"
    assert event.payload == {"orderId": "A1", "name": "ignored"}
    assert event.id == "kafka:orders:0:42"


def test_raw_name_from_header_is_case_insensitive() -> None:
    m = msg({"a": 1}, headers={"X-Event-Name": "order.paid"})
    assert decode(m, fmt(format="raw", name_from="header:x-event-name")).name == "order.paid"


def test_raw_name_from_nested_field() -> None:
    m = msg({"meta": {"type": "order.shipped"}})
    assert decode(m, fmt(format="raw", name_from="field:meta.type")).name == "order.shipped"


@pytest.mark.parametrize("locator", ["key", "routing_key"])
def test_raw_name_from_key(locator: str) -> None:
    event = decode(msg({"a": 1}, key="order.created"), fmt(format="raw", name_from=locator))
    assert event.name == "order.created"
    assert event.key == "order.created"


def test_raw_name_from_wins_over_static_name() -> None:
    m = msg({"a": 1}, headers={"type": "from.header"})
    assert decode(m, fmt(format="raw", name="static", name_from="header:type")).name == "from.header"


def test_raw_id_from_header() -> None:
    m = msg({"a": 1}, headers={"X-Id": "h-1"})
    assert decode(m, fmt(format="raw", name="n", id_from="header:x-id")).id == "h-1"


@pytest.mark.parametrize(
    "form",
    [
        {"format": "raw"},
        {"format": "raw", "name_from": "header:x-missing"},
        {"format": "raw", "name_from": "field:nope"},
        {"format": "raw", "name_from": "key"},
    ],
)
def test_raw_without_a_name_is_no_name(form: dict[str, Any]) -> None:
    assert rejected(msg({"a": 1}), fmt(**form)) == "no_name"


def test_raw_payload_must_be_an_object() -> None:
    assert rejected(msg([1, 2]), fmt(format="raw", name="n")) == "malformed"


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe\x00"])
@pytest.mark.parametrize("form", ["envelope", "raw", "cloudevents"])
def test_malformed_body_is_rejected(raw: bytes, form: str) -> None:
    assert rejected(msg(raw=raw), fmt(format=form, name="n")) == "malformed"


def test_bad_locator_is_a_config_error() -> None:
    with pytest.raises(ValidationError):
        EventFormat(format="raw", name_from="body:x")


# --- CloudEvents ---------------------------------------------------------------------------

CE = {
    "specversion": "1.0",
    "id": "ce-1",
    "source": "/shop/orders",
    "type": "order.created",
    "time": "2024-05-01T12:00:00Z",
}


def test_structured_cloudevent() -> None:
    m = msg({**CE, "data": {"orderId": "A1"}}, content_type="application/cloudevents+json; charset=utf-8")
    event = decode(m, fmt(format="cloudevents"))
    assert event.name == "order.created"
    assert event.id == "ce-1"
    assert event.source == "/shop/orders"
    assert event.payload == {"orderId": "A1"}
    assert event.time == "2024-05-01T12:00:00Z"
    assert event.metadata["cloudevents"]["specversion"] == "1.0"


def test_structured_content_type_is_recognised_whatever_the_configured_format() -> None:
    m = msg({**CE, "data": {"x": 1}}, content_type="application/cloudevents+json")
    event = decode(m, fmt(format="raw", name="ignored"))
    assert (event.name, event.id) == ("order.created", "ce-1")


def test_cloudevents_format_reads_structured_body_without_content_type() -> None:
    event = decode(msg({**CE, "data": {"x": 1}}), fmt(format="cloudevents"))
    assert event.payload == {"x": 1}


def test_structured_cloudevent_non_object_data_is_wrapped() -> None:
    event = decode(msg({**CE, "data": [1, 2]}), fmt(format="cloudevents"))
    assert event.payload == {"data": [1, 2]}


def test_binary_cloudevent() -> None:
    attrs = {k: str(v) for k, v in CE.items()}
    m = msg({"orderId": "A1"}, ce_attributes=attrs, content_type="application/json", key="cust-1")
    event = decode(m, fmt(format="cloudevents"))
    assert event.name == "order.created"
    assert event.id == "ce-1"
    assert event.source == "/shop/orders"
    assert event.payload == {"orderId": "A1"}
    assert event.key == "cust-1"


def test_binary_cloudevent_without_body_has_empty_payload() -> None:
    m = msg(raw=b"", ce_attributes=dict(CE))
    assert decode(m, fmt(format="cloudevents")).payload == {}


def test_cloudevent_id_wins_over_fallback_and_envelope_id_field() -> None:
    m = msg({**CE, "data": {"id": "inner"}}, content_type="application/cloudevents+json")
    assert decode(m, fmt(format="cloudevents", id_from="field:data.id")).id == "ce-1"


@pytest.mark.parametrize("attr", ["id", "source", "type", "specversion"])
def test_cloudevent_missing_required_attribute_is_malformed(attr: str) -> None:
    body = {k: v for k, v in CE.items() if k != attr}
    assert rejected(msg(body), fmt(format="cloudevents")) == "malformed"
    binary = msg({"a": 1}, ce_attributes={k: str(v) for k, v in body.items()})
    assert rejected(binary, fmt(format="cloudevents")) == "malformed"
