"""Queue message bodies → :class:`EventSignal`, shared by every queue adapter (and the HTTP one).

An adapter strips its transport into a :class:`Message` (body bytes, headers as ``str → str``,
the key or routing key, a transport-derived fallback id) and calls :func:`decode`. The formats
(``envelope``, ``cloudevents``, ``raw``) and the order in which an event id is chosen are
described in docs/configuration.md, docs/kafka.md and docs/rabbitmq.md.

:func:`header_metadata` is the one policy for which message headers reach an event's metadata
(and so Temporal history): trace context and correlation ids only, see :data:`KEPT_HEADERS`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bridge.config import EventFormat
from bridge.errors import EventRejected
from bridge.event import EventSignal, utc_now

CE_STRUCTURED = "application/cloudevents+json"
CE_REQUIRED = ("id", "source", "type", "specversion")

# The headers a queue message carries into ``metadata["headers"]``. Any other header may hold a
# credential or personal data: it stays readable to ``name_from``/``id_from`` but never reaches
# Temporal. Names are matched in any case and kept lower-cased.
KEPT_HEADERS = ("traceparent", "tracestate", "x-request-id", "x-correlation-id", "correlation-id")


@dataclass
class Message:
    """What an adapter knows about one transport message, transport types already stripped.

    ``time`` is when the transport says the message was produced (ISO 8601); a CloudEvent's own
    ``time`` wins over it, and without either the event is stamped now.
    """

    body: bytes
    source: str
    fallback_id: str
    headers: Mapping[str, str] = field(default_factory=dict)
    ce_attributes: Mapping[str, str] = field(default_factory=dict)
    content_type: str | None = None
    key: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    time: str | None = None


def header_metadata(headers: Mapping[str, str], correlation_id: str | None = None) -> dict[str, Any]:
    """The metadata a message's headers contribute: the kept headers, ``correlation_id`` and
    ``traceparent``. A transport's own correlation id (AMQP's property) wins over the headers'."""
    lowered = {k.lower(): v for k, v in headers.items()}
    kept = {h: lowered[h] for h in KEPT_HEADERS if h in lowered}
    metadata: dict[str, Any] = {"headers": kept}
    correlation = correlation_id or kept.get("x-correlation-id") or kept.get("correlation-id")
    if correlation:
        metadata["correlation_id"] = correlation
    if "traceparent" in kept:
        metadata["traceparent"] = kept["traceparent"]
    return metadata


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EventRejected("malformed", f"body is not JSON: {exc}") from None


def decode(msg: Message, fmt: EventFormat) -> EventSignal:
    """Build the event or raise :class:`EventRejected` (``malformed`` / ``no_name``)."""
    if fmt.format == "cloudevents" or _is_structured_ce(msg.content_type):
        return _cloudevent(msg, fmt)
    body = parse_json(msg.body)
    if fmt.format == "envelope":
        if not isinstance(body, dict):
            raise EventRejected("malformed", "an envelope must be a JSON object")
        payload = body.get("payload", {})
        name = body.get("name") or _configured_name(fmt, msg, body)
        event_id = body.get("id") or _configured_id(fmt, msg, body)
    else:
        payload = body
        name = _configured_name(fmt, msg, body)
        event_id = _configured_id(fmt, msg, body)
    if not isinstance(payload, dict):
        raise EventRejected("malformed", "the payload must be a JSON object")
    if not isinstance(name, str) or not name:
        raise EventRejected("no_name", "the message carries no event name")
    return EventSignal(
        id=str(event_id or msg.fallback_id),
        name=name,
        payload=payload,
        source=msg.source,
        time=msg.time or utc_now(),
        metadata=msg.metadata,
        key=msg.key,
    )


def _configured_name(fmt: EventFormat, msg: Message, body: Any) -> str | None:
    if fmt.name_from:
        return fmt.name_from.resolve(msg.headers, body, msg.key)
    return fmt.name


def _configured_id(fmt: EventFormat, msg: Message, body: Any) -> str | None:
    return fmt.id_from.resolve(msg.headers, body, msg.key) if fmt.id_from else None


def _is_structured_ce(content_type: str | None) -> bool:
    return content_type is not None and content_type.split(";")[0].strip().lower() == CE_STRUCTURED


def _cloudevent(msg: Message, fmt: EventFormat) -> EventSignal:
    if _is_structured_ce(msg.content_type) or not msg.ce_attributes:
        body = parse_json(msg.body)
        if not isinstance(body, dict):
            raise EventRejected("malformed", "a structured CloudEvent must be a JSON object")
        attrs = {k: v for k, v in body.items() if k not in ("data", "data_base64")}
        data = body.get("data")
    else:
        attrs = dict(msg.ce_attributes)
        data = parse_json(msg.body) if msg.body else None
    missing = [a for a in CE_REQUIRED if not attrs.get(a)]
    if missing:
        raise EventRejected("malformed", f"CloudEvent lacks required attribute(s): {', '.join(missing)}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        data = {"data": data}
    metadata = dict(msg.metadata)
    metadata["cloudevents"] = {k: str(v) for k, v in attrs.items()}
    return EventSignal(
        id=str(attrs["id"]),
        name=str(attrs["type"]),
        payload=data,
        source=str(attrs["source"]),
        time=str(attrs.get("time") or "") or utc_now(),
        metadata=metadata,
        key=msg.key,
    )
