"""The bridge's exception tree, and the one table from rejection reason to HTTP status.

    BridgeError
    ├── ConfigError       a config file that cannot be loaded; the message names file, workflow, trigger
    ├── EventRejected     one event that can never be accepted (a 4xx, a dead letter); has a reason code
    └── Unavailable       Temporal did not take the event *now*; retry later, nothing was acknowledged
        ├── Overloaded    this process already holds as many events waiting for Temporal as it may
        └── PartlyHeld    of a submission that went out as several signals, Temporal holds some

A reason code is the one word for why something was refused, in metrics labels, dead-letter
headers and HTTP error bodies. :data:`HTTP_STATUS` holds every code the bridge produces and the
status the HTTP adapter answers with; the queue adapters dead-letter or retry by the same codes.
What each code means for a client: docs/http-api.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal, get_args

Reason = Literal[
    "malformed",
    "no_name",
    "unauthorized",
    "not_found",
    "too_large",
    "too_slow",
    "batch_too_large",
    "schema_invalid",
    "unroutable",
    "input_failed",
    "target_invalid",
    "rate_limited",
    "unavailable",
    "overloaded",
]

REASONS: tuple[Reason, ...] = get_args(Reason)

HTTP_STATUS: Mapping[Reason, int] = MappingProxyType(
    {
        "malformed": 400,
        "no_name": 400,
        "unauthorized": 401,
        "not_found": 404,
        "too_large": 413,
        "too_slow": 408,
        "batch_too_large": 413,
        "schema_invalid": 422,
        "unroutable": 422,
        "input_failed": 422,
        "target_invalid": 422,
        "rate_limited": 429,
        "unavailable": 503,
        "overloaded": 503,
    }
)


class BridgeError(Exception):
    """Root of every error the bridge raises on purpose."""


class ConfigError(BridgeError):
    """A configuration that cannot be used."""


class EventRejected(BridgeError):
    """An event that will never be accepted as it is: retrying it changes nothing.

    ``reason`` is a stable code from :data:`Reason`; ``details`` (workflow, schema path, …) go
    into the HTTP error body and the dead letter's headers beside it.
    """

    def __init__(self, reason: Reason, message: str, **details: Any) -> None:
        super().__init__(message)
        self.reason: Reason = reason
        self.message = message
        self.details = details

    @property
    def status(self) -> int:
        return HTTP_STATUS[self.reason]

    def as_dict(self) -> dict[str, Any]:
        return {"error": self.reason, "message": self.message, **self.details}


class Unavailable(BridgeError):
    """Temporal could not be reached or did not confirm; the event is not held anywhere."""

    reason: Reason = "unavailable"

    def __init__(self, message: str, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(Unavailable):
    """Too many events already wait for Temporal in this process, or in the dispatcher for their
    starts (it holds as many as it can start before it must continue-as-new); nothing of this one
    was taken."""

    reason: Reason = "overloaded"


class SenderOverloaded(Overloaded):
    """This one sender (a bearer token, a webhook, a queue) already has its share of the events
    that may wait for Temporal in this process (``dispatcher.max_pending_per_source``): the others'
    share is still free. The HTTP adapter answers it ``429 rate_limited``; queue adapters wait it
    out as any :class:`Overloaded`."""


class PartlyHeld(Unavailable):
    """Temporal holds some of a submission's events and not the rest: it went out as several
    signals (over one signal's size or count, or over several shards) and some of them failed.
    ``held``: the indices of the events it holds, in the submission. An adapter whose events keep
    their ids on a retry may retry it whole (the held ones start nothing twice); one that cannot
    promise that (an HTTP batch without ids) says which are held."""

    def __init__(
        self, message: str, held: frozenset[int], retry_after: float = 5.0, outcomes: Sequence[Any] = ()
    ) -> None:
        super().__init__(message, retry_after)
        self.held = held
        self.outcomes = outcomes  # from the pipeline: every event's, the ones not held as ``unavailable``


class PartlyRefused(EventRejected):
    """Temporal holds some of a submission's events, and refused a signal of the others as too
    large for its payload limit (one below the bridge's MAX_SIGNAL_BYTES). A refusal of the whole
    to whoever retries it in parts (a queue adapter halves it, and a retry of the held ones starts
    nothing twice); an HTTP client hears which events are held (``held``, indices in the
    submission), which were refused alone (``refused``: each too large for the server on its
    own), and that the rest may be sent again (``outcomes``: every event's, from the pipeline)."""

    def __init__(
        self,
        message: str,
        held: frozenset[int],
        refused: Mapping[int, EventRejected] = MappingProxyType({}),
        outcomes: Sequence[Any] = (),
    ) -> None:
        super().__init__("too_large", message)
        self.held = held
        self.refused = refused
        self.outcomes = outcomes
