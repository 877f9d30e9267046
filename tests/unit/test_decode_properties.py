"""Inputs nobody thought of, for the decoder every adapter shares: hypothesis makes bodies (any
bytes, JSON of every shape and depth, NaN, huge integers, envelopes, CloudEvents with ``data`` or
``data_base64``), headers, CloudEvents attributes and content types, and checks that every format
(envelope, raw, CloudEvents structured and binary) answers with an event Temporal can encode or a
typed :class:`EventRejected`, never another exception. The JSON limits are checked against a
plain recursive measure."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge import decode as decode_module
from bridge.config import EventFormat
from bridge.decode import (
    CE_STRUCTURED,
    MAX_JSON_DEPTH,
    Message,
    decode,
    is_json_media,
    json_depth_exceeds,
    parse_json,
)
from bridge.errors import EventRejected
from bridge.event import EventSignal

EXAMPLES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DECODE_REASONS = {"malformed", "no_name"}


def json_of(numbers: st.SearchStrategy[Any], leaves: int = 20) -> st.SearchStrategy[Any]:
    text = st.text(max_size=12) | st.sampled_from(['"', "\\", "[", "]", "{", "}", '\\"', "\\\\", "\ud800"])
    return st.recursive(
        st.none() | st.booleans() | numbers | text,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
        max_leaves=leaves,
    )


taken_numbers = st.floats(allow_nan=False, allow_infinity=False) | st.integers(min_value=-(2**63), max_value=2**64 - 1)
wild_numbers = st.floats() | st.integers() | st.integers(min_value=2**64, max_value=10**400)
json_values = json_of(taken_numbers)
wild_json = json_of(wild_numbers)


def deep(depth: int, opener: str) -> str:
    """Arrays or objects nested ``depth`` deep (the SDK's encoder failed near 2,475)."""
    return "[" * depth + "]" * depth if opener == "[" else '{"k":' * depth + "1" + "}" * depth


deep_documents = st.builds(deep, st.integers(min_value=90, max_value=3_000), st.sampled_from(["[", "{"]))
CE_ATTRIBUTES = ("specversion", "id", "source", "type", "time", "subject", "datacontenttype", "dataschema")
content_types = st.none() | st.sampled_from(
    ["application/json", "text/plain", "application/x+json", CE_STRUCTURED, f"{CE_STRUCTURED}; charset=utf-8", ""]
)
base64_data = st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()) | json_values.map(
    lambda v: base64.b64encode(json.dumps(v).encode()).decode()
)
cloudevents = st.fixed_dictionaries(
    {},
    optional={
        **{a: st.text(max_size=10) | json_values for a in CE_ATTRIBUTES},
        "datacontenttype": content_types | json_values,
        "data": json_values,
        "data_base64": base64_data | st.text(max_size=12) | json_values,
    },
)
complete_cloudevents = st.fixed_dictionaries(
    {a: st.text(min_size=1, max_size=6) for a in ("specversion", "id", "source", "type")},
    optional={
        "datacontenttype": content_types,
        "data": json_values,
        "data_base64": base64_data | st.text(max_size=6),
        "time": st.text(max_size=6),
    },
)
base64_cloudevents = st.fixed_dictionaries(
    {
        **{a: st.just(v) for a, v in {"specversion": "1.0", "id": "i", "source": "/s", "type": "t"}.items()},
        "data_base64": base64_data,
        "datacontenttype": content_types | st.text(max_size=8),
    }
)
envelopes = st.fixed_dictionaries(
    {}, optional={"name": st.text(max_size=12) | json_values, "payload": wild_json, "id": json_values}
)
documents = wild_json | envelopes | cloudevents | complete_cloudevents | st.lists(envelopes | cloudevents, max_size=3)
bodies = (
    st.binary(max_size=200)
    | documents.map(lambda d: json.dumps(d).encode("utf-8", "surrogatepass"))
    | deep_documents.map(str.encode)
)
header_text = st.text(max_size=24)
headers = st.dictionaries(st.sampled_from(["x-name", "x-id", "traceparent", "X-Correlation-Id", "other"]), header_text)
ce_attributes = st.dictionaries(st.sampled_from(CE_ATTRIBUTES), header_text, max_size=8)
locators = st.none() | st.sampled_from(["header:x-name", "header:x-id", "field:name", "field:a.b", "key"])
formats = st.builds(
    lambda form, name, name_from, id_from: EventFormat(format=form, name=name, name_from=name_from, id_from=id_from),
    st.sampled_from(["envelope", "raw", "cloudevents"]),
    st.none() | st.text(max_size=8),
    locators,
    locators,
)
messages = st.builds(
    Message,
    body=bodies,
    source=st.sampled_from(["kafka:orders", "amqp:q", "http"]),
    fallback_id=st.text(min_size=1, max_size=12),
    headers=headers,
    ce_attributes=st.just({}) | ce_attributes,
    content_type=content_types | header_text,
    key=st.none() | st.text(max_size=10),
    metadata=st.just({}),
    time=st.none() | st.text(max_size=10),
)


def depth_of(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    return 0


def check_event(event: EventSignal) -> None:
    """What every later step relies on: text names and ids, an object payload, and a document
    the Temporal SDK's encoder (strict JSON, bounded depth) can write."""
    assert isinstance(event.id, str) and event.id
    assert isinstance(event.name, str) and event.name
    assert isinstance(event.payload, dict)
    assert all(isinstance(v, str) for v in event.metadata.get("cloudevents", {}).values())
    json.dumps(event.to_dict(), allow_nan=False, separators=(",", ":"), sort_keys=True)
    assert utf8(event.to_dict())  # every string is text UTF-8 can carry: ids, names, run ids, answers
    assert depth_of(event.payload) <= MAX_JSON_DEPTH


@EXAMPLES
@given(message=messages, form=formats)
def test_any_message_in_any_format_is_an_event_or_a_typed_refusal(message: Message, form: EventFormat) -> None:
    try:
        event = decode(message, form)
    except EventRejected as exc:
        assert exc.reason in DECODE_REASONS and exc.message
        return
    check_event(event)


@EXAMPLES
@given(
    ce=cloudevents | complete_cloudevents | base64_cloudevents,
    content_type=st.sampled_from([CE_STRUCTURED, f"{CE_STRUCTURED}; charset=utf-8"]),
)
def test_a_structured_cloudevent_keeps_its_data_or_is_refused(ce: dict[str, Any], content_type: str) -> None:
    body = json.dumps(ce).encode("utf-8", "surrogatepass")
    message = Message(body=body, source="s", fallback_id="f", content_type=content_type)
    try:
        event = decode(message, EventFormat(format="raw", name="ignored"))
    except EventRejected as exc:
        assert exc.reason == "malformed"
        return
    check_event(event)
    media = ce.get("datacontenttype")
    if "data_base64" not in ce:
        assert event.payload == _as_payload(ce.get("data"))
    elif not is_json_media(media):
        assert event.payload == {"data_base64": ce["data_base64"], "datacontenttype": media}
    else:
        raw = base64.b64decode(ce["data_base64"])
        assert event.payload == (_as_payload(json.loads(raw)) if raw else {})


@EXAMPLES
@given(attrs=ce_attributes, body=bodies, content_type=content_types)
def test_a_binary_cloudevent_keeps_its_data_or_is_refused(
    attrs: dict[str, str], body: bytes, content_type: str | None
) -> None:
    attrs = {"specversion": "1.0", "id": "i", "source": "/s", "type": "t", **attrs}
    content_type = None if (content_type or "").startswith(CE_STRUCTURED) else content_type  # that is structured
    message = Message(body=body, source="s", fallback_id="f", ce_attributes=attrs, content_type=content_type)
    try:
        event = decode(message, EventFormat(format="cloudevents"))
    except EventRejected as exc:
        assert exc.reason == "malformed"
        return
    check_event(event)
    media = attrs["datacontenttype"] if "datacontenttype" in attrs else content_type
    if not body:
        assert event.payload == {}
    elif is_json_media(media):
        assert event.payload == _as_payload(json.loads(body))
    else:  # kept, never dropped
        assert event.payload == {"data_base64": base64.b64encode(body).decode(), "datacontenttype": media}


def _as_payload(data: Any) -> dict[str, Any]:
    return {} if data is None else data if isinstance(data, dict) else {"data": data}


@EXAMPLES
@given(
    value=json_of(taken_numbers, leaves=60)
    | st.recursive(st.just(1), lambda x: st.lists(x, max_size=2), max_leaves=300)
)
def test_parse_json_takes_what_fits_and_measures_depth_exactly(value: Any) -> None:
    text = json.dumps(value)  # lone surrogates come out escaped, as \\ud800
    assert json_depth_exceeds(text) == (depth_of(value) > MAX_JSON_DEPTH)
    assert json_depth_exceeds(text, limit=3) == (depth_of(value) > 3)
    if depth_of(value) > MAX_JSON_DEPTH:
        return
    if utf8(value):
        assert parse_json(text.encode()) == value
    else:
        with pytest.raises(EventRejected, match="lone surrogate"):
            parse_json(text.encode())


def utf8(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


@EXAMPLES
@given(raw=st.binary(max_size=300) | wild_json.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")))
def test_parse_json_is_a_value_or_malformed(raw: bytes) -> None:
    try:
        value = parse_json(raw)
    except EventRejected as exc:
        assert exc.reason == "malformed"
        return
    json.dumps(value, allow_nan=False)
    assert depth_of(value) <= MAX_JSON_DEPTH


_EDGES = [-(2**63), -(2**63) - 1, -(10**19) + 1, -(10**18) + 1, 10**18 - 1, 10**19 - 1, 2**64 - 1, 2**64, -(10**20)]
_NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(_EDGES).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.tuples(st.integers(-99, 99), st.integers(-400, 400)).map(lambda p: f"{p[0]}e{p[1]}"),
    st.tuples(st.integers(1, 9), st.integers(0, 400)).map(lambda p: f"{p[0]}E+{p[1]:03d}"),
)


@given(st.lists(_NUMBERS, max_size=20))
def test_numbers_are_taken_or_refused_as_the_checking_decoder_would(numbers: list[str]) -> None:
    """A text with no long digit run and no three-digit exponent skips the per-number checks;
    whatever the numbers, the answer is the one the checking decoder gives."""
    raw = ("[" + ",".join(numbers) + "]").encode()
    try:
        expected: object = decode_module._DECODER.decode(raw.decode())
    except ValueError:
        expected = "refused"
    try:
        got: object = parse_json(raw)
    except EventRejected:
        got = "refused"
    assert got == expected
