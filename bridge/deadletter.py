"""Dead letters: the same header names on every transport, and a size every letter fits in.

A dead letter is the refused message as it came plus headers saying why (:func:`dead_letter_headers`).
Whatever the sender put in it, the letter must get out: a letter the destination refuses for its
size would be retried for ever and hold its partition or queue. So the headers of a letter are
capped (:func:`fit_headers`: each value, and all of them together), a transport with a size limit
cuts the body too, and a letter that was cut says so in :data:`H_TRIMMED`. What an operator sees
of it: "Dead letters" in docs/kafka.md and docs/rabbitmq.md.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

from bridge.errors import EventRejected
from bridge.event import EventSignal

V = TypeVar("V")

H_REASON = "x-dead-letter-reason"
H_ERROR = "x-dead-letter-error"
H_TRIMMED = "x-dead-letter-trimmed"  # what was cut to make the letter fit: value, key, headers
H_EVENT_ID = "x-event-id"
H_EVENT_NAME = "x-event-name"
H_ORIGINAL = "x-original-"  # + a transport's origin field: topic, partition, queue, routing-key, …
MAX_ERROR_CHARS = 1000

MAX_HEADER_VALUE = 4096
"""Bytes of one header value in a dead letter (the event id and name included)."""
MAX_HEADERS = 32 * 1024
"""Bytes of all of a dead letter's headers together, names included: well inside RabbitMQ's
128 KiB frame (headers must fit in one) and a small part of a Kafka record."""
HEADER_OVERHEAD = 10
"""Bytes each header costs beyond its name and value: in a Kafka record the lengths of both (two
varints, up to 5 bytes each); in an AMQP table the name's length, the value's type and its length
(6). Counted so that a message with half a million empty headers (``("", b"")``, 0 bytes each by
name and value) cannot make a letter larger than the producer may send: it would be refused before
it is sent, at every retry, and the consumer would stay paused on it."""


def dead_letter_headers(error: EventRejected, event: EventSignal | None, origin: Mapping[str, str]) -> dict[str, str]:
    """Why the message was refused, where it came from and, once decoded, which event it was."""
    headers = {H_REASON: error.reason, H_ERROR: error.message[:MAX_ERROR_CHARS]}
    headers.update({H_ORIGINAL + name: value for name, value in origin.items()})
    if event is not None:
        headers.update({H_EVENT_ID: event.id, H_EVENT_NAME: event.name})
    return headers


def is_dead_letter_header(name: str) -> bool:
    """A header an earlier dead-lettering wrote: dropped from a copy, so the new one cannot be confused."""
    lowered = name.lower()
    return lowered in (H_REASON, H_ERROR, H_TRIMMED, H_EVENT_ID, H_EVENT_NAME) or lowered.startswith(H_ORIGINAL)


EVENT_HEADERS = (H_EVENT_ID, H_EVENT_NAME)
"""A letter's ``x-event-id`` and ``x-event-name`` hold what the message's own headers of those
names held when an entry read its event's id or name from them (``id_from: header:x-event-id``):
so a letter written without an event keeps the message's own, and a replay keeps the letter's."""


def dropped_by_replay(name: str) -> bool:
    """A dead-letter header a replay leaves out when it rebuilds the message (all but
    :data:`EVENT_HEADERS`); an event may not be read from one (bridge.config)."""
    return is_dead_letter_header(name) and name.lower() not in EVENT_HEADERS


def stale(name: str, event: EventSignal | None) -> bool:
    """A header of the message that a letter made of it leaves out: the dead-letter ones of an
    earlier letter, except the event's id and name when this letter has no event to write."""
    return is_dead_letter_header(name) and (event is not None or name.lower() not in EVENT_HEADERS)


def cut_text(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8, on a character boundary."""
    if len(text) * 4 <= limit:
        return text
    return text.encode("utf-8", "surrogatepass")[:limit].decode("utf-8", "ignore")


def byte_size(value: Any) -> int:
    """What a header value weighs: bytes and text exactly, anything else by its text."""
    if value is None:
        return 0
    if isinstance(value, bytes | bytearray):
        return len(value)
    return len(str(value).encode("utf-8", "surrogatepass"))


def fit_headers(
    ours: Mapping[str, str],
    originals: Sequence[tuple[str, V]],
    *,
    total: int = MAX_HEADERS,
    measure: Callable[[V], int] = byte_size,
    carried: Collection[str] = (),
) -> tuple[list[tuple[str, V | str]], bool]:
    """The letter's headers, at most :data:`MAX_HEADER_VALUE` bytes a value and ``total`` in all
    (each header counted with :data:`HEADER_OVERHEAD`), and whether anything a replay needs was
    cut or left out.

    ``ours`` (the dead-letter headers) come first in the budget, each value cut to fit; then the
    original headers in order, while they fit: a longer text or bytes value is cut, any other
    value that large is left out. The originals come first in the list, as in the message.

    A cut of the error, or of the event's id or name where the message had no header of that
    name (``carried``: the names of the message's own headers, lower case), is no trim: a replay
    reads the event from the message again and needs none of them (an id or name of 4,096
    characters can take 16 KiB, and its letter could not be replayed). Where the message had such
    a header, the letter's stands for it (an entry may read the id from it).
    """
    needed = {name for name in ours if name != H_ERROR and (name not in EVENT_HEADERS or name in carried)}
    trimmed = False
    used = 0
    mine: list[tuple[str, V | str]] = []
    for name, text in ours.items():
        short = cut_text(text, MAX_HEADER_VALUE)
        trimmed |= short != text and name in needed
        used += len(name) + len(short.encode("utf-8", "surrogatepass")) + HEADER_OVERHEAD
        mine.append((name, short))
    kept: list[tuple[str, V | str]] = []
    for name, value in originals:
        name_size = len(name.encode("utf-8", "surrogatepass"))
        fitted, size = _fit_value(value, measure(value))
        size += HEADER_OVERHEAD
        if fitted is _LEFT_OUT or name_size > MAX_HEADER_VALUE or used + name_size + size > total:
            trimmed = True
            continue
        trimmed |= fitted is not value
        used += name_size + size
        kept.append((name, fitted))
    return kept + mine, trimmed


_LEFT_OUT: Any = object()


def _fit_value(value: Any, size: int) -> tuple[Any, int]:
    """The value cut to :data:`MAX_HEADER_VALUE` bytes (text and bytes), or :data:`_LEFT_OUT`."""
    if size <= MAX_HEADER_VALUE:
        return value, size
    if isinstance(value, bytes | bytearray):
        return value[:MAX_HEADER_VALUE], MAX_HEADER_VALUE
    if isinstance(value, str):
        return cut_text(value, MAX_HEADER_VALUE), MAX_HEADER_VALUE
    return _LEFT_OUT, 0
