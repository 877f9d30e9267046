"""Events-API bodies → events: an envelope, a JSON array of envelopes, a CloudEvent (structured or
binary mode) or a CloudEvents batch.

A body that is no event at all raises :class:`EventRejected`, and so does a batch of more than
``max_batch`` items (``batch_too_large``, before any item is looked at); in a batch, each item is an
event or the reason that item was refused, so one bad item never fails its neighbours. Every JSON
parse goes through :func:`bridge.decode.parse_json`, whose limits (depth, numbers) apply here too.
The events of a batch share the request's kept headers (each has a shallow copy of the metadata
around them). Formats and event ids: docs/http-api.md and docs/cloudevents.md.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from adapters.http.state import HTTP_ADAPTER
from bridge.config import EventFormat
from bridge.decode import CE_STRUCTURED, Message, decode, envelope_id, parse_json
from bridge.errors import EventRejected
from bridge.event import EventSignal, utc_now

CE_BATCH = "application/cloudevents-batch+json"
Parsed = EventSignal | EventRejected


def parse(
    headers: Mapping[str, str],
    body: bytes,
    metadata: dict[str, Any],
    idempotency_key: str | None,
    *,
    max_batch: int,
    scope: str = HTTP_ADAPTER,
) -> EventSignal | list[Parsed]:
    """One event, or a batch whose items are events or the reason each was refused.

    ``scope`` is the events' source, ``http:{token name}``: it scopes their ids (never the
    sender's own ``source``). ``headers`` have lower-case names. The media type picks the CloudEvents formats; ``ce-*``
    headers make a binary-mode CloudEvent; anything else is an envelope or an array of them.
    """
    media = (headers.get("content-type") or "").split(";")[0].strip().lower()
    if media == CE_BATCH:
        return _cloudevents_batch(body, metadata, max_batch, scope)
    if media == CE_STRUCTURED:
        return _cloudevent(body, metadata, scope)
    # Binary mode: attribute values are percent-encoded (CloudEvents HTTP binding, 3.1.3.2). Bytes
    # that are no UTF-8 become \xNN, as on Kafka and RabbitMQ: replaced by U+FFFD, ids of different
    # bytes were one id, and all but the first event started nothing.
    ce_attrs = {k[3:]: unquote(v, errors="backslashreplace") for k, v in headers.items() if k.startswith("ce-")}
    if ce_attrs.get("specversion"):
        return _cloudevent(body, metadata, scope, attrs=ce_attrs, content_type=headers.get("content-type"))
    data = parse_json(body)
    if isinstance(data, list):
        _check_batch(data, max_batch)
        return _envelope_batch(data, idempotency_key, metadata, scope)
    if not isinstance(data, dict):
        raise EventRejected("malformed", "body must be a JSON object, or an array of them")
    return envelope(data, idempotency_key, metadata, scope)


def envelope(
    data: Any, event_id: str | None, metadata: dict[str, Any], scope: str = HTTP_ADAPTER, *, time: str | None = None
) -> EventSignal:
    """One envelope ``{"name", "payload"?, "id"?}`` (already parsed) → event.

    ``event_id`` (the Idempotency-Key) wins over the body ``id``; without either, a new UUID.
    ``time``: when it was received (the events of a batch share their request's); default now.
    """
    if not isinstance(data, dict):
        raise EventRejected("malformed", "an event must be a JSON object")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise EventRejected("no_name", "body needs a non-empty string 'name'")
    payload = data.get("payload", {})
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise EventRejected("malformed", "'payload' must be a JSON object")
    body_id = envelope_id(data.get("id"))
    event_id = event_id or body_id
    return EventSignal(
        id=event_id or str(uuid.uuid4()),
        name=name,
        payload=payload,
        source=scope,
        time=time or utc_now(),
        metadata=metadata,
    )


def _envelope_batch(
    items: list[Any], idempotency_key: str | None, metadata: dict[str, Any], scope: str
) -> list[Parsed]:
    """Ids: the item's ``id`` · ``{Idempotency-Key}:{index}`` · a UUID, so a batch retried with
    the same key starts nothing twice."""
    out: list[Parsed] = []
    now = utc_now()  # one clock read for the whole request
    for i, item in enumerate(items):
        has_id = item.get("id") is not None
        key = None if has_id or not idempotency_key else f"{idempotency_key}:{i}"
        try:
            out.append(envelope(item, key, dict(metadata), scope, time=now))
        except EventRejected as exc:
            out.append(exc)
    return out


def _cloudevent(
    body: bytes,
    metadata: dict[str, Any],
    scope: str,
    *,
    attrs: dict[str, str] | None = None,
    content_type: str | None = None,
    parsed: dict[str, Any] | None = None,
) -> EventSignal:
    """Structured mode, or binary mode with ``attrs`` (the ``ce-*`` headers), where the request's
    Content-Type is the ``datacontenttype`` (CloudEvents HTTP binding, 3.1.1). ``parsed``: a
    structured event already read (a batch's item), neither encoded nor parsed again."""
    msg = Message(
        body=body,
        source=scope,
        fallback_id=str(uuid.uuid4()),
        ce_attributes=attrs or {},
        content_type=content_type if attrs else CE_STRUCTURED,
        metadata=metadata,
        parsed=parsed,
    )
    return decode(msg, EventFormat(format="cloudevents"))


def _cloudevents_batch(body: bytes, metadata: dict[str, Any], max_batch: int, scope: str) -> list[Parsed]:
    """A JSON array of structured-mode CloudEvents (CloudEvents JSON format, section 4)."""
    items = parse_json(body)
    if not isinstance(items, list):
        raise EventRejected("malformed", "a CloudEvents batch must be a JSON array")
    _check_batch(items, max_batch)
    out: list[Parsed] = []
    for item in items:
        try:
            out.append(_cloudevent(b"", dict(metadata), scope, parsed=item))
        except EventRejected as exc:
            out.append(exc)
    return out


def _check_batch(items: list[Any], max_batch: int) -> None:
    """A batch is an array of at most ``max_batch`` objects; anything else is refused whole."""
    if len(items) > max_batch:
        raise EventRejected(
            "batch_too_large", f"the batch has {len(items)} events; http.max_batch_events allows {max_batch}"
        )
    if not all(isinstance(item, dict) for item in items):
        raise EventRejected("malformed", "a batch must be a JSON array of objects")
