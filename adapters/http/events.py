"""``POST /api/v1/events``: events and batches from clients that hold a bearer token.

One event is answered 202 once Temporal holds it; a batch is answered per event, 202 when every
event was accepted and 207 otherwise. Formats, event ids and every answer: docs/http-api.md.

The hot path: the handler takes no injected dependency and has no guard (litestar resolves and
validates each dependency, and copies the handler for each guard, on every request: together more
than the handler's own work with one event). It reads the adapter's state, the snapshot and the
headers once, and checks the bearer token itself, before the body is read.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from typing import Annotated, Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.params import QueryParameter

from adapters.http import answers, lookup
from adapters.http.answers import ACCEPTED, MULTI_STATUS, Accepted, BatchAnswer, EventRuns
from adapters.http.openapi import BEARER_AUTH, EventsOperation, error_responses
from adapters.http.parse import Parsed, parse
from adapters.http.problems import Problem
from adapters.http.request import headers, read_body, trace_metadata
from adapters.http.state import HTTP_ADAPTER, HttpState, Weighed
from bridge.errors import EventRejected, Reason
from bridge.event import EventSignal
from bridge.logsafe import safe
from bridge.snapshot import Snapshot

log = logging.getLogger(__name__)

REASONS: tuple[Reason, ...] = (
    "malformed",
    "no_name",
    "unauthorized",
    "too_large",
    "too_slow",
    "batch_too_large",
    "schema_invalid",
    "unroutable",
    "target_invalid",
    "rate_limited",
    "unavailable",
    "overloaded",
)
"""Every reason this endpoint answers with (a test holds it to the code)."""

UNREADABLE = "the body could not be read as an event"


def authorize(http: HttpState, snapshot: Snapshot, received: Mapping[str, str]) -> str:
    """The caller's token name. 401 without a valid bearer token, 429 while the token's bucket is
    empty; either before the body is read. The bucket is charged once the body says how many
    events it holds. ``received``: the request's headers (:func:`adapters.http.request.headers`)."""
    token = http.token_name(snapshot, received.get("authorization"))
    if token is None:
        raise http.deny(HTTP_ADAPTER, "unauthorized", "a valid bearer token is required")
    http.charge(token, 1, take=False)
    return token


def as_utf8(value: str | None) -> str | None:
    """A header value (read as Latin-1, byte for byte) as the UTF-8 its sender wrote, or as it is
    when its bytes are not UTF-8: the key ``café`` is the event id ``café``, which a look-up of
    ``/api/v1/events/caf%C3%A9`` finds, not ``cafÃ©``."""
    if value is None or value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


class EventsController(Controller):
    path = "/api/v1/events"
    tags = ["events"]

    @post(
        status_code=ACCEPTED,
        summary="Send an event or a batch of events",
        operation_id="sendEvents",
        operation_class=EventsOperation,
        security=BEARER_AUTH,
        responses={
            MULTI_STATUS: ResponseSpec(
                BatchAnswer, description="A batch in which some event was refused", generate_examples=False
            ),
            **error_responses(REASONS),
        },
    )
    async def send(
        self,
        request: Request[Any, Any, Any],
    ) -> Response[Accepted | BatchAnswer]:
        """Accept one event (202 once Temporal holds it) or a batch (202, or 207 when some event
        was refused; each event is answered in ``results``). Retries with the same
        ``Idempotency-Key`` (or body ``id``, or CloudEvents source+id) start nothing twice."""
        http = HttpState.of(request)
        snapshot = http.current()
        received = headers(request)
        idempotency_key = as_utf8(received.get("idempotency-key"))  # documented by EventsOperation
        token = authorize(http, snapshot, received)
        sender = _sender(token)
        with http.held(HTTP_ADAPTER, sender):
            try:
                body = await read_body(request, http, snapshot, HTTP_ADAPTER, received)
            except EventRejected:
                _take(http, token)
                raise
            with http.parsing(snapshot, HTTP_ADAPTER, sender, body) as weighed:  # its memory, before it is parsed
                try:
                    parsed = _parse(http, snapshot, received, body, idempotency_key, token)
                except EventRejected:
                    _take(http, token)
                    raise
                if isinstance(parsed, list):
                    http.charge(token, max(1, len(parsed)))
                    return await _submit_batch(http, snapshot, token, parsed, weighed)
                http.charge(token, 1)
                return await _submit_one(http, snapshot, token, parsed, weighed)

    @get(
        "/",
        summary="The runs an event started, by an id given as a query parameter",
        operation_id="lookUpEventById",
        security=BEARER_AUTH,
        responses=error_responses(lookup.QUERY_REASONS),
    )
    async def look_up_by_query(
        self,
        request: Request[Any, Any, Any],
        http: NamedDependency[HttpState],
        snapshot: NamedDependency[Snapshot],
        event_id: Annotated[
            str | None, QueryParameter(name="id", description="The event id, any characters, URL-encoded")
        ] = None,
    ) -> EventRuns:
        """As ``GET /api/v1/events/{event_id}``, for any id (one with ``/``, such as a CloudEvent's
        ``{source}#{id}`` with a URL for its source)."""
        return await lookup.runs_of(request, event_id, http, snapshot)


def _take(http: HttpState, token: str) -> None:
    """A refused body still costs its request of the token's rate limit."""
    if (limiter := http.limits().tokens) is not None:
        limiter.take(token)


def _parse(
    http: HttpState,
    snap: Snapshot,
    received: Mapping[str, str],
    body: bytes,
    idempotency_key: str | None,
    token: str,
) -> EventSignal | list[Parsed]:
    """The body's event or batch. Whatever goes wrong is a counted and logged refusal (400/413),
    never a 500: the parsers raise only :class:`EventRejected` (property tests hold them to it),
    and anything else they raise is logged with its traceback and answered ``malformed``."""
    try:
        meta = trace_metadata(received)
        return parse(
            received,
            body,
            meta,
            idempotency_key,
            max_batch=snap.config.http.max_batch_events,
            scope=f"{HTTP_ADAPTER}:{token}",
        )
    except EventRejected as exc:
        raise http.refuse(HTTP_ADAPTER, exc) from None
    except Problem:  # the JSON it hid would hold too much memory (http.max_parsed_bytes)
        raise
    except Exception:
        log.exception("events body refused adapter=http: the parser failed unexpectedly")
        raise http.refuse(HTTP_ADAPTER, EventRejected("malformed", UNREADABLE)) from None


async def _submit_one(
    http: HttpState, snap: Snapshot, token: str, event: EventSignal, weighed: Weighed
) -> Response[Any]:
    retry_hint = "Temporal did not accept the event; retry with the same Idempotency-Key"
    sender = _sender(token)
    [outcome] = await http.submit(
        snap, [event], HTTP_ADAPTER, retry_hint, sender=sender, weighed=weighed, event_id=event.id
    )
    if outcome.rejected is not None:
        raise Problem.of(outcome.rejected, event_id=event.id)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("event accepted adapter=http token=%s id=%s name=%s", safe(token), safe(event.id), safe(event.name))
    return Response(answers.accepted(event), status_code=ACCEPTED)


async def _submit_batch(
    http: HttpState, snap: Snapshot, token: str, items: list[Parsed], weighed: Weighed
) -> Response[Any]:
    events = [item for item in items if isinstance(item, EventSignal)]
    http.refuse_items(HTTP_ADAPTER, [item for item in items if isinstance(item, EventRejected)])
    retry_hint = "Temporal did not accept the batch; nothing of it is held, retry it whole"
    ids = [e.id for e in events]
    sender = _sender(token)
    outcomes = iter(
        await http.submit(snap, events, HTTP_ADAPTER, retry_hint, sender=sender, weighed=weighed, event_ids=ids)
        if events
        else []
    )
    results = [
        {
            "index": index,
            **(answers.refused(item) if isinstance(item, EventRejected) else answers.result(next(outcomes))),
        }
        for index, item in enumerate(items)
    ]
    answer = answers.batch(results)
    _log_batch(token, answer)
    return weighed.answer(answer, ACCEPTED if answer["rejected"] == 0 else MULTI_STATUS)


def _sender(token: str) -> str:
    """Whose share a token's requests and events are counted in."""
    return f"{HTTP_ADAPTER}:{token}"


def _log_batch(token: str, answer: dict[str, Any]) -> None:
    """One line per batch, with how many events were refused for each reason."""
    reasons = Counter(str(r["error"]) for r in answer["results"] if "error" in r)
    log.log(
        logging.WARNING if reasons else logging.INFO,
        "batch adapter=http token=%s accepted=%d rejected=%d%s",
        safe(token),
        answer["accepted"],
        answer["rejected"],
        "".join(f" {reason}={n}" for reason, n in sorted(reasons.items())),
    )
