"""``GET /api/v1/events/{event_id}`` (or ``?id={event_id}``): the runs an event started, for the
caller's own source.

The path form takes an id without ``/``; the query form (a handler of
:class:`adapters.http.events.EventsController`, which has that path) takes any id. A path is read after it is
decoded and its empty segments dropped, so ``%2F`` in a path cannot stand for a ``/`` of the id (and
``https://…`` would lose a slash); a query value is decoded exactly.

A token holder reads only the events sent with its token (the source ``http:{token name}``): the
look-up is scoped by the source the adapter set, never by anything the caller says. The runtime
injects the look-up (:class:`adapters.http.state.EventLookup`; bridge.runtime.lookup does it from
Temporal's visibility); an app without one answers ``503``. docs/event-lifecycle.md.
"""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, get
from litestar.di import NamedDependency
from litestar.params import PathParameter

from adapters.http.answers import EventRuns
from adapters.http.openapi import BEARER_AUTH, error_responses
from adapters.http.problems import Problem
from adapters.http.state import HTTP_ADAPTER, HttpState
from bridge.errors import Reason, Unavailable
from bridge.event import MAX_KEY_CHARS
from bridge.snapshot import Snapshot

REASONS: tuple[Reason, ...] = ("unauthorized", "rate_limited", "not_found", "unavailable")
"""Every reason this endpoint answers with."""
QUERY_REASONS: tuple[Reason, ...] = ("malformed", *REASONS)
"""The same for ``GET /api/v1/events?id=``, which answers ``malformed`` without its parameter."""

MAX_ID = MAX_KEY_CHARS  # an event id longer than any adapter accepts names nothing
IN_FLIGHT = 4
"""Look-ups one process makes at once for one token. Each asks Temporal's visibility, then
describes a run per workflow entry: unbounded, a token holder could spend the namespace's request
budget that the submissions need. Past it a look-up is answered 429 with ``Retry-After: 1``, and
costs nothing; other tokens' look-ups go on."""


class LookupController(Controller):
    path = "/api/v1/events"
    tags = ["events"]

    @get(
        "/{event_id:str}",
        summary="The runs an event started",
        operation_id="lookUpEvent",
        security=BEARER_AUTH,
        responses=error_responses(REASONS),
    )
    async def look_up(
        self,
        request: Request[Any, Any, Any],
        event_id: Annotated[
            str, PathParameter(description="The event id (its Idempotency-Key, or its id), without '/'")
        ],
        http: NamedDependency[HttpState],
        snapshot: NamedDependency[Snapshot],
    ) -> EventRuns:
        """The runs the event with this id, sent with this token, started: each with its workflow
        entry, workflow id, run id, status, start and close time, and a link to the Temporal UI when
        one is known. ``404`` when nothing is known (a run is visible for the namespace's retention).
        An id that holds ``/`` is looked up with ``GET /api/v1/events?id=…``."""
        return await runs_of(request, event_id, http, snapshot)


async def runs_of(
    request: Request[Any, Any, Any], event_id: str | None, http: HttpState, snapshot: Snapshot
) -> EventRuns:
    """The answer to a look-up of ``event_id`` by the caller of ``request`` (either form)."""
    token = http.token_name(snapshot, request.headers.get("authorization"))
    if token is None:
        raise http.deny(HTTP_ADAPTER, "unauthorized", "a valid bearer token is required")
    if not event_id:  # the query form without its parameter, or with it empty
        raise Problem("malformed", "give the event's id: GET /api/v1/events?id=…")
    source = f"{HTTP_ADAPTER}:{token}"
    wait = int(snapshot.config.http.retry_after_seconds)
    if http.lookup is None:
        raise Problem("unavailable", "this process cannot look events up (no Temporal client)", retry_after=wait)
    if not event_id or len(event_id) > MAX_ID:
        raise Problem("not_found", "no run is known for this event", event_id=event_id[:200])
    with http.held(HTTP_ADAPTER, f"lookup:{source}", IN_FLIGHT, "look-ups of this token"):
        http.charge(token, 1)  # a look-up costs the token's rate limit as an event does
        try:
            runs = await http.lookup(event_id, source)
        except Unavailable as exc:
            raise Problem("unavailable", str(exc), retry_after=wait) from None
    if not runs:
        raise Problem("not_found", "no run is known for this event", event_id=event_id)
    return {"event_id": event_id, "source": source, "runs": runs}
