"""The HTTP door: ``POST /api/v1/events``, health, readiness and metrics, as a litestar app.

A request is answered 202 only after Temporal holds its event. Errors, one table:

=====================================  ======  ==========================================
what                                   status  body ``error``
=====================================  ======  ==========================================
no or wrong bearer token               401     ``unauthorized``
body over ``http.max_body_bytes``      413     ``too_large``
not JSON, no ``name``, bad ``payload``  400     ``malformed`` / ``no_name``
schema refuses the payload             422     ``schema_invalid`` (+ workflow, schema_path)
no trigger names the event             422     ``unroutable``
Temporal did not take it               503     ``unavailable`` + ``Retry-After``
=====================================  ======  ==========================================
"""

from __future__ import annotations

import hmac
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.status_codes import (
    HTTP_202_ACCEPTED,
    HTTP_400_BAD_REQUEST,
    HTTP_401_UNAUTHORIZED,
    HTTP_413_REQUEST_ENTITY_TOO_LARGE,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_503_SERVICE_UNAVAILABLE,
)

from bridge.config import EventFormat, HttpConfig
from bridge.decode import CE_STRUCTURED, Message, decode
from bridge.errors import EventRejected, Unavailable
from bridge.event import EventSignal
from bridge.pipeline import Pipeline

log = logging.getLogger(__name__)

DOOR = "http"
STATUS = {
    "malformed": HTTP_400_BAD_REQUEST,
    "no_name": HTTP_400_BAD_REQUEST,
    "too_large": HTTP_413_REQUEST_ENTITY_TOO_LARGE,
    "schema_invalid": HTTP_422_UNPROCESSABLE_ENTITY,
    "unroutable": HTTP_422_UNPROCESSABLE_ENTITY,
}
Ready = Callable[[], Awaitable[dict[str, bool]]]


def _problem(status: int, error: str, message: str, **extra: Any) -> Response[dict[str, Any]]:
    headers = {}
    if "retry_after" in extra:
        headers["Retry-After"] = str(int(extra.pop("retry_after")))
    return Response({"error": error, "message": message, **extra}, status_code=status, headers=headers)


class TokenCheck:
    """Bearer tokens compared in constant time against every configured token."""

    def __init__(self, tokens: list[str], *, insecure: bool = False) -> None:
        self._tokens = [t.encode() for t in tokens if t]
        self.insecure = insecure and not self._tokens

    def allows(self, header: str | None) -> bool:
        if self.insecure:
            return True
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode()
        ok = False
        for expected in self._tokens:
            ok |= hmac.compare_digest(given, expected)
        return ok


def parse_envelope(body: bytes, idempotency_key: str | None, metadata: dict[str, Any]) -> EventSignal:
    """The events-API body ``{"name", "payload"?, "id"?}`` → event, or EventRejected."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EventRejected("malformed", f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise EventRejected("malformed", "body must be a JSON object")
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
    event_id = idempotency_key or (str(body_id) if body_id is not None else None)
    return EventSignal(
        id=event_id or str(uuid.uuid4()),
        name=name,
        payload=payload,
        source=DOOR,
        metadata=metadata,
    )


def _parse(request: Request[Any, Any, Any], body: bytes, metadata: dict[str, Any]) -> EventSignal:
    """CloudEvents (structured: content type; binary: ``ce-*`` headers) or an envelope."""
    content_type = request.headers.get("content-type")
    ce_attrs = {k[3:]: v for k, v in request.headers.items() if k.lower().startswith("ce-")}
    if ce_attrs.get("specversion") or (content_type or "").lower().startswith(CE_STRUCTURED):
        msg = Message(
            body=body,
            source=DOOR,
            fallback_id=str(uuid.uuid4()),
            ce_attributes=ce_attrs,
            content_type=content_type,
            metadata=metadata,
        )
        return decode(msg, EventFormat(format="cloudevents"))
    return parse_envelope(body, request.headers.get("idempotency-key"), metadata)


def create_app(
    pipeline: Pipeline,
    config: HttpConfig,
    *,
    ready: Ready | None = None,
    insecure: bool = False,
    lifespan: list[Any] | None = None,
) -> Litestar:
    tokens = TokenCheck(config.auth.tokens, insecure=insecure)
    metrics = pipeline.metrics

    @post("/api/v1/events", status_code=HTTP_202_ACCEPTED, summary="Send an event")
    async def send_event(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        """Accept one event; 202 once Temporal holds it. Retries with the same
        ``Idempotency-Key`` (or body ``id``) start nothing twice."""
        if not tokens.allows(request.headers.get("authorization")):
            metrics.rejected.labels(DOOR, "unauthorized").inc()
            return _problem(HTTP_401_UNAUTHORIZED, "unauthorized", "a valid bearer token is required")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > config.max_body_bytes:
            return _too_large(pipeline, config)
        try:
            body = await request.body()
        except HTTPException as exc:
            if exc.status_code == HTTP_413_REQUEST_ENTITY_TOO_LARGE:
                return _too_large(pipeline, config)
            raise
        if len(body) > config.max_body_bytes:
            return _too_large(pipeline, config)
        metadata = _metadata(request)
        try:
            event = _parse(request, body, metadata)
        except EventRejected as exc:
            pipeline.reject(DOOR, None, None, exc)
            return _problem(STATUS[exc.reason], exc.reason, exc.message, **exc.details)
        try:
            [outcome] = await pipeline.submit([event], DOOR)
        except Unavailable as exc:
            return _problem(
                HTTP_503_SERVICE_UNAVAILABLE,
                "unavailable",
                "Temporal did not accept the event; retry with the same Idempotency-Key",
                retry_after=max(exc.retry_after, config.retry_after_seconds),
                event_id=event.id,
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
        route_handlers=[send_event, healthz, readyz, metrics_endpoint],
        request_max_body_size=config.max_body_bytes,
        openapi_config=OpenAPIConfig(title="signal-bridge", version="0.1.0", path="/schema"),
        lifespan=lifespan or [],
    )


def _too_large(pipeline: Pipeline, config: HttpConfig) -> Response[dict[str, Any]]:
    exc = EventRejected("too_large", f"body exceeds http.max_body_bytes ({config.max_body_bytes} bytes)")
    pipeline.reject(DOOR, None, None, exc)
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
