"""Queue message bodies → :class:`EventSignal`, shared by every queue adapter (and the HTTP one).

An adapter strips its transport into a :class:`Message` (body bytes, headers as ``str → str``,
the key or routing key, a transport-derived fallback id) and calls :func:`decode`. The formats
(``envelope``, ``cloudevents``, ``raw``) and the order in which an event id is chosen are
described in docs/configuration.md, docs/kafka.md and docs/rabbitmq.md; what becomes of a
CloudEvent's ``data`` in docs/cloudevents.md.

Every JSON body goes through :func:`parse_json`, whose limits (nesting depth, finite numbers,
64-bit integers, text UTF-8 can carry) keep whatever is accepted encodable by every later step;
each adapter's page documents them with its formats (docs/http-api.md, docs/kafka.md,
docs/rabbitmq.md). Anything else a sender can put in a message becomes an event or
:class:`EventRejected`, never another exception.

:func:`header_metadata` is the one policy for which message headers reach an event's metadata
(and so Temporal history): trace context and correlation ids only, see :data:`KEPT_HEADERS`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from array import array
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from bridge.config import EventFormat
from bridge.errors import EventRejected
from bridge.event import EventSignal, cloudevent_id, utc_now
from bridge.locator import Locator

CE_STRUCTURED = "application/cloudevents+json"
CE_REQUIRED = ("id", "source", "type", "specversion")

# The headers a queue message carries into ``metadata["headers"]``. Any other header may hold a
# credential or personal data: it stays readable to ``name_from``/``id_from`` but never reaches
# Temporal. Names are matched in any case and kept lower-cased; a value longer than
# MAX_KEPT_VALUE characters is left out (a cut trace header is no trace header).
KEPT_HEADERS = ("traceparent", "tracestate", "x-request-id", "x-correlation-id", "correlation-id")
MAX_KEPT_VALUE = 512

MAX_JSON_DEPTH = 100
"""Containers (objects and arrays) nested in one JSON document, the outermost one included.

Python's parser and the Temporal SDK's encoder recurse: a document nested a few thousand levels
deep is parsed, then fails while the signal is encoded. Refusing it here keeps every later step
far from the interpreter's recursion limit."""
INT_MIN, INT_MAX = -(2**63), 2**64 - 1  # the integers a signed or unsigned 64-bit field holds
_INT_DIGITS = len(str(INT_MAX))


@dataclass
class Message:
    """What an adapter knows about one transport message, transport types already stripped.

    ``time`` is when the transport says the message was produced (ISO 8601); a CloudEvent's own
    ``time`` wins over it, and without either the event is stamped now. ``content_type`` is the
    transport's: it picks structured-mode CloudEvents, and in binary mode it is the
    ``datacontenttype`` when the attributes name none. ``key`` is what a ``key`` locator reads
    (the Kafka record key, the AMQP routing key); it is also the event's ordering key when
    ``keyed`` and the format has no ``key_from``. ``parsed``: a structured-mode CloudEvent already
    parsed from JSON (an item of a CloudEvents batch, read with the batch): ``body`` is not read.
    ``reserved``: how the ids the bridge makes for messages without one begin (a Kafka topic's
    ``kafka:{topic}:``): a sender's own id that begins so is ``malformed``, as it could take the
    id of another producer's record to come, which would then be skipped as a repeat.
    """

    body: bytes
    source: str
    fallback_id: str
    headers: Mapping[str, str] = field(default_factory=dict)
    ce_attributes: Mapping[str, str] = field(default_factory=dict)
    content_type: str | None = None
    key: str | None = None
    keyed: bool = True  # the key is the event's ordering key unless the format's key_from says otherwise
    metadata: dict[str, Any] = field(default_factory=dict)
    time: str | None = None
    parsed: dict[str, Any] | None = None
    reserved: str | None = None


def header_metadata(headers: Mapping[str, str], correlation_id: str | None = None) -> dict[str, Any]:
    """The metadata a message's headers contribute: the kept headers, ``correlation_id`` and
    ``traceparent``. A transport's own correlation id (AMQP's property) wins over the headers'."""
    lowered = {k.lower(): v for k, v in headers.items()}
    kept = {h: v for h in KEPT_HEADERS if (v := lowered.get(h)) is not None and len(v) <= MAX_KEPT_VALUE}
    metadata: dict[str, Any] = {"headers": kept}
    correlation = correlation_id or kept.get("x-correlation-id") or kept.get("correlation-id")
    if correlation:
        metadata["correlation_id"] = correlation
    if "traceparent" in kept:
        metadata["traceparent"] = kept["traceparent"]
    return metadata


# --- JSON, bounded --------------------------------------------------------------------------------


class _Refused(ValueError):
    """A number the bridge does not take (raised from inside the parser's hooks)."""


def _parse_int(text: str) -> int:
    # Bounded before converting: CPython refuses (slowly) past 4,300 digits.
    if len(text.lstrip("-")) > _INT_DIGITS or not INT_MIN <= (value := int(text)) <= INT_MAX:
        raise _Refused(f"integer {text[:40]}{'…' if len(text) > 40 else ''} does not fit in 64 bits")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Refused(f"number {text[:40]}{'…' if len(text) > 40 else ''} is out of range")
    return value


def _parse_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a number JSON allows")


# What a request holds while its events wait, per byte and per character of its body's JSON
# (CPython 3.11, tracemalloc; tests/unit/test_http_memory.py): the body, the parsed events and
# their encodings. A value is at least a pointer and mostly an object (`[]` 56 bytes, `{}` 64, a
# string of one CJK character 76, a float 24), an event beside its payload about 500 bytes. So
# before a body is parsed (parsed_weight) it counts three times, each ``[``, ``,`` and ``:`` 96
# bytes, each ``{`` 128, and each of the first ``max_batch`` ``{`` 384 more (it may begin an
# event); its events' encodings then raise that to what they show (encoded_weight). Held against
# charged, in times the body: ``[[],…]`` 23.6 against 67; ``[{},…]`` 26.3 against 79;
# ``["ab",…]`` 14.0 against 22; ``["😀",…]`` 15.8 against 25; ``[{"ab":"cd"},…]`` 22.3 against
# 31; one string 3.0 against 3.0, 6.0 against 6.0 with one emoji in it (4 bytes a character);
# 1,000 small events 15.4 against 51; the same keeping five headers of 512 ``é`` 898 against
# 2,778 (the headers, each event's, are in no body); a CloudEvents batch of base64 JSON 18 against
# 58 (its JSON weighed as decoded). Characters inside strings count too, so text full of commas
# is overestimated.
_PER_VALUE = 96
_PER_OBJECT = 128
_PER_EVENT = 384
_PER_REQUEST = 4096  # the request's own objects: one event of one long string held 3 times it and 2.4 KB


def parsed_weight(body: bytes, max_batch: int) -> int:
    """About how many bytes ``body`` holds once parsed into events (at most a batch of
    ``max_batch``), read before it is parsed: C-speed counts of its structural characters.
    JSON the body holds out of sight (CloudEvents ``data_base64``) is weighed when it is
    decoded, before it is parsed (:data:`HIDDEN`); what its events keep beyond the body, as they
    are encoded (:func:`encoded_weight`)."""
    objects, structure = _structure(body)
    return _PER_REQUEST + 3 * len(body) + structure + _PER_EVENT * max(1, min(objects, max_batch))


def _structure(text: bytes) -> tuple[int, int]:
    """The objects JSON ``text`` may hold (its ``{``), and what its values and objects weigh
    (:data:`_PER_VALUE` each ``[``, ``,`` and ``:``, :data:`_PER_OBJECT` each ``{``)."""
    objects = text.count(b"{")
    values = text.count(b"[") + text.count(b",") + text.count(b":")
    return objects, _PER_VALUE * values + _PER_OBJECT * objects


HIDDEN: ContextVar[Callable[[bytes], None] | None] = ContextVar("signal_bridge_hidden_json", default=None)
"""Who is told of JSON a body held out of sight (a CloudEvent's ``data_base64``), decoded and not
parsed yet: the HTTP adapter charges it to the request (``http.max_parsed_bytes``), and may
refuse the request by raising. The events of a batch are all parsed before any is encoded, so
this is the one moment their hidden JSON can be weighed before it is held."""


def encoded_weight(encoded: bytes) -> int:
    """About what one event holds, parsed and encoded, from its encoding (JSON, non-ASCII
    escaped as ``\\uXXXX``): the encoding, the strings in memory (up to 4 bytes a character
    when one is past U+FFFF, escaped as a surrogate pair ``\\ud8..``; 2 past U+00FF), the values
    and objects as :func:`parsed_weight` counts them, and the event's own objects. Everything an
    event holds is in its encoding, what the body did not show included: the headers and key each
    event of a batch keeps, data that was base64 or percent-encoded."""
    wide = 4 if b"\\ud" in encoded else 2 if b"\\u" in encoded else 1
    return _PER_EVENT + _PER_OBJECT + (1 + wide) * len(encoded) + _structure(encoded)[1]


# Made once: json.loads with any hook builds a decoder and its scanner per call.
_DECODER = json.JSONDecoder(parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
_PLAIN = json.JSONDecoder(parse_constant=_parse_constant)
"""The decoder for a text with no number the hooks could refuse: the C scanner converts each
number itself, where the hooks cost a Python call each (500,000 integers: 117 ms against 30)."""
_MAYBE_OUT_OF_RANGE = re.compile(r"[0-9]{19}|[eE][-+]?[0-9]{3}")
"""Where a number may not fit: 19 digits in a row (an integer of 18 fits in 64 bits), or an
exponent of three digits (a float overflows past 1.8e308). Strings are searched too: a text
found here only takes the slower, checking decoder."""

_OPENERS_CLOSERS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_LEAF = b"\x01\xff"
_SHRINK_PASSES = 4
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800-\udfff: half a pair, or a lone one


def json_depth_exceeds(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when ``text`` nests containers deeper than ``limit``, found without recursing.

    Exact for valid JSON (its strings are skipped); for anything else the verdict does not
    matter, as the parser refuses it anyway. Linear in the length of ``text``.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    if '"' in text:  # drop every string: escaped backslashes and quotes first, then "…" spans
        text = "".join(text.replace("\\\\", "").replace('\\"', "").split('"')[::2])
    brackets = text.encode("ascii", "ignore").translate(_OPENERS_CLOSERS, _NOT_BRACKETS)
    passes = 0
    while brackets and passes < _SHRINK_PASSES:  # each pass drops every empty container: depth - 1
        brackets, passes = brackets.replace(_LEAF, b""), passes + 1
    steps = array("b")
    steps.frombytes(brackets)
    return max(accumulate(steps), default=0) > limit - passes


def parse_json(body: bytes) -> Any:
    """``body`` as JSON, or ``EventRejected("malformed")``: not JSON, nested deeper than
    :data:`MAX_JSON_DEPTH`, ``NaN``/``Infinity`` (or a number that overflows to it), an integer
    outside 64 bits, or a lone surrogate (``\\ud800``: no character, and no UTF-8 can carry it;
    run ids and answers are made of these strings). Used by every adapter, HTTP included."""
    try:
        text = body.decode(json.detect_encoding(body))
        if json_depth_exceeds(text):
            raise EventRejected("malformed", f"body is not JSON the bridge takes: nested deeper than {MAX_JSON_DEPTH}")
        if text.startswith("\ufeff"):  # what json.loads refuses before decoding
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        value = (_DECODER if _MAYBE_OUT_OF_RANGE.search(text) else _PLAIN).decode(text)
        if _SURROGATE_ESCAPE.search(text):
            json.dumps(value, ensure_ascii=False).encode()
        return value
    except _Refused as exc:
        raise EventRejected("malformed", f"body is not JSON the bridge takes: {exc}") from None
    except RecursionError:
        raise EventRejected("malformed", "body is not JSON the bridge takes: nested too deep") from None
    except UnicodeEncodeError:
        raise EventRejected("malformed", "body is not JSON the bridge takes: a string holds a lone surrogate") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise EventRejected("malformed", f"body is not JSON: {exc}") from None


# --- events ---------------------------------------------------------------------------------------


def envelope_id(value: Any) -> str | None:
    """An envelope's ``id`` as text: None when it has none. A string or an integer (7.0 is the
    integer 7: JSON has one kind of number); anything else, and an empty string, is ``malformed``.
    Every adapter reads it so: ``0`` is an id, not "no id", and an empty one would get a new id on
    every redelivery (its transport's offset, or a fresh UUID over HTTP)."""
    if isinstance(value, float) and value.is_integer() and INT_MIN <= value <= INT_MAX:
        value = int(value)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise EventRejected("malformed", "'id' must be a string")
    if value == "":
        raise EventRejected("malformed", "'id' must not be empty; leave it out for the bridge to choose one")
    return str(value)


def decode(msg: Message, fmt: EventFormat) -> EventSignal:
    """Build the event or raise :class:`EventRejected` (``malformed`` / ``no_name``)."""
    if fmt.format == "cloudevents" or _is_structured_ce(msg.content_type):
        return _cloudevent(msg, fmt)
    body = parse_json(msg.body)
    if fmt.format == "envelope":
        if not isinstance(body, dict):
            raise EventRejected("malformed", "an envelope must be a JSON object")
        payload = body.get("payload")
        if payload is None:  # left out or null: none, as over HTTP (docs/http-api.md)
            payload = {}
        name = body.get("name") or _configured_name(fmt, msg, body)
        event_id = envelope_id(body.get("id"))
        if event_id is None:
            event_id = _configured_id(fmt, msg, body)
    else:
        payload = body
        name = _configured_name(fmt, msg, body)
        event_id = _configured_id(fmt, msg, body)
    if not isinstance(payload, dict):
        raise EventRejected("malformed", "the payload must be a JSON object")
    if not isinstance(name, str) or not name:
        raise EventRejected("no_name", "the message carries no event name")
    if event_id and msg.reserved and event_id.startswith(msg.reserved):
        raise EventRejected(
            "malformed",
            f"an id beginning {msg.reserved!r} is the one the bridge gives a record without an id, by its offset; "
            "choose another, or leave it out",
        )
    return EventSignal(
        id=msg.fallback_id if event_id is None or event_id == "" else str(event_id),
        name=name,
        payload=payload,
        source=msg.source,
        time=msg.time or utc_now(),
        metadata=msg.metadata,
        key=_ordering_key(fmt, msg, body),
    )


def _configured_name(fmt: EventFormat, msg: Message, body: Any) -> str | None:
    if fmt.name_from:
        return fmt.name_from.resolve(msg.headers, body, msg.key)
    return fmt.name


def _ordering_key(fmt: EventFormat, msg: Message, body: Any) -> str | None:
    if fmt.key_from:
        return fmt.key_from.resolve(msg.headers, body, msg.key)
    return msg.key if msg.keyed else None


def _configured_id(fmt: EventFormat, msg: Message, body: Any) -> str | None:
    return located_id(fmt.id_from, msg.headers, body, msg.key) if fmt.id_from else None


def located_id(locator: Locator, headers: Mapping[str, str], body: Any, key: str | None = None) -> str | None:
    """The id ``locator`` (an ``id_from``) finds, read as an envelope's ``id`` is: None when absent
    or empty, a string or an integer as text (7.0 is 7), and ``malformed`` for anything else. A
    field holding ``true``, a list or an object was its Python text (``True``, ``[1, 2]``, ``{}``):
    every event with ``{}`` there got one id, and all but the first were skipped as repeats."""
    value = locator.value(headers, body, key)
    if value is None or value == "":
        return None
    if isinstance(value, float) and value.is_integer() and INT_MIN <= value <= INT_MAX:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise EventRejected("malformed", f"the id at {locator} must be a string or an integer")
    return str(value)


def _media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def _is_structured_ce(content_type: str | None) -> bool:
    return content_type is not None and _media_type(content_type) == CE_STRUCTURED


def is_json_media(content_type: str | None) -> bool:
    """A ``datacontenttype`` whose data is JSON: absent (or empty), ``application/json`` or ``*/*+json``."""
    media = _media_type(content_type or "")
    return not media or media == "application/json" or (media.endswith("+json") and "/" in media)


def _cloudevent(msg: Message, fmt: EventFormat) -> EventSignal:
    if _is_structured_ce(msg.content_type) or not msg.ce_attributes:
        body = msg.parsed if msg.parsed is not None else parse_json(msg.body)
        if not isinstance(body, dict):
            raise EventRejected("malformed", "a structured CloudEvent must be a JSON object")
        attrs = {k: v for k, v in body.items() if k not in ("data", "data_base64")}
    else:
        body = None
        attrs = dict(msg.ce_attributes)
        if "datacontenttype" not in attrs and msg.content_type:
            attrs["datacontenttype"] = msg.content_type
    missing = [a for a in CE_REQUIRED if not attrs.get(a)]
    if missing:
        raise EventRejected("malformed", f"CloudEvent lacks required attribute(s): {', '.join(missing)}")
    content_type = attrs.get("datacontenttype")
    if content_type is not None and not isinstance(content_type, str):
        raise EventRejected("malformed", "a CloudEvent's datacontenttype must be a string")
    data = _structured_data(body, content_type) if body is not None else _binary_data(msg.body, content_type)
    metadata = dict(msg.metadata)
    metadata["cloudevents"] = {k: str(v) for k, v in attrs.items()}
    return EventSignal(
        id=cloudevent_id(str(attrs["source"]), str(attrs["id"])),
        name=str(attrs["type"]),
        payload=data,
        source=msg.source,
        time=str(attrs.get("time") or "") or utc_now(),
        metadata=metadata,
        key=_ordering_key(fmt, msg, body),
    )


def _as_payload(data: Any) -> dict[str, Any]:
    """``data`` as a payload: an object as it is, nothing as ``{}``, anything else wrapped."""
    if data is None:
        return {}
    return data if isinstance(data, dict) else {"data": data}


def _kept(data_base64: str, content_type: str) -> dict[str, Any]:
    return {"data_base64": data_base64, "datacontenttype": content_type}


def _structured_data(body: dict[str, Any], content_type: str | None) -> dict[str, Any]:
    """``data`` is JSON already; ``data_base64`` is decoded when its content type is JSON and
    kept as it came otherwise."""
    if "data_base64" not in body:
        return _as_payload(body.get("data"))
    if "data" in body:
        raise EventRejected("malformed", "a CloudEvent carries data or data_base64, not both")
    encoded = body["data_base64"]
    if not isinstance(encoded, str):
        raise EventRejected("malformed", "a CloudEvent's data_base64 must be a string")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise EventRejected("malformed", "a CloudEvent's data_base64 is not base64") from None
    if content_type and not is_json_media(content_type):
        return _kept(encoded, content_type)
    if raw and (tell := HIDDEN.get()) is not None:
        tell(raw)
    return _data_payload(raw) if raw else {}


def _binary_data(body: bytes, content_type: str | None) -> dict[str, Any]:
    """The message body is ``data``: JSON when its content type says so, else kept as base64."""
    if not body:
        return {}
    if content_type and not is_json_media(content_type):
        return _kept(base64.b64encode(body).decode("ascii"), content_type)
    return _data_payload(body)


def _data_payload(raw: bytes) -> dict[str, Any]:
    """JSON ``data`` on its own as a payload. An array gains a level when wrapped as
    ``{"data": […]}``: one nested to the limit is refused, so no payload passes it."""
    value = parse_json(raw)
    if isinstance(value, list) and json_depth_exceeds(raw.decode(json.detect_encoding(raw)), MAX_JSON_DEPTH - 1):
        raise EventRejected("malformed", f"data is nested deeper than {MAX_JSON_DEPTH - 1}, the most an array may be")
    return _as_payload(value)
