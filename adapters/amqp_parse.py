"""RabbitMQ deliveries ↔ the bridge: a delivery → :class:`bridge.decode.Message`, a refused
delivery → its dead-letter copy. No aio-pika type goes further than this module and
:mod:`adapters.amqp`.

Whatever a publisher sent (any body, header tables of any shape and type, properties or none)
becomes a Message; what it decodes to is :mod:`bridge.decode`'s business. A dead-letter copy keeps
the delivery as it came, but its headers are capped (:func:`bridge.deadletter.fit_headers`) so
the copy always fits in one frame, and ``x-dead-letter-trimmed: headers`` says when they were.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol, TypeVar

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from pamqp import base as pamqp_base
from pamqp import decode as pamqp_decode

from bridge.config import AmqpConsumer
from bridge.deadletter import H_ORIGINAL, H_TRIMMED, MAX_HEADER_VALUE, cut_text, fit_headers, stale
from bridge.deadletter import dead_letter_headers as letter_headers
from bridge.decode import Message, decode, header_metadata
from bridge.errors import EventRejected
from bridge.event import MAX_SIGNAL_BYTES, EventSignal, content_digest

ADAPTER = "amqp"
CE_PREFIXES = ("cloudevents_", "cloudevents:")
KEPT_PROPERTIES = ("message_id", "correlation_id", "app_id", "type", "user_id")


T = TypeVar("T")

_FIXED = {b"t": 1, b"b": 1, b"B": 1, b"s": 2, b"u": 2, b"I": 4, b"i": 4, b"l": 8, b"L": 8, b"f": 4, b"d": 8}
_FIXED |= {b"D": 5, b"T": 8, b"V": 0, b"\x00": 0}
"""Bytes after the type octet of each field value of fixed size (pamqp's TABLE_MAPPING)."""

MAX_TABLE_DEPTH = 32
"""Header tables and arrays nested deeper than this are read as empty: pamqp recurses, and a
table nested thousands deep (it fits a frame) would fail the frame like the rest below."""


def read_what_pamqp_refuses() -> None:
    """Make aio-pika's codec (pamqp) read what a publisher can send and RabbitMQ passes on: a
    short string that is not UTF-8 (a ``message_id``, a header's name), a timestamp no
    ``datetime`` holds, tables nested past the recursion limit. pamqp refuses the whole frame for
    any of them, aiormq closes the connection, and the delivery comes back for ever: the queue
    stalls. They are read instead as text with ``\\xNN`` in place of each byte that is not UTF-8
    (not U+FFFD: two binary ids would then read alike, and the second event would be taken for
    the first and start nothing), as no timestamp, and as empty past :data:`MAX_TABLE_DEPTH`.
    Header tables and arrays are read in one pass: pamqp copies the rest of the frame for each
    field, so a frame of 100 KiB of tiny fields took half a second of the event loop.

    Past pamqp, aio-pika refuses a ``delivery_mode`` other than 1 or 2 and an ``expiration`` that
    is not a number, which RabbitMQ 4 passes on unchecked (an AMQP 1.0 publisher's annotations
    become them): it raises before the adapter is called, the delivery stays unacked and holds a
    prefetch slot, and enough of them stop the queue. They are read as not set. Idempotent."""
    if getattr(pamqp_decode.short_str, "tolerant", False):
        return
    short_str, timestamp = pamqp_decode.short_str, pamqp_decode.timestamp

    def tolerant_short_str(value: bytes) -> tuple[int, str]:
        try:
            return short_str(value)
        except UnicodeDecodeError:
            return value[0] + 1, value[1 : value[0] + 1].decode("utf-8", "backslashreplace")

    def tolerant_timestamp(value: bytes) -> tuple[int, Any]:
        try:
            return timestamp(value)
        except (ValueError, OverflowError, OSError):
            if len(value) < 8:
                raise
            return 8, None

    fields = _Fields({**{kind: pamqp_decode.TABLE_MAPPING[kind] for kind in _FIXED}, b"T": tolerant_timestamp})
    tolerant_short_str.tolerant = True  # type: ignore[attr-defined]
    replaced = {
        "short_str": tolerant_short_str,
        "timestamp": tolerant_timestamp,
        "field_table": fields.table,
        "field_array": fields.array,
    }
    for name, function in replaced.items():
        setattr(pamqp_decode, name, function)
    pamqp_decode.TABLE_MAPPING.update({b"T": tolerant_timestamp, b"F": fields.table, b"A": fields.array})
    pamqp_decode.METHODS.update(
        shortstr=tolerant_short_str, timestamp=tolerant_timestamp, table=fields.table, array=fields.array
    )
    _read_properties_aio_pika_refuses()


class _Overrun(ValueError):
    """A field value, table or array that runs past the table or array it is in (or the frame)."""


class _Fields:
    """Header tables and arrays read in one pass over the frame, with names that are not UTF-8
    read as text, and as empty past :data:`MAX_TABLE_DEPTH`. pamqp's own reader copies the rest of
    the frame for each field: 100 KiB of tiny fields took half a second of the event loop. A value
    is read within its table or array: one that runs past it ends what is read of that table or
    array (pamqp read on into the bytes after, which were then read again as the next fields)."""

    def __init__(self, scalars: dict[bytes, Callable[[bytes], tuple[int, Any]]]) -> None:
        self.scalars = scalars
        self.long_str, self.byte_array = pamqp_decode.long_str, pamqp_decode.byte_array

    def table(self, value: bytes) -> tuple[int, dict[str, Any]]:
        return self._whole(self._table_at, value)

    def array(self, value: bytes) -> tuple[int, list[Any]]:
        return self._whole(self._array_at, value)

    @staticmethod
    def _whole(read: Callable[[bytes, int, int, int], tuple[int, T]], value: bytes) -> tuple[int, T]:
        """``read`` from the frame's start, failing only with ValueError, as pamqp's readers do."""
        try:
            buf = bytes(value)
            return read(buf, 0, 0, len(buf))
        except (struct.error, TypeError, IndexError) as exc:
            raise ValueError("Could not unpack data") from exc

    def _value_at(self, buf: bytes, at: int, depth: int, limit: int) -> tuple[int, Any]:
        """The field value whose type octet is at ``buf[at]``, and the offset after it."""
        kind, at = buf[at : at + 1], at + 1
        if kind == b"F":
            return self._table_at(buf, at, depth + 1, limit)
        if kind == b"A":
            return self._array_at(buf, at, depth + 1, limit)
        if kind in (b"S", b"x"):  # a length, then that many bytes: only those are sliced
            length = int.from_bytes(buf[at : at + 4], "big")
            if at + 4 + length > limit:  # before the bytes are copied (and a string decoded)
                raise _Overrun("Field value exceeds its table or array")
            used, value = (self.long_str if kind == b"S" else self.byte_array)(buf[at : at + 4 + length])
        elif kind in _FIXED:
            used, value = self.scalars[kind](buf[at : at + _FIXED[kind]])
        else:
            raise ValueError(f"Unknown type: {kind!r}")
        if at + used > limit:
            raise _Overrun("Field value exceeds its table or array")
        return at + used, value

    @staticmethod
    def _bounds(buf: bytes, at: int, what: str, limit: int) -> int:
        end = at + 4 + int.from_bytes(buf[at : at + 4], "big")
        if at + 4 > limit or end > limit:
            raise _Overrun(f"Field {what} length exceeds available data")
        return end

    def _table_at(self, buf: bytes, at: int, depth: int, limit: int) -> tuple[int, dict[str, Any]]:
        end = self._bounds(buf, at, "table", limit)
        table: dict[str, Any] = {}
        if depth >= MAX_TABLE_DEPTH:
            return end, table
        at += 4
        while at < end:
            length = buf[at]
            if at + 1 + length > end:
                raise ValueError("Field table key length exceeds data")
            name = buf[at + 1 : at + 1 + length].decode("utf-8", "backslashreplace")
            try:
                at, table[name] = self._value_at(buf, at + 1 + length, depth, end)
            except _Overrun:  # RabbitMQ refuses such a frame; the rest of this table is left out
                break
        return end, table

    def _array_at(self, buf: bytes, at: int, depth: int, limit: int) -> tuple[int, list[Any]]:
        end = self._bounds(buf, at, "array", limit)
        if depth >= MAX_TABLE_DEPTH:
            return end, []
        items: list[Any] = []
        at += 4
        while at < end:
            try:
                at, item = self._value_at(buf, at, depth, end)
            except _Overrun:  # as in a table
                return end, items
            items.append(item)
        return at, items


def _read_properties_aio_pika_refuses() -> None:
    unmarshal = pamqp_base.BasicProperties.unmarshal

    def tolerant_unmarshal(self: pamqp_base.BasicProperties, flags: int, data: bytes) -> None:
        unmarshal(self, flags, data)
        if getattr(self, "delivery_mode", None) not in (None, 1, 2):
            self.delivery_mode = None  # type: ignore[attr-defined]
        if (expiration := getattr(self, "expiration", None)) is not None:
            try:
                float(expiration)
            except ValueError:
                self.expiration = None  # type: ignore[attr-defined]

    pamqp_base.BasicProperties.unmarshal = tolerant_unmarshal  # type: ignore[method-assign]


read_what_pamqp_refuses()


class Delivery(Protocol):
    """What the parser reads from an ``aio_pika.IncomingMessage`` (a fake in unit tests)."""

    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> Mapping[str, Any] | None: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def timestamp(self) -> datetime | None: ...
    @property
    def exchange(self) -> str | None: ...
    @property
    def routing_key(self) -> str | None: ...


def _text(value: Any) -> str | None:
    """An AMQP field value as text; tables and arrays as JSON. None stays None, and so does a
    table too deeply nested to write out (the header is then left out)."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float | Decimal):
        return str(value)
    try:
        return json.dumps(value, default=str, separators=(",", ":"))
    except (RecursionError, ValueError, TypeError):
        return None


def _ce_attribute(header: str) -> str | None:
    lowered = header.lower()
    for prefix in CE_PREFIXES:
        if lowered.startswith(prefix) and len(lowered) > len(prefix):
            return lowered[len(prefix) :]
    return None


def fallback_id(delivery: Delivery) -> str:
    """``message_id`` when the publisher set one, else a hash of where it went and what it says."""
    if delivery.message_id:
        return str(delivery.message_id)
    return "hash:" + content_digest(delivery.exchange or "", delivery.routing_key or "", bytes(delivery.body))


def to_message(delivery: Delivery, queue: str) -> Message:
    """Strip the transport: headers as text, CloudEvents binary-mode attributes split out.

    A body no signal could carry is refused as ``too_large`` here, before anything parses it:
    RabbitMQ takes bodies of up to 16 MiB, whose parsing would hold the loop for seconds and take
    hundreds of MiB."""
    size = len(delivery.body)
    if size > MAX_SIGNAL_BYTES:
        raise EventRejected("too_large", f"the body is {size} bytes; one signal carries at most {MAX_SIGNAL_BYTES}")
    headers: dict[str, str] = {}
    ce: dict[str, str] = {}
    for key, value in (delivery.headers or {}).items():
        text = _text(value)
        if text is None:
            continue
        attr = _ce_attribute(str(key))
        if attr is not None:
            ce[attr] = text
        else:
            headers[str(key)] = text
    if ce and delivery.content_type and "datacontenttype" not in ce:
        ce["datacontenttype"] = delivery.content_type
    amqp = {"queue": queue, "exchange": delivery.exchange or "", "routing_key": delivery.routing_key or ""}
    for prop in KEPT_PROPERTIES:
        value = getattr(delivery, prop, None)
        if value:
            amqp[prop] = str(value)
    metadata = header_metadata(headers, str(delivery.correlation_id or "") or None)
    metadata["amqp"] = amqp
    return Message(
        body=bytes(delivery.body),
        source=f"{ADAPTER}:{queue}",
        fallback_id=fallback_id(delivery),
        headers=headers,
        ce_attributes=ce,
        content_type=delivery.content_type,
        key=delivery.routing_key,
        keyed=False,  # a routing key names a kind of event: an ordering key only by event.key_from
        metadata=metadata,
        time=_text(delivery.timestamp),
    )


def parse(delivery: Delivery, entry: AmqpConsumer) -> EventSignal:
    """One delivery → one event, or :class:`EventRejected` (``malformed`` / ``no_name`` /
    ``too_large``)."""
    return decode(to_message(delivery, entry.queue), entry.event)


def _size(value: Any) -> int:
    """A header value's weight in a frame, near enough: its text (a table too deep to write out
    counts as too large, and is left out)."""
    text = _text(value)
    return MAX_HEADER_VALUE + 1 if text is None and value is not None else len((text or "").encode("utf-8", "replace"))


def _encodable(value: Any) -> Any:
    """A header value as pamqp can write it again. It reads a long string that is not UTF-8 as
    ``bytes``, which it cannot write (a byte array is a ``bytearray``), and writes every float
    in single precision: a double that does not fit one is kept as its text."""
    if isinstance(value, bytes | memoryview):
        return bytearray(value)
    if isinstance(value, float) and not _single(value):
        return repr(value)
    if isinstance(value, list):
        return [_encodable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encodable(v) for k, v in value.items()}
    return value


def _single(value: float) -> bool:
    try:
        return math.isnan(value) or struct.unpack(">f", struct.pack(">f", value))[0] == value
    except OverflowError:
        return False


SHORT_STR = 255  # bytes in an AMQP short string: most properties, and a routing key


def short(value: Any) -> Any:
    """A property or routing key as a frame can carry it again. Read with ``\\xNN`` (4 bytes) for
    each byte that was not UTF-8 (:func:`read_what_pamqp_refuses`), it may be longer than it came, and
    pamqp refuses to write it: the letter would never go out and the delivery would come back for
    ever. The whole ``message_id`` stays in the ``x-original-message-id`` header."""
    return cut_text(value, SHORT_STR) if isinstance(value, str) else value


DEATH_HEADERS = frozenset(
    f"x-{when}-death-{what}" for when in ("first", "last") for what in ("queue", "reason", "exchange")
) | {"x-death"}
"""Headers RabbitMQ adds to a message it dead-letters itself (from a retry or TTL queue, say)."""

BROKER_READS = DEATH_HEADERS | {"cc", "bcc"}
"""Headers of a delivery that a letter must not carry under their own names (lower case):
RabbitMQ's death headers (the letter would look like one RabbitMQ dead-lettered, and a replay
would keep it for ever, adapters.amqp_replay), and the ``CC``/``BCC`` RabbitMQ routes a publish by
(it refuses one that is not an array, closing the channel: an AMQP 1.0 publisher's application
property ``CC`` arrives as text, and its letter was then retried for ever, the queue stalled)."""

H_AS_WAS = H_ORIGINAL + "header-"
"""The prefix a letter carries :data:`BROKER_READS` under; the replay gives them their names back."""


def dead_letter_copy(
    message: AbstractIncomingMessage,
    rej: EventRejected,
    queue: str,
    event: EventSignal | None = None,
    *,
    keep_headers: bool = True,
) -> aio_pika.Message:
    """The delivery as it came (body, properties, headers minus stale dead-letter ones) plus why,
    its headers capped to fit one frame; without ``keep_headers`` (a header that could not be
    written), only the dead-letter headers."""
    originals: list[tuple[str, Any]] = [
        (H_AS_WAS + str(k) if str(k).lower() in BROKER_READS else str(k), _encodable(v))
        for k, v in (message.headers or {}).items()
        if keep_headers and not stale(str(k), event)
    ]
    origin = {
        "queue": queue,
        "exchange": message.exchange or "",
        "routing-key": message.routing_key or "",
        "message-id": message.message_id or "",
    }
    carried = {str(k).lower() for k in message.headers or {}}
    fitted, cut = fit_headers(letter_headers(rej, event, origin), originals, measure=_size, carried=carried)
    headers: dict[str, Any] = dict(fitted)
    if cut or (message.headers and not keep_headers):
        headers[H_TRIMMED] = "headers"
    return aio_pika.Message(
        body=message.body,
        headers=headers,
        content_type=short(message.content_type),
        content_encoding=short(message.content_encoding),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=short(message.correlation_id),
        message_id=short(message.message_id),
        timestamp=message.timestamp,
        type=short(message.type),
        app_id=short(message.app_id),
    )
