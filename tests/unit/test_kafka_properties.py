"""Inputs nobody thought of, for the Kafka adapter: hypothesis makes records (any value, key and
headers, null ones included, timestamps out of any calendar, CloudEvents headers) and checks that
record → Message → event is an event or a typed refusal in every format, never another exception,
and that a refused record's dead letter always fits what the producer may send."""

from __future__ import annotations

import json
from typing import Any

from aiokafka.structs import ConsumerRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters import kafka_parse
from bridge.config import EventFormat
from bridge.errors import EventRejected
from bridge.event import EventSignal
from tests.unit.test_decode_properties import bodies, check_event, formats

EXAMPLES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

header_names = st.sampled_from(
    ["ce_id", "ce_source", "ce_type", "ce_specversion", "ce_time", "ce_", "content-type", "traceparent", "x-name"]
) | st.text(max_size=10)
header_values = st.none() | st.binary(max_size=40) | st.sampled_from([b"1.0", b"application/cloudevents+json", b"e"])
records = st.builds(
    lambda value, key, headers, stamp, offset: ConsumerRecord(
        topic="orders",
        partition=0,
        offset=offset,
        timestamp=stamp,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=len(key or b""),
        serialized_value_size=len(value or b""),
        headers=headers,
    ),
    st.none() | bodies,
    st.none() | st.binary(max_size=20),
    st.lists(st.tuples(header_names, header_values), max_size=8),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=0, max_value=2**63 - 1),
)
rejections = st.builds(
    EventRejected,
    st.sampled_from(["malformed", "no_name", "schema_invalid", "unroutable", "too_large"]),
    st.text(max_size=2_000),
)


@EXAMPLES
@given(record=records, form=formats)
def test_any_record_is_an_event_or_a_typed_refusal(record: ConsumerRecord[Any, Any], form: EventFormat) -> None:
    message = kafka_parse.to_message(record)  # never raises: whatever the producer wrote
    json.dumps(message.metadata, allow_nan=False)
    try:
        event = kafka_parse.parse(record, form)
    except EventRejected as exc:
        assert exc.reason in ("malformed", "no_name")
        return
    check_event(event)


big_values = st.integers(min_value=0, max_value=1_200_000).map(lambda n: b"v" * n)
big_headers = st.lists(
    st.tuples(st.text(max_size=300), st.none() | st.integers(min_value=0, max_value=200_000).map(lambda n: b"h" * n)),
    max_size=12,
)
texts = st.text(max_size=5) | st.integers(min_value=0, max_value=400_000).map(lambda n: "n" * n)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    value=st.none() | big_values,
    key=st.none() | st.integers(min_value=0, max_value=100_000).map(lambda n: b"k" * n),
    headers=big_headers,
    error=rejections,
    named=st.none() | st.tuples(texts, texts),
    budget=st.sampled_from([kafka_parse.LETTER_BYTES, kafka_parse.LETTER_BYTES // 4, 64 * 1024]),
)
def test_a_dead_letter_always_fits_its_budget_and_says_what_was_cut(
    value: bytes | None,
    key: bytes | None,
    headers: list[tuple[str, bytes | None]],
    error: EventRejected,
    named: tuple[str, str] | None,
    budget: int,
) -> None:
    record: ConsumerRecord[Any, Any] = ConsumerRecord(
        "orders", 1, 7, 0, 0, key, value, None, len(key or b""), len(value or b""), headers
    )
    event = EventSignal(id=named[0] or "i", name=named[1] or "n", payload={}, source="kafka:orders") if named else None
    letter = kafka_parse.dead_letter(record, error, event, budget)
    assert letter.size <= budget <= kafka_parse.MAX_REQUEST_BYTES
    assert letter.value is not None or letter.key is not None  # what the producer requires
    trimmed = dict(letter.headers).get("x-dead-letter-trimmed")
    assert (trimmed or b"").decode().split(",") == (list(letter.trimmed) or [""])
    if "value" not in letter.trimmed:
        assert letter.value == (value if value is not None or key is not None else b"")
    assert dict(letter.headers)["x-dead-letter-reason"] == error.reason.encode()
