"""Message bodies → events: envelope, raw and CloudEvents, names and ids; the JSON limits every
adapter shares; what becomes of a CloudEvent's data (on the queues and over HTTP)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from pydantic import ValidationError

from adapters.http.parse import envelope
from adapters.http.parse import parse as http_parse
from bridge import decode as decode_module
from bridge.config import EventFormat
from bridge.decode import (
    CE_STRUCTURED,
    MAX_JSON_DEPTH,
    MAX_KEPT_VALUE,
    Message,
    decode,
    header_metadata,
    is_json_media,
    parse_json,
)
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


@pytest.mark.parametrize(("body_id", "expected"), [(0, "0"), (7.0, "7"), ("0", "0"), (-3, "-3")])
def test_an_envelope_id_that_is_falsy_is_still_its_id(body_id: Any, expected: str) -> None:
    """``id: 0`` was read as "no id": the record's offset became its id, so the same event resent
    (at another offset) started twice. Over HTTP it was already the id "0"."""
    for offset in (42, 43):
        m = msg({"name": "order.created", "id": body_id}, fallback_id=f"kafka:orders:0:{offset}")
        assert decode(m, fmt()).id == expected
    assert envelope({"name": "order.created", "id": body_id}, None, {}).id == expected


@pytest.mark.parametrize("body_id", ["", True, False, [1], {"a": 1}, 1.5])
def test_an_envelope_id_that_is_empty_or_not_a_string_or_integer_is_malformed_on_every_adapter(body_id: Any) -> None:
    """An empty id used to become the transport's id here (a new one on every resend) and a list
    its repr; over HTTP both were refused already, as they now are everywhere."""
    assert rejected(msg({"name": "order.created", "id": body_id}), fmt()) == "malformed"
    with pytest.raises(EventRejected) as caught:
        envelope({"name": "order.created", "id": body_id}, None, {})
    assert caught.value.reason == "malformed"


def test_envelope_without_payload_is_empty_object() -> None:
    assert decode(msg({"name": "ping"}), fmt()).payload == {}


def test_an_envelope_with_a_null_payload_has_none_on_every_adapter() -> None:
    """``"payload": null`` is no payload over HTTP; from Kafka and RabbitMQ the same body was
    dead-lettered as malformed."""
    assert decode(msg({"name": "ping", "payload": None}), fmt()).payload == {}
    assert envelope({"name": "ping", "payload": None}, None, {}).payload == {}


def test_envelope_id_wins_over_id_from_which_wins_over_fallback() -> None:
    form = fmt(id_from="field:payload.orderId")
    body = {"name": "n", "payload": {"orderId": "A1"}}
    assert decode(msg({**body, "id": "evt-1"}), form).id == "evt-1"
    assert decode(msg(body), form).id == "A1"
    assert decode(msg({"name": "n", "payload": {}}), form).id == "kafka:orders:0:42"


@pytest.mark.parametrize("value", [{}, [1, 2], True, False, 1.5])
def test_an_id_from_field_that_is_no_string_or_integer_is_malformed(value: Any) -> None:
    """``{}`` was the id ``"{}"``: every event with an empty object there got one id, and all but
    the first were skipped as repeats of it."""
    form = fmt(format="raw", name="n", id_from="field:ref")
    with pytest.raises(EventRejected, match="the id at field:ref must be a string or an integer") as caught:
        decode(msg({"ref": value, "n": 1}), form)
    assert caught.value.reason == "malformed"


def test_an_id_from_field_is_read_as_an_envelope_id_is() -> None:
    form = fmt(format="raw", name="n", id_from="field:ref")
    assert decode(msg({"ref": 7.0}), form).id == decode(msg({"ref": 7}), form).id == "7"
    assert decode(msg({"ref": 0}), form).id == "0"
    assert decode(msg({"ref": "A1"}), form).id == "A1"
    assert decode(msg({"ref": ""}), form).id == "kafka:orders:0:42"


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
    assert event.id == "/shop/orders#ce-1"
    assert event.source == "kafka:orders"  # the adapter's scope; the CloudEvent's source is in the id
    assert event.payload == {"orderId": "A1"}
    assert event.time == "2024-05-01T12:00:00Z"
    assert event.metadata["cloudevents"]["specversion"] == "1.0"


def test_structured_content_type_is_recognised_whatever_the_configured_format() -> None:
    m = msg({**CE, "data": {"x": 1}}, content_type="application/cloudevents+json")
    event = decode(m, fmt(format="raw", name="ignored"))
    assert (event.name, event.id) == ("order.created", "/shop/orders#ce-1")


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
    assert event.id == "/shop/orders#ce-1"
    assert event.source == "kafka:orders"  # the adapter's scope; the CloudEvent's source is in the id
    assert event.payload == {"orderId": "A1"}
    assert event.key == "cust-1"


def test_binary_cloudevent_without_body_has_empty_payload() -> None:
    m = msg(raw=b"", ce_attributes=dict(CE))
    assert decode(m, fmt(format="cloudevents")).payload == {}


def test_cloudevent_id_wins_over_fallback_and_envelope_id_field() -> None:
    m = msg({**CE, "data": {"id": "inner"}}, content_type="application/cloudevents+json")
    assert decode(m, fmt(format="cloudevents", id_from="field:data.id")).id == "/shop/orders#ce-1"


@pytest.mark.parametrize("attr", ["id", "source", "type", "specversion"])
def test_cloudevent_missing_required_attribute_is_malformed(attr: str) -> None:
    body = {k: v for k, v in CE.items() if k != attr}
    assert rejected(msg(body), fmt(format="cloudevents")) == "malformed"
    binary = msg({"a": 1}, ce_attributes={k: str(v) for k, v in body.items()})
    assert rejected(binary, fmt(format="cloudevents")) == "malformed"


# --- JSON limits: depth, numbers, encodings ---------------------------------------------------


def nested(depth: int, inner: str = "1") -> bytes:
    return ("[" * depth + inner + "]" * depth).encode()


def refused_json(raw: bytes) -> str:
    with pytest.raises(EventRejected) as exc:
        parse_json(raw)
    assert exc.value.reason == "malformed"
    return exc.value.message


def test_json_nested_up_to_the_limit_is_taken_one_more_level_is_malformed() -> None:
    assert MAX_JSON_DEPTH == 100
    assert parse_json(nested(MAX_JSON_DEPTH)) is not None
    assert parse_json(b'{"a":' * (MAX_JSON_DEPTH - 1) + b"[]" + b"}" * (MAX_JSON_DEPTH - 1)) is not None
    assert "nested deeper than 100" in refused_json(nested(MAX_JSON_DEPTH + 1))
    assert "nested deeper than 100" in refused_json(b'{"a":' * MAX_JSON_DEPTH + b"{}" + b"}" * MAX_JSON_DEPTH)


@pytest.mark.parametrize("depth", [2_400, 2_475, 2_479, 2_600, 100_000])
def test_deep_nesting_is_refused_before_the_parser_recurses(depth: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The depth is measured by a scan, not by recursion: the JSON parser never sees the document."""

    def no_parse(*args: Any, **kw: Any) -> Any:
        raise AssertionError("the parser was called")

    class NoDecoder:
        decode = raw_decode = staticmethod(no_parse)

    monkeypatch.setattr(json, "loads", no_parse)
    monkeypatch.setattr(decode_module, "_DECODER", NoDecoder())  # what parse_json decodes with
    monkeypatch.setattr(decode_module, "_PLAIN", NoDecoder())
    assert "nested deeper" in refused_json(nested(depth))
    assert "nested deeper" in refused_json(b'{"a":' * depth + b"1" + b"}" * depth)
    assert "nested deeper" in refused_json(b"[" * depth)  # never closed


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = json.dumps({"s": "[{" * 500, "t": '\\"[[[' * 200, "u": ["]]]]" * 300]})
    assert parse_json(text.encode())["s"] == "[{" * 500
    wide = json.dumps([[{"a": [i]}] for i in range(500)])  # 2,000 containers, 4 deep
    assert len(parse_json(wide.encode())) == 500


@pytest.mark.parametrize("raw", [b"[NaN]", b'{"a": Infinity}', b"[-Infinity]", b"[1e400]", b"[-1e999]"])
def test_non_finite_numbers_are_malformed(raw: bytes) -> None:
    refused_json(raw)


@pytest.mark.parametrize(
    "raw", [b"[18446744073709551616]", b"[-9223372036854775809]", b"[" + b"9" * 5_000 + b"]", b"[-" + b"1" * 400 + b"]"]
)
def test_integers_beyond_64_bits_are_malformed_without_converting_them(raw: bytes) -> None:
    assert "does not fit in 64 bits" in refused_json(raw)


def test_64_bit_integers_and_ordinary_floats_are_taken() -> None:
    assert parse_json(b"[18446744073709551615, -9223372036854775808, 0, -0, 1.5e300, 1e-400]") == [
        2**64 - 1,
        -(2**63),
        0,
        0,
        1.5e300,
        0.0,
    ]


@pytest.mark.parametrize("raw", [b"\xff", b'{"a": "\xc3"}', b"\xed\xa0\x80", b"", b"  ", b"{", b"[1,]", b"\x00"])
def test_bytes_that_are_not_json_are_malformed(raw: bytes) -> None:
    refused_json(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"name": "order.created\\ud800"}',
        b'{"\\udc00": 1}',
        b'["\\ud83d"]',
        b'"\xed\xa0\x80"',
        '"\ud800"'.encode("utf-16", "surrogatepass"),
    ],
)
def test_a_lone_surrogate_is_malformed_a_pair_is_a_character(raw: bytes) -> None:
    refused_json(raw)
    assert parse_json(b'["\\ud83d\\ude00", "\\\\ud800"]') == ["\U0001f600", "\\ud800"]


def test_utf16_and_a_utf8_byte_order_mark_are_read_as_json_allows() -> None:
    assert parse_json('{"a": "é"}'.encode("utf-16")) == {"a": "é"}
    assert parse_json(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}


@pytest.mark.parametrize("form", ["envelope", "raw", "cloudevents"])
@pytest.mark.parametrize(
    "raw",
    [nested(2_500), b'{"name": "n", "payload": {"x": NaN}}', b'{"name": "n", "payload": {"x": 1' + b"0" * 30 + b"}}"],
)
def test_every_format_refuses_what_parse_json_refuses(raw: bytes, form: str) -> None:
    assert rejected(msg(raw=raw), fmt(format=form, name="n")) == "malformed"


def test_kept_headers_longer_than_the_limit_are_left_out() -> None:
    meta = header_metadata({"traceparent": "t" * (MAX_KEPT_VALUE + 1), "x-request-id": "r" * MAX_KEPT_VALUE})
    assert meta["headers"] == {"x-request-id": "r" * MAX_KEPT_VALUE} and "traceparent" not in meta


# --- CloudEvents data: data_base64 and content types ------------------------------------------

DATA = {"orderId": "A1"}
B64 = base64.b64encode(json.dumps(DATA).encode()).decode()


def structured(**data: Any) -> Message:
    return msg({**CE, **data}, content_type="application/cloudevents+json")


@pytest.mark.parametrize(
    "content_type", [None, "application/json", "Application/JSON; charset=utf-8", "application/vnd.shop.order+json"]
)
def test_structured_data_base64_of_json_is_decoded_into_the_payload(content_type: str | None) -> None:
    extra = {"datacontenttype": content_type} if content_type else {}
    event = decode(structured(data_base64=B64, **extra), fmt(format="cloudevents"))
    assert event.payload == DATA
    as_array = base64.b64encode(b"[1, 2]").decode()
    assert decode(structured(data_base64=as_array, **extra), fmt(format="cloudevents")).payload == {"data": [1, 2]}
    assert decode(structured(data_base64="", **extra), fmt(format="cloudevents")).payload == {}


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream", "image/png", "application/xml"])
def test_structured_data_base64_of_anything_else_is_kept_as_it_came(content_type: str) -> None:
    encoded = base64.b64encode(b"\x89PNG\x00\xff").decode()
    event = decode(structured(data_base64=encoded, datacontenttype=content_type), fmt(format="cloudevents"))
    assert event.payload == {"data_base64": encoded, "datacontenttype": content_type}
    assert event.metadata["cloudevents"]["datacontenttype"] == content_type


@pytest.mark.parametrize(
    "data",
    [
        {"data_base64": "not base64!"},
        {"data_base64": 5},
        {"data_base64": B64, "data": {"a": 1}},  # one or the other
        {"data_base64": base64.b64encode(b"not json").decode()},  # JSON by its (absent) content type
        {"data_base64": base64.b64encode(nested(2_500)).decode()},  # decoded JSON is bounded too
        {"data_base64": B64, "datacontenttype": 7},
    ],
)
def test_bad_data_base64_is_malformed_never_an_empty_payload(data: dict[str, Any]) -> None:
    assert rejected(structured(**data), fmt(format="cloudevents")) == "malformed"


def test_structured_data_with_a_non_json_content_type_is_json_already_and_kept_as_data() -> None:
    event = decode(structured(data="hello", datacontenttype="text/plain"), fmt(format="cloudevents"))
    assert event.payload == {"data": "hello"}


def binary(body: bytes, content_type: str | None = None, **attrs: str) -> Message:
    return msg(raw=body, ce_attributes={**{k: str(v) for k, v in CE.items()}, **attrs}, content_type=content_type)


@pytest.mark.parametrize("content_type", ["text/plain; charset=utf-8", "application/octet-stream", "application/xml"])
def test_binary_data_of_a_non_json_content_type_is_kept_as_base64(content_type: str) -> None:
    body = b"<order id='A1'/>\xff\x00"
    expected = {"data_base64": base64.b64encode(body).decode(), "datacontenttype": content_type}
    assert decode(binary(body, datacontenttype=content_type), fmt(format="cloudevents")).payload == expected
    # the transport's content type is the datacontenttype when the attributes name none
    event = decode(binary(body, content_type), fmt(format="cloudevents"))
    assert event.payload == expected and event.metadata["cloudevents"]["datacontenttype"] == content_type


@pytest.mark.parametrize("content_type", [None, "application/json", "application/cloudevents+json", "text/x+json"])
def test_binary_data_of_json_is_parsed_and_bad_json_is_malformed(content_type: str | None) -> None:
    extra = {"datacontenttype": content_type} if content_type else {}
    assert decode(binary(json.dumps(DATA).encode(), **extra), fmt(format="cloudevents")).payload == DATA
    assert rejected(binary(b"<xml/>", **extra), fmt(format="cloudevents")) == "malformed"


def test_is_json_media() -> None:
    json_types = [None, "", " ", "application/json", "application/problem+json; x=1", "APPLICATION/JSON"]
    assert all(map(is_json_media, json_types))
    assert not any(map(is_json_media, ["text/plain", "json", "+json", "application/jsonl", "text/json-seq"]))


# --- over HTTP: the events API goes through decode too ------------------------------------------


def http(headers: dict[str, str], body: bytes) -> Any:
    return http_parse(headers, body, {}, None, max_batch=10)


def test_http_structured_cloudevent_data_base64_is_decoded_or_kept() -> None:
    ce = {**CE, "data_base64": B64}
    assert http({"content-type": CE_STRUCTURED}, json.dumps(ce).encode()).payload == DATA
    kept = {**ce, "datacontenttype": "application/octet-stream"}
    event = http({"content-type": CE_STRUCTURED}, json.dumps(kept).encode())
    assert event.payload == {"data_base64": B64, "datacontenttype": "application/octet-stream"}
    [item] = http({"content-type": "application/cloudevents-batch+json"}, json.dumps([ce]).encode())
    assert item.payload == DATA


def test_http_binary_cloudevent_with_json_data_is_parsed() -> None:
    headers = {f"ce-{k}": v for k, v in CE.items()} | {"content-type": "application/json"}
    assert http(headers, json.dumps(DATA).encode()).payload == DATA


def test_http_binary_cloudevent_with_non_json_data_is_kept_as_base64() -> None:
    headers = {f"ce-{k}": v for k, v in CE.items()} | {"content-type": "text/plain"}
    event = http(headers, b"hello")
    assert event.payload == {"data_base64": base64.b64encode(b"hello").decode(), "datacontenttype": "text/plain"}
