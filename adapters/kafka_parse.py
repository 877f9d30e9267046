"""Kafka records ↔ the bridge: a record → :class:`bridge.decode.Message`, a refused record → its
dead letter. No aiokafka type goes further than this module and :mod:`adapters.kafka`.

Whatever a producer wrote (any bytes, null values and keys, header values that are not UTF-8, a
timestamp out of any calendar) becomes a Message; what it decodes to is :mod:`bridge.decode`'s
business. A dead letter always fits the producer's ``max_request_size``: its headers are capped
and its value cut when it must be, and ``x-dead-letter-trimmed`` says what was cut (docs/kafka.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeAlias

from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import ConsumerRecord

from bridge.config import EventFormat
from bridge.deadletter import H_TRIMMED, MAX_HEADER_VALUE, MAX_HEADERS, fit_headers, stale
from bridge.deadletter import dead_letter_headers as letter_headers
from bridge.decode import Message, decode, header_metadata
from bridge.errors import EventRejected
from bridge.event import MAX_SIGNAL_BYTES, EventSignal

ADAPTER = "kafka"
CE_PREFIX = "ce_"

MAX_REQUEST_BYTES = 1024 * 1024
"""The dead-letter producer's ``max_request_size``, set explicitly (it is aiokafka's default)."""
LETTER_BYTES = 1_000_000
"""The most a dead letter weighs as the producer counts it: under :data:`MAX_REQUEST_BYTES` and
under a topic's default ``max.message.bytes`` (1,048,588)."""
MIN_LETTER_BYTES = 4 * MAX_HEADER_VALUE
"""A topic that refuses even a letter this small is misconfigured: the letter is retried until
it is fixed (the consumer stays paused, and says why)."""

Record: TypeAlias = ConsumerRecord[Any, Any]
Header: TypeAlias = tuple[str, bytes | None]


def _text(raw: bytes | str | None) -> str:
    """Bytes as text, with ``\\xNN`` for each byte that is not UTF-8: two binary ids (or keys) must
    not read alike, or the second event would be taken for the first and start nothing."""
    if raw is None:
        return ""
    return raw if isinstance(raw, str) else raw.decode("utf-8", errors="backslashreplace")


@dataclass
class Unreadable(ConsumerRecord[bytes, bytes]):  # type: ignore[misc]  # aiokafka is untyped
    """Stands for a record the client cannot read (aiokafka refuses a header name that is not
    UTF-8, or a record whose checksum fails), at the offset where reading its partition alone
    failed: the settle path refuses it as ``malformed``, dead-letters it with that offset, and
    commits past it, so one such record cannot stall its partition (adapters.kafka). It may stand
    for the records from ``offset`` to ``last``: the rest of a producer batch that cannot be read
    past a record in it (adapters.kafka_batches)."""

    why: str = ""
    last: int = -1

    @classmethod
    def at(cls, topic: str, partition: int, offset: int, why: str, last: int | None = None) -> Unreadable:
        return cls(topic, partition, offset, -1, 0, None, None, None, -1, -1, (), why, offset if last is None else last)


def last_offset(record: Record) -> int:
    """The offset of the last record ``record`` stands for: its own, or an :class:`Unreadable`
    range's last."""
    return record.last if isinstance(record, Unreadable) else int(record.offset)


def record_headers(record: Record) -> dict[str, str]:
    """Headers as ``str → str``; the first of repeated names wins, as in HTTP bindings."""
    out: dict[str, str] = {}
    for name, value in record.headers or ():
        out.setdefault(_text(name), _text(value))
    return out


def fallback_id(record: Record) -> str:
    return f"kafka:{record.topic}:{record.partition}:{record.offset}"


def record_time(stamp: int | None) -> str | None:
    """The record's timestamp (ms) as ISO 8601, or None when it has none a calendar can hold."""
    if not stamp or stamp <= 0:
        return None
    try:
        return datetime.fromtimestamp(stamp / 1000, UTC).isoformat()
    except (OverflowError, OSError, ValueError):
        return None


def to_message(record: Record) -> Message:
    """What :func:`bridge.decode.decode` needs from a record; no aiokafka type goes further.

    A value no signal could carry is refused as ``too_large`` here, before anything parses it: a
    topic may take records of many megabytes, and parsed JSON takes up to 25 times its text."""
    if isinstance(record, Unreadable):
        where = (
            f"the record at offset {record.offset}"
            if record.last == record.offset
            else f"the records at offsets {record.offset} to {record.last} (the rest of one producer batch)"
        )
        raise EventRejected(
            "malformed",
            f"the Kafka client cannot read {where} ({record.why}); this letter does not hold them: read them from "
            "the topic by their offsets",
        )
    body = record.value if isinstance(record.value, bytes) else _text(record.value).encode()
    if len(body) > MAX_SIGNAL_BYTES:
        raise EventRejected(
            "too_large", f"the value is {len(body)} bytes; one signal carries at most {MAX_SIGNAL_BYTES}"
        )
    headers = record_headers(record)
    lowered = {k.lower(): v for k, v in headers.items()}
    ce = {k[len(CE_PREFIX) :]: v for k, v in lowered.items() if k.startswith(CE_PREFIX) and len(k) > 3}
    content_type = lowered.get("content-type")
    if ce and content_type and "datacontenttype" not in ce:
        ce["datacontenttype"] = content_type
    metadata = header_metadata(headers)
    metadata["kafka"] = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp,
    }
    return Message(
        body=body,
        source=f"kafka:{record.topic}",
        fallback_id=fallback_id(record),
        headers=headers,
        ce_attributes=ce,
        content_type=content_type,
        key=None if record.key is None else _text(record.key),
        metadata=metadata,
        time=record_time(record.timestamp),
        reserved=f"kafka:{record.topic}:",
    )


def parse(record: Record, fmt: EventFormat) -> EventSignal:
    """One record → one event, or :class:`EventRejected`; the record's timestamp is the event time
    unless it is a CloudEvent (which carries its own)."""
    return decode(to_message(record), fmt)


# --- dead letters ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Letter:
    """A dead letter as the producer takes it."""

    key: bytes | None
    value: bytes | None
    headers: list[Header]
    trimmed: tuple[str, ...] = ()  # what was cut to make it fit, as x-dead-letter-trimmed says

    @property
    def size(self) -> int:
        """Bytes as the producer counts them against ``max_request_size``."""
        return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(self.key, self.value, self.headers))


def _origin(record: Record) -> dict[str, str]:
    origin = {
        "topic": record.topic,
        "partition": str(record.partition),
        "offset": str(record.offset),
        "timestamp": str(record.timestamp),
    }
    if isinstance(record, Unreadable) and record.last != record.offset:
        origin["last-offset"] = str(record.last)
    return origin


def dead_letter_headers(
    record: Record, exc: EventRejected, event: EventSignal | None = None, *, total: int = MAX_HEADERS
) -> list[Header]:
    """The original headers (minus any stale dead-letter ones) plus why and where from, capped
    (see :func:`bridge.deadletter.fit_headers`); ``x-dead-letter-trimmed: headers`` when cut."""
    headers, cut = _fitted_headers(record, exc, event, total)
    return [*headers, (H_TRIMMED, b"headers")] if cut else headers


def _fitted_headers(
    record: Record, exc: EventRejected, event: EventSignal | None, total: int
) -> tuple[list[Header], bool]:
    originals = [(_text(k), v) for k, v in record.headers or () if not stale(_text(k), event)]
    carried = {_text(k).lower() for k, _ in record.headers or ()}
    headers, cut = fit_headers(letter_headers(exc, event, _origin(record)), originals, total=total, carried=carried)
    return [(k, v.encode("utf-8", "surrogatepass") if isinstance(v, str) else v) for k, v in headers], cut


def dead_letter(
    record: Record, exc: EventRejected, event: EventSignal | None = None, budget: int = LETTER_BYTES
) -> Letter:
    """The record's dead letter, at most ``budget`` bytes: headers capped to a quarter of it (and
    :data:`MAX_HEADERS`), then a long key cut, then the value cut; ``x-dead-letter-trimmed`` names
    what was cut (``headers``, ``key``, ``value``). A tombstone without a key gets an empty value
    (a record needs one or the other)."""
    headers, cut = _fitted_headers(record, exc, event, min(MAX_HEADERS, budget // 4))
    if isinstance(record, Unreadable):  # nothing of the record is in it: a replay keeps it as it is
        whole: tuple[str, ...] = ("headers", "key", "value")
        return Letter(None, b"", [*headers, (H_TRIMMED, ",".join(whole).encode())], whole)
    trimmed = ["headers"] if cut else []
    key, value = record.key, record.value
    if key is None and value is None:
        value = b""
    marker: Header = (H_TRIMMED, b"headers,key,value")  # the longest it can be, counted in the budget
    over = Letter(key, value, [*headers, marker]).size - budget
    if over > 0 and key is not None and len(key) > MAX_HEADER_VALUE:
        over -= len(key) - MAX_HEADER_VALUE
        key = key[:MAX_HEADER_VALUE]
        trimmed.append("key")
    if over > 0 and value:
        value = value[: max(0, len(value) - over)]
        trimmed.append("value")
    if trimmed:
        headers.append((H_TRIMMED, ",".join(trimmed).encode()))
    return Letter(key, value, headers, tuple(trimmed))
