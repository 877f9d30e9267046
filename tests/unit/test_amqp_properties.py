"""Inputs nobody thought of, for the RabbitMQ adapter: hypothesis makes deliveries (any body,
header tables of every AMQP type and shape, CloudEvents headers, properties or none) and checks
that delivery → Message → event is an event or a typed refusal in every format, never another
exception, and that a refused delivery's dead-letter copy encodes into one frame."""

from __future__ import annotations

import importlib.util
import json
import struct
import tracemalloc
from datetime import datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import decode as pamqp_decode
from pamqp import encode as pamqp_encode
from pamqp.header import ContentHeader

from adapters import amqp_parse
from bridge.config import AmqpConsumer, EventFormat
from bridge.errors import EventRejected
from bridge.event import EventSignal
from tests.unit.test_amqp_parse import FakeDelivery
from tests.unit.test_decode_properties import bodies, check_event, formats
from tests.unit.test_kafka_properties import rejections

EXAMPLES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FRAME_MAX = 128 * 1024

# What pamqp decodes a header table into (and so what the adapter meets).
field_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.decimals(allow_nan=False, allow_infinity=False, places=2, min_value=-(10**6), max_value=10**6)
    | st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2100, 1, 1)).map(
        lambda d: d.replace(microsecond=0)
    )
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)
header_names = st.sampled_from(
    ["cloudEvents_id", "cloudEvents:source", "cloudEvents_type", "cloudEvents_specversion", "traceparent", "x-name"]
) | st.text(max_size=10)
deliveries = st.builds(
    FakeDelivery,
    body=bodies,
    routing_key=st.none() | st.text(max_size=12),
    exchange=st.none() | st.text(max_size=12),
    headers=st.none() | st.dictionaries(header_names, field_values, max_size=8),
    content_type=st.none() | st.sampled_from(["application/json", "application/cloudevents+json", "text/plain"]),
    message_id=st.none() | st.text(max_size=12),
    correlation_id=st.none() | st.text(max_size=12),
    timestamp=st.none() | st.datetimes(),
)


@EXAMPLES
@given(d=deliveries, form=formats)
def test_any_delivery_is_an_event_or_a_typed_refusal(d: FakeDelivery, form: EventFormat) -> None:
    message = amqp_parse.to_message(d, "q")  # never raises: whatever the publisher sent
    json.dumps(message.metadata, allow_nan=False)
    entry = AmqpConsumer(url="amqp://x/", queue="q", event=form)
    try:
        event = amqp_parse.parse(d, entry)
    except EventRejected as exc:
        assert exc.reason in ("malformed", "no_name")
        return
    check_event(event)


big_text = st.integers(min_value=0, max_value=200_000).map(lambda n: "t" * n)
big_headers = st.dictionaries(
    st.text(max_size=200),
    field_values | big_text | st.integers(min_value=0, max_value=100_000).map(lambda n: b"b" * n),
    max_size=40,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    headers=big_headers,
    error=rejections,
    named=st.none() | st.tuples(big_text, big_text),
    extra=st.lists(st.tuples(st.text(min_size=1, max_size=8), big_text), max_size=30),
)
def test_a_dead_letter_copy_always_fits_one_frame(
    headers: dict[str, Any], error: EventRejected, named: tuple[str, str] | None, extra: list[tuple[str, str]]
) -> None:
    headers = {**headers, **dict(extra)}
    d = FakeDelivery(body=b"{}", headers=headers, message_id="m", timestamp=datetime(2024, 1, 1))
    event = EventSignal(id=named[0] or "i", name=named[1] or "n", payload={}, source="amqp:q") if named else None
    copy = amqp_parse.dead_letter_copy(d, error, "q", event)  # type: ignore[arg-type]
    assert len(ContentHeader(0, len(copy.body), copy.properties).marshal()) < FRAME_MAX // 2
    assert copy.headers["x-dead-letter-reason"] == error.reason


def _pamqp_as_shipped() -> Any:
    """pamqp's decode module as it ships, before adapters.amqp_parse replaced its table reader."""
    spec = importlib.util.spec_from_file_location("pamqp_decode_as_shipped", pamqp_decode.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SHIPPED = _pamqp_as_shipped()


writable = st.recursive(  # what pamqp writes: byte arrays as bytearray
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, width=32)  # pamqp writes a float in single precision
    | st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2100, 1, 1)).map(
        lambda d: d.replace(microsecond=0)
    )
    | st.text(max_size=20)
    | st.binary(max_size=20).map(bytearray),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)


@EXAMPLES
@given(table=st.dictionaries(st.text(max_size=10), writable, max_size=8))
def test_header_tables_read_in_one_pass_as_pamqp_reads_them(table: dict[str, Any]) -> None:
    """The adapter's own table reader (one pass, not a copy of the rest of the frame per field)
    reads every table pamqp writes as pamqp's reader does."""
    data = pamqp_encode.field_table(table)
    assert pamqp_decode.field_table(data) == SHIPPED.field_table(data)
    array = pamqp_encode.field_array(list(table.values()))
    assert pamqp_decode.field_array(array) == SHIPPED.field_array(array)


@st.composite
def damaged_tables(draw: st.DrawFn) -> bytes:
    """A table pamqp writes, then damaged: bytes overwritten, the frame cut or run on. Plain random
    bytes almost never get past the table's 4-byte length, so they alone test nothing else."""
    data = bytearray(pamqp_encode.field_table(draw(st.dictionaries(st.text(max_size=10), writable, max_size=6))))
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut] if draw(st.booleans()) else data) + draw(st.binary(max_size=8))


@EXAMPLES
@given(data=damaged_tables() | st.binary(max_size=300))
def test_any_bytes_as_a_header_table_are_a_table_or_a_value_error(data: bytes) -> None:
    try:
        used, table = pamqp_decode.field_table(data)
    except ValueError:
        return
    assert isinstance(table, dict) and 4 <= used <= len(data)


def _overrunning(size: int) -> bytes:
    """A header table of units: a key, then a 6-byte table whose one long string claims the rest of
    the frame. Each string runs past its table; pamqp read on into the bytes after it, which were
    then read again as the next units: time and memory quadratic in the frame's size."""
    unit = 3 + 1 + 4 + 6
    n = size // unit
    out = bytearray()
    for i in range(n):
        out += struct.pack(">BH", 2, i) + b"F" + struct.pack(">I", 6) + b"\x00S"
        out += struct.pack(">I", n * unit - (len(out) + 4))
    return struct.pack(">I", len(out)) + bytes(out)


def test_a_value_that_runs_past_its_table_ends_what_is_read_of_it_and_costs_no_more() -> None:
    """One frame of 128 KB held 9,142 headers of 560 MiB, read in 1.6 s (measured by memory here,
    not time). RabbitMQ refuses such a frame; the adapter must not depend on it."""
    tracemalloc.start()
    try:
        used, table = pamqp_decode.field_table(_overrunning(128_000))
        retained = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert used == 4 + 128_000 // 14 * 14 and len(table) == 128_000 // 14
    assert retained < 16 * 2**20, f"{len(table)} headers hold {retained / 2**20:.0f} MiB"


def test_a_string_that_claims_more_than_its_array_holds_is_not_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each such string was copied (and decoded) up to the end of the frame before its overrun was
    seen: a frame of 13,000 of them, each in an array of its own, cost time quadratic in its size.
    Counted in bytes handed to the string reader, not timed."""
    fields = pamqp_decode.field_array.__self__  # type: ignore[attr-defined]
    handed = 0
    real = fields.long_str

    def counting(value: bytes) -> Any:
        nonlocal handed
        handed += len(value)
        return real(value)

    monkeypatch.setattr(fields, "long_str", counting)
    unit = b"A" + struct.pack(">I", 5) + b"S" + struct.pack(">I", 0x7F7F7F7F)
    out = unit * 12_800
    used, items = pamqp_decode.field_array(struct.pack(">I", len(out)) + out)
    assert used == 4 + len(out) and items == [[]] * 12_800
    assert handed < 4 * len(out)
