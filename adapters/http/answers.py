"""The HTTP adapter's response bodies: their types, and the functions that build them.

The TypedDicts are the wire format; litestar turns them into the OpenAPI document's schemas, and a
schemathesis test checks every answer against them. A batch (or a webhook delivery) is answered
per event: each result carries the status that event alone would have had. What each field means:
docs/http-api.md.
"""

# No ``from __future__ import annotations``: TypedDict reads NotRequired[...] at class creation.
from typing import Any, Literal, NotRequired, TypedDict

from bridge.errors import EventRejected, Reason
from bridge.event import EventSignal
from bridge.pipeline import Outcome

ACCEPTED = 202
MULTI_STATUS = 207


class ErrorBody(TypedDict):
    """Why a request was refused: ``error`` is the reason code; details name what is wrong."""

    error: Reason
    message: str
    event_id: NotRequired[str]
    event_ids: NotRequired[list[str]]
    delivery_id: NotRequired[str]
    name: NotRequired[str]
    workflow: NotRequired[str]
    trigger: NotRequired[str]
    schema_path: NotRequired[str]
    payload_path: NotRequired[str]


class Accepted(TypedDict):
    """One event, held by Temporal."""

    status: Literal["accepted"]
    event_id: str
    name: str


class EventResult(TypedDict):
    """One event of a batch or delivery: ``status`` is what it alone would have been answered."""

    status: int
    index: NotRequired[int]
    event_id: NotRequired[str]
    name: NotRequired[str]
    error: NotRequired[Reason]
    message: NotRequired[str]


class BatchAnswer(TypedDict):
    """A batch: ``accepted`` when every event was, ``rejected`` when none was, else ``partial``."""

    status: Literal["accepted", "partial", "rejected"]
    accepted: int
    rejected: int
    results: list[EventResult]


class DeliveryAnswer(BatchAnswer):
    """A webhook delivery: one result per event its ``events:`` entries made of it."""

    delivery_id: str


class Ignored(TypedDict):
    """A webhook delivery that no ``events:`` entry matches (a 2xx, so the provider does not retry)."""

    status: Literal["ignored"]
    delivery_id: str
    message: str


class Health(TypedDict):
    status: Literal["ok"]


class Readiness(TypedDict):
    """``checks`` only for a bearer token holder: which check failed says what runs where."""

    status: Literal["ready", "not ready"]
    checks: NotRequired[dict[str, bool]]


class RunInfo(TypedDict):
    """One run an event started (or signalled into existence)."""

    workflow_entry: str | None
    workflow_id: str
    run_id: str | None
    status: str
    start_time: str | None
    close_time: str | None
    event_id: str | None
    event_name: str | None
    source: str | None
    url: str | None


class EventRuns(TypedDict):
    """What ``GET /api/v1/events/{event_id}`` answers."""

    event_id: str
    source: str
    runs: list[RunInfo]


def accepted(event: EventSignal) -> dict[str, Any]:
    return {"status": "accepted", "event_id": event.id, "name": event.name}


def refused(rejected: EventRejected) -> dict[str, Any]:
    """A batch item refused before it was submitted (it has no event, so no id or name)."""
    return {"status": rejected.status, **rejected.as_dict()}


def result(outcome: Outcome) -> dict[str, Any]:
    """What the pipeline made of one submitted event."""
    event, rejected = outcome.event, outcome.rejected
    if rejected is None:
        return {"status": ACCEPTED, "event_id": event.id, "name": event.name}
    return {"status": rejected.status, "event_id": event.id, "name": event.name, **rejected.as_dict()}


def batch(results: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Count the results; ``extra`` (a webhook's ``delivery_id``) goes before the counts."""
    n_accepted = sum(1 for r in results if r["status"] == ACCEPTED)
    n_rejected = len(results) - n_accepted
    status = "accepted" if n_rejected == 0 else "rejected" if n_accepted == 0 else "partial"
    return {"status": status, **extra, "accepted": n_accepted, "rejected": n_rejected, "results": results}
