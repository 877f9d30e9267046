"""The HTTP door: the events API, webhooks, health, readiness and metrics, as a litestar app.

``POST /api/v1/events`` (bearer token) takes one event — an envelope ``{"name", "payload"?,
"id"?}`` or a CloudEvent in structured (``application/cloudevents+json``) or binary (``ce-*``
headers) mode — or a batch: a JSON array of envelopes, or a CloudEvents batch
(``application/cloudevents-batch+json``). One event is answered 202 once Temporal holds it;
a batch is answered per event (202 when every event was accepted, else 207; see
:func:`_batch_answer`).

``POST /api/v1/hooks/{slug}`` takes webhook deliveries, authenticated by their signature (see
:mod:`bridge.webhooks`), never by a bearer token.

Errors, one table:

=====================================  ======  ==========================================
what                                   status  body ``error``
=====================================  ======  ==========================================
no or wrong bearer token               401     ``unauthorized``
webhook signature bad, missing, stale  401     ``unauthorized`` (never says which)
no webhook with that slug              404     ``not_found``
body over ``http.max_body_bytes``      413     ``too_large``
rate limit of the token or webhook     429     ``rate_limited`` + ``Retry-After``
not JSON, no ``name``, bad ``payload``  400     ``malformed`` / ``no_name``
schema refuses the payload             422     ``schema_invalid`` (+ workflow, schema_path)
no trigger names the event             422     ``unroutable``
a webhook's ``input:`` cannot render   422     ``input_failed``
Temporal did not take it               503     ``unavailable`` + ``Retry-After``
=====================================  ======  ==========================================

A webhook delivery that no ``events:`` entry matches is answered 200 ``{"status": "ignored"}``:
providers retry anything but a 2xx.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import unquote

from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.params import FromPath
from litestar.status_codes import (
    HTTP_200_OK,
    HTTP_202_ACCEPTED,
    HTTP_207_MULTI_STATUS,
    HTTP_400_BAD_REQUEST,
    HTTP_401_UNAUTHORIZED,
    HTTP_404_NOT_FOUND,
    HTTP_413_REQUEST_ENTITY_TOO_LARGE,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_429_TOO_MANY_REQUESTS,
    HTTP_503_SERVICE_UNAVAILABLE,
)

from bridge.config import EventFormat, HttpConfig
from bridge.decode import CE_STRUCTURED, Message, decode, parse_json
from bridge.errors import EventRejected, Unavailable
from bridge.event import EventSignal
from bridge.pipeline import Outcome, Pipeline
from bridge.ratelimit import RateLimiter, TokenBucket, default_burst, retry_after
from bridge.snapshot import Snapshot
from bridge.signatures import SignatureInvalid
from bridge.webhooks import WebhookRoute

log = logging.getLogger(__name__)

DOOR = "http"
WEBHOOK_DOOR = "webhook"
CE_BATCH = "application/cloudevents-batch+json"
STATUS = {
    "malformed": HTTP_400_BAD_REQUEST,
    "no_name": HTTP_400_BAD_REQUEST,
    "too_large": HTTP_413_REQUEST_ENTITY_TOO_LARGE,
    "schema_invalid": HTTP_422_UNPROCESSABLE_ENTITY,
    "unroutable": HTTP_422_UNPROCESSABLE_ENTITY,
    "input_failed": HTTP_422_UNPROCESSABLE_ENTITY,
}
Ready = Callable[[], Awaitable[dict[str, bool]]]
Parsed = EventSignal | EventRejected


def _problem(status: int, error: str, message: str, **extra: Any) -> Response[dict[str, Any]]:
    headers = {}
    if "retry_after" in extra:
        headers["Retry-After"] = str(int(extra.pop("retry_after")))
    return Response({"error": error, "message": message, **extra}, status_code=status, headers=headers)


class TokenCheck:
    """The current snapshot's bearer tokens; with none configured and ``insecure``, anyone."""

    def __init__(self, current: Callable[[], Snapshot], *, insecure: bool = False) -> None:
        self._current = current
        self._insecure = insecure

    def match(self, header: str | None) -> str | None:
        """A name for the token the header carries (``token-1``, …; ``anonymous`` when insecure),
        or None when it carries none of them. The name, not the token, keys rate limits."""
        tokens = self._current().tokens
        if self._insecure and not tokens:
            return "anonymous"
        return tokens.match(header)

    def allows(self, header: str | None) -> bool:
        return self.match(header) is not None


def envelope(data: Any, event_id: str | None, metadata: dict[str, Any]) -> EventSignal:
    """One events-API envelope ``{"name", "payload"?, "id"?}`` (already parsed) → event.

    ``event_id`` (the Idempotency-Key) wins over the body ``id``; without either, a new UUID.
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
    body_id = data.get("id")
    if body_id is not None and not isinstance(body_id, str | int):
        raise EventRejected("malformed", "'id' must be a string")
    event_id = event_id or (str(body_id) if body_id is not None else None)
    return EventSignal(
        id=event_id or str(uuid.uuid4()),
        name=name,
        payload=payload,
        source=DOOR,
        metadata=metadata,
    )


def parse_envelope(body: bytes, idempotency_key: str | None, metadata: dict[str, Any]) -> EventSignal:
    """The events-API body ``{"name", "payload"?, "id"?}`` → event, or EventRejected."""
    data = parse_json(body)
    if not isinstance(data, dict):
        raise EventRejected("malformed", "body must be a JSON object")
    return envelope(data, idempotency_key, metadata)


def _envelope_batch(items: list[Any], idempotency_key: str | None, metadata: dict[str, Any]) -> list[Parsed]:
    """A JSON array of envelopes. Ids: the item's ``id`` · ``{Idempotency-Key}:{index}`` · a UUID,
    so a batch retried with the same key starts nothing twice."""
    _objects_only(items)
    out: list[Parsed] = []
    for i, item in enumerate(items):
        has_id = item.get("id") is not None
        key = None if has_id or not idempotency_key else f"{idempotency_key}:{i}"
        try:
            out.append(envelope(item, key, dict(metadata)))
        except EventRejected as exc:
            out.append(exc)
    return out


def _cloudevent(body: bytes, metadata: dict[str, Any], *, attrs: dict[str, str] | None = None) -> EventSignal:
    msg = Message(
        body=body,
        source=DOOR,
        fallback_id=str(uuid.uuid4()),
        ce_attributes=attrs or {},
        content_type=None if attrs else CE_STRUCTURED,
        metadata=metadata,
    )
    return decode(msg, EventFormat(format="cloudevents"))


def _cloudevents_batch(body: bytes, metadata: dict[str, Any]) -> list[Parsed]:
    """``application/cloudevents-batch+json``: a JSON array of structured-mode CloudEvents."""
    items = parse_json(body)
    if not isinstance(items, list):
        raise EventRejected("malformed", "a CloudEvents batch must be a JSON array")
    _objects_only(items)
    out: list[Parsed] = []
    for item in items:
        try:
            out.append(_cloudevent(json.dumps(item).encode(), dict(metadata)))
        except EventRejected as exc:
            out.append(exc)
    return out


def _objects_only(items: list[Any]) -> None:
    """A batch is an array of objects; anything else is no batch at all (400 for the whole)."""
    if not all(isinstance(item, dict) for item in items):
        raise EventRejected("malformed", "a batch must be a JSON array of objects")


def _parse(request: Request[Any, Any, Any], body: bytes, metadata: dict[str, Any]) -> EventSignal | list[Parsed]:
    """One event, or a batch whose items are events or the reason each was refused."""
    media = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if media == CE_BATCH:
        return _cloudevents_batch(body, metadata)
    if media == CE_STRUCTURED:
        return _cloudevent(body, metadata)
    # Binary mode: attribute values are percent-encoded (CloudEvents HTTP binding, 3.1.3.2).
    ce_attrs = {k[3:].lower(): unquote(v) for k, v in request.headers.items() if k.lower().startswith("ce-")}
    if ce_attrs.get("specversion"):
        return _cloudevent(body, metadata, attrs=ce_attrs)
    data = parse_json(body)
    key = request.headers.get("idempotency-key")
    if isinstance(data, list):
        return _envelope_batch(data, key, metadata)
    if not isinstance(data, dict):
        raise EventRejected("malformed", "body must be a JSON object, or an array of them")
    return envelope(data, key, metadata)


def _headers(request: Request[Any, Any, Any]) -> dict[str, str]:
    """Lower-cased names; the first of repeated headers."""
    out: dict[str, str] = {}
    for name, value in request.headers.items():
        out.setdefault(name.lower(), value)
    return out


def _event_result(outcome: Outcome) -> dict[str, Any]:
    event, rej = outcome.event, outcome.rejected
    if rej is None:
        return {"status": HTTP_202_ACCEPTED, "event_id": event.id, "name": event.name}
    return {
        "status": STATUS.get(rej.reason, HTTP_400_BAD_REQUEST),
        "event_id": event.id,
        "name": event.name,
        **rej.as_dict(),
    }


def _batch_answer(results: list[dict[str, Any]], *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    accepted = sum(1 for r in results if r["status"] == HTTP_202_ACCEPTED)
    rejected = len(results) - accepted
    status = "accepted" if rejected == 0 else "rejected" if accepted == 0 else "partial"
    return {"status": status, **(extra or {}), "accepted": accepted, "rejected": rejected, "results": results}


class Webhooks:
    """The current snapshot's webhook routes and their rate-limit buckets.

    A bucket survives a reload when its webhook's limit did not change.
    """

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self._source = source
        self._seen: Snapshot | None = None
        self.routes: Mapping[str, WebhookRoute] = {}
        self.buckets: dict[str, TokenBucket] = {}

    def current(self) -> Webhooks:
        snap = self._source()
        if snap is not self._seen:
            self.routes = snap.webhooks
            buckets = {}
            for hook in snap.config.webhooks:
                limit = hook.rate_limit or snap.config.http.rate_limit.per_webhook
                if limit is None:
                    continue
                burst = limit.burst or default_burst(limit.rate)
                old = self.buckets.get(hook.slug)
                same = old is not None and (old.rate, old.burst) == (limit.rate, burst)
                buckets[hook.slug] = old if same and old is not None else TokenBucket(limit.rate, burst)
            self.buckets = buckets
            self._seen = snap
        return self


def create_app(
    pipeline: Pipeline,
    source: Snapshot | Callable[[], Snapshot],
    *,
    ready: Ready | None = None,
    insecure: bool = False,
    lifespan: list[Any] | None = None,
) -> Litestar:
    """The HTTP adapter. ``source`` returns the current config snapshot, so a reload adds, changes
    and removes webhook routes and tokens."""
    current: Callable[[], Snapshot] = source if callable(source) else (lambda: source)
    config = current().config.http
    tokens = TokenCheck(current, insecure=insecure)
    metrics = pipeline.metrics
    hooks = Webhooks(current)
    per_token = config.rate_limit.per_token
    token_limits = RateLimiter(per_token.rate, per_token.burst) if per_token else None

    async def read_body(request: Request[Any, Any, Any], door: str) -> bytes | Response[dict[str, Any]]:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > config.max_body_bytes:
            return _too_large(pipeline, config, door)
        try:
            body = await request.body()
        except HTTPException as exc:
            if exc.status_code == HTTP_413_REQUEST_ENTITY_TOO_LARGE:
                return _too_large(pipeline, config, door)
            raise
        if len(body) > config.max_body_bytes:
            return _too_large(pipeline, config, door)
        return body

    def rate_limited(door: str, wait: float, what: str) -> Response[dict[str, Any]]:
        metrics.rejected.labels(door, "rate_limited").inc()
        return _problem(
            HTTP_429_TOO_MANY_REQUESTS,
            "rate_limited",
            f"rate limit of this {what} exceeded; retry after the Retry-After delay",
            retry_after=retry_after(wait),
        )

    def unavailable(exc: Unavailable, message: str, **extra: Any) -> Response[dict[str, Any]]:
        return _problem(
            HTTP_503_SERVICE_UNAVAILABLE,
            "unavailable",
            message,
            retry_after=max(exc.retry_after, config.retry_after_seconds),
            **extra,
        )

    @post("/api/v1/events", status_code=HTTP_202_ACCEPTED, summary="Send an event or a batch of events")
    async def send_event(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        """Accept one event (202 once Temporal holds it) or a batch (202, or 207 when some event
        was refused; each event is answered in ``results``). Retries with the same
        ``Idempotency-Key`` (or body ``id``, or CloudEvents source+id) start nothing twice."""
        token = tokens.match(request.headers.get("authorization"))
        if token is None:
            metrics.rejected.labels(DOOR, "unauthorized").inc()
            return _problem(HTTP_401_UNAUTHORIZED, "unauthorized", "a valid bearer token is required")
        if token_limits is not None and (wait := token_limits.take(token)):
            return rate_limited(DOOR, wait, "token")
        body = await read_body(request, DOOR)
        if isinstance(body, Response):
            return body
        try:
            parsed = _parse(request, body, _metadata(request))
        except EventRejected as exc:
            pipeline.reject(DOOR, None, None, exc)
            return _problem(STATUS[exc.reason], exc.reason, exc.message, **exc.details)
        if isinstance(parsed, list):
            return await submit_batch(parsed)
        return await submit_one(parsed)

    async def submit_one(event: EventSignal) -> Response[dict[str, Any]]:
        try:
            [outcome] = await pipeline.submit([event], DOOR)
        except Unavailable as exc:
            return unavailable(
                exc, "Temporal did not accept the event; retry with the same Idempotency-Key", event_id=event.id
            )
        except EventRejected as exc:
            return _problem(STATUS.get(exc.reason, 400), exc.reason, exc.message, event_id=event.id)
        if outcome.rejected is not None:
            rej = outcome.rejected
            return _problem(STATUS[rej.reason], rej.reason, rej.message, event_id=event.id, **rej.details)
        log.info("event accepted door=http id=%s name=%s", event.id, event.name)
        return Response(
            {"status": "accepted", "event_id": event.id, "name": event.name},
            status_code=HTTP_202_ACCEPTED,
        )

    async def submit_batch(items: list[Parsed]) -> Response[dict[str, Any]]:
        events = [item for item in items if isinstance(item, EventSignal)]
        for item in items:
            if isinstance(item, EventRejected):
                pipeline.reject(DOOR, None, None, item)
        try:
            outcomes = iter(await pipeline.submit(events, DOOR) if events else [])
        except Unavailable as exc:
            return unavailable(
                exc,
                "Temporal did not accept the batch; nothing of it is held, retry it whole",
                event_ids=[e.id for e in events],
            )
        except EventRejected as exc:
            return _problem(STATUS.get(exc.reason, 400), exc.reason, exc.message)
        results = []
        for index, item in enumerate(items):
            if isinstance(item, EventRejected):
                result = {"status": STATUS.get(item.reason, HTTP_400_BAD_REQUEST), **item.as_dict()}
            else:
                result = _event_result(next(outcomes))
            results.append({"index": index, **result})
        answer = _batch_answer(results)
        log.info("batch door=http accepted=%d rejected=%d", answer["accepted"], answer["rejected"])
        return Response(answer, status_code=HTTP_202_ACCEPTED if answer["rejected"] == 0 else HTTP_207_MULTI_STATUS)

    @post("/api/v1/hooks/{slug:str}", status_code=HTTP_202_ACCEPTED, summary="Receive a webhook delivery")
    async def receive_webhook(slug: FromPath[str], request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        """A provider's delivery, authenticated by its signature (``webhooks[].verify``): 202 once
        Temporal holds its events, 200 ``ignored`` when no ``events:`` entry matches. A
        redelivery (same delivery id) starts nothing twice."""
        current = hooks.current()
        route = current.routes.get(slug)
        if route is None:
            metrics.rejected.labels(WEBHOOK_DOOR, "not_found").inc()
            return _problem(HTTP_404_NOT_FOUND, "not_found", "no webhook is configured at this path")
        body = await read_body(request, WEBHOOK_DOOR)
        if isinstance(body, Response):
            return body
        headers = _headers(request)
        try:
            route.verify(headers, body)
        except SignatureInvalid as exc:
            log.warning("webhook refused slug=%s: %s", slug, exc)
            metrics.rejected.labels(WEBHOOK_DOOR, "unauthorized").inc()
            return _problem(HTTP_401_UNAUTHORIZED, "unauthorized", "the delivery's signature did not verify")
        bucket = current.buckets.get(slug)
        if bucket is not None and (wait := bucket.take()):
            return rate_limited(WEBHOOK_DOOR, wait, "webhook")
        try:
            delivery = route.events(headers, body, headers.get("content-type"))
        except EventRejected as exc:
            pipeline.reject(WEBHOOK_DOOR, None, None, exc)
            return _problem(STATUS.get(exc.reason, 400), exc.reason, exc.message, **exc.details)
        if not delivery.events:
            metrics.dropped.labels(WEBHOOK_DOOR, "no_match").inc()
            log.info("webhook ignored slug=%s delivery=%s: no event entry matches", slug, delivery.delivery_id)
            return Response(
                {
                    "status": "ignored",
                    "delivery_id": delivery.delivery_id,
                    "message": f"no event entry of webhook {slug!r} matches this delivery",
                },
                status_code=HTTP_200_OK,
            )
        try:
            outcomes = await pipeline.submit(delivery.events, WEBHOOK_DOOR)
        except Unavailable as exc:
            return unavailable(
                exc,
                "Temporal did not accept the delivery; its redelivery will be",
                delivery_id=delivery.delivery_id,
            )
        except EventRejected as exc:
            return _problem(STATUS.get(exc.reason, 400), exc.reason, exc.message, delivery_id=delivery.delivery_id)
        answer = _batch_answer([_event_result(o) for o in outcomes], extra={"delivery_id": delivery.delivery_id})
        log.info(
            "webhook delivery slug=%s delivery=%s accepted=%d rejected=%d",
            slug,
            delivery.delivery_id,
            answer["accepted"],
            answer["rejected"],
        )
        if answer["rejected"]:
            # A refused event is a config matter (no workflow, schema): a non-2xx shows it in the
            # provider's console and makes it retry, which succeeds once the config is fixed; the
            # events already accepted start nothing twice.
            first = next(r for r in answer["results"] if r["status"] != HTTP_202_ACCEPTED)
            return Response(answer, status_code=first["status"])
        return Response(answer, status_code=HTTP_202_ACCEPTED)

    @get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @get("/readyz", summary="Readiness: Temporal reachable, worker and consumers running")
    async def readyz() -> Response[dict[str, Any]]:
        checks = await ready() if ready else {}
        ok = all(checks.values())
        return Response(
            {"status": "ready" if ok else "not ready", "checks": checks},
            status_code=200 if ok else HTTP_503_SERVICE_UNAVAILABLE,
        )

    @get("/metrics", summary="Prometheus metrics", media_type="text/plain; version=0.0.4")
    async def metrics_endpoint() -> bytes:
        return metrics.render()

    return Litestar(
        route_handlers=[send_event, receive_webhook, healthz, readyz, metrics_endpoint],
        request_max_body_size=config.max_body_bytes,
        openapi_config=OpenAPIConfig(title="signal-bridge", version="0.1.0", path="/schema"),
        lifespan=lifespan or [],
    )


def _too_large(pipeline: Pipeline, config: HttpConfig, door: str = DOOR) -> Response[dict[str, Any]]:
    exc = EventRejected("too_large", f"body exceeds http.max_body_bytes ({config.max_body_bytes} bytes)")
    pipeline.reject(door, None, None, exc)
    return _problem(HTTP_413_REQUEST_ENTITY_TOO_LARGE, exc.reason, exc.message)


_KEPT_HEADERS = ("traceparent", "tracestate", "x-request-id", "x-correlation-id", "user-agent")


def _metadata(request: Request[Any, Any, Any]) -> dict[str, Any]:
    headers = {h: request.headers[h] for h in _KEPT_HEADERS if h in request.headers}
    meta: dict[str, Any] = {"headers": headers}
    if "x-correlation-id" in headers:
        meta["correlation_id"] = headers["x-correlation-id"]
    if "traceparent" in headers:
        meta["traceparent"] = headers["traceparent"]
    return meta
