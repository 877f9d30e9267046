"""``POST /api/v1/events``: events and batches from clients that hold a bearer token.

One event is answered 202 once Temporal holds it; a batch is answered per event, 202 when every
event was accepted and 207 otherwise. Formats, event ids and every answer: docs/http-api.md.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency, Provide
from litestar.openapi import ResponseSpec
from litestar.params import HeaderParameter

from adapters.http import answers
from adapters.http.answers import ACCEPTED, MULTI_STATUS, Accepted, BatchAnswer
from adapters.http.openapi import BEARER_AUTH, EventsOperation, error_responses
from adapters.http.parse import Parsed, parse
from adapters.http.problems import Problem
from adapters.http.request import headers, read_body, trace_metadata
from adapters.http.state import HTTP_ADAPTER, HttpState
from bridge.errors import EventRejected, Reason, Unavailable
from bridge.event import EventSignal
from bridge.ratelimit import retry_after
from bridge.snapshot import Snapshot

log = logging.getLogger(__name__)

REASONS: tuple[Reason, ...] = (
    "malformed",
    "no_name",
    "unauthorized",
    "too_large",
    "schema_invalid",
    "unroutable",
    "rate_limited",
    "unavailable",
)
"""Every reason this endpoint answers with (a test holds it to the code)."""


async def authorize(
    request: Request[Any, Any, Any], http: NamedDependency[HttpState], snapshot: NamedDependency[Snapshot]
) -> str:
    """The dependency ``token``: the caller's token name. 401 without a valid bearer token, 429
    over the token's rate limit; either before the body is read."""
    token = http.token_name(snapshot, request.headers.get("authorization"))
    if token is None:
        raise http.deny(HTTP_ADAPTER, "unauthorized", "a valid bearer token is required")
    limiter = http.limits(snapshot).tokens
    if limiter is not None and (wait := limiter.take(token)):
        raise http.deny(
            HTTP_ADAPTER,
            "rate_limited",
            "rate limit of this token exceeded; retry after the Retry-After delay",
            retry_after=retry_after(wait),
        )
    return token


class EventsController(Controller):
    path = "/api/v1/events"
    tags = ["events"]
    dependencies = {"token": Provide(authorize)}

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
        http: NamedDependency[HttpState],
        snapshot: NamedDependency[Snapshot],
        token: NamedDependency[str],
        idempotency_key: Annotated[
            str | None,
            HeaderParameter(
                name="Idempotency-Key",
                description=(
                    "The event id of an envelope (in a batch: {key}:{index}); a retry with it starts nothing twice."
                ),
            ),
        ] = None,
    ) -> Response[Accepted | BatchAnswer]:
        """Accept one event (202 once Temporal holds it) or a batch (202, or 207 when some event
        was refused; each event is answered in ``results``). Retries with the same
        ``Idempotency-Key`` (or body ``id``, or CloudEvents source+id) start nothing twice."""
        body = await read_body(request, http, snapshot, HTTP_ADAPTER)
        try:
            parsed = parse(headers(request), body, trace_metadata(request), idempotency_key)
        except EventRejected as exc:
            raise http.refuse(HTTP_ADAPTER, exc) from None
        if isinstance(parsed, list):
            return await _submit_batch(http, snapshot, token, parsed)
        return await _submit_one(http, snapshot, token, parsed)


async def _submit_one(http: HttpState, snap: Snapshot, token: str, event: EventSignal) -> Response[Any]:
    try:
        [outcome] = await http.pipeline.submit([event], HTTP_ADAPTER)
    except Unavailable as exc:
        raise Problem.unavailable(
            exc,
            snap.config.http.retry_after_seconds,
            "Temporal did not accept the event; retry with the same Idempotency-Key",
            event_id=event.id,
        ) from None
    except EventRejected as exc:
        raise Problem.of(exc, event_id=event.id) from None
    if outcome.rejected is not None:
        raise Problem.of(outcome.rejected, event_id=event.id)
    log.info("event accepted adapter=http token=%s id=%s name=%s", token, event.id, event.name)
    return Response(answers.accepted(event), status_code=ACCEPTED)


async def _submit_batch(http: HttpState, snap: Snapshot, token: str, items: list[Parsed]) -> Response[Any]:
    events = [item for item in items if isinstance(item, EventSignal)]
    for item in items:
        if isinstance(item, EventRejected):
            http.refuse(HTTP_ADAPTER, item)
    try:
        outcomes = iter(await http.pipeline.submit(events, HTTP_ADAPTER) if events else [])
    except Unavailable as exc:
        raise Problem.unavailable(
            exc,
            snap.config.http.retry_after_seconds,
            "Temporal did not accept the batch; nothing of it is held, retry it whole",
            event_ids=[e.id for e in events],
        ) from None
    except EventRejected as exc:
        raise Problem.of(exc) from None
    results = [
        {
            "index": index,
            **(answers.refused(item) if isinstance(item, EventRejected) else answers.result(next(outcomes))),
        }
        for index, item in enumerate(items)
    ]
    answer = answers.batch(results)
    log.info("batch adapter=http token=%s accepted=%d rejected=%d", token, answer["accepted"], answer["rejected"])
    return Response(answer, status_code=ACCEPTED if answer["rejected"] == 0 else MULTI_STATUS)
