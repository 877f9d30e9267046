"""The bridge's exception tree.

    BridgeError
    ├── ConfigError       a config file that cannot be loaded; the message names file, workflow, trigger
    ├── EventRejected     one event that can never be accepted (a 4xx, a dead letter); has a reason code
    └── Unavailable       Temporal did not take the event *now*; retry later, nothing was acknowledged

Doors map these to their transport in one table each: HTTP status codes, dead-letter or retry.
"""

from __future__ import annotations

from typing import Any


class BridgeError(Exception):
    """Root of every error the bridge raises on purpose."""


class ConfigError(BridgeError):
    """A configuration that cannot be used."""


class EventRejected(BridgeError):
    """An event that will never be accepted as it is: retrying it changes nothing.

    ``reason`` is a stable code used in metrics labels, dead-letter headers and HTTP bodies:
    ``malformed``, ``no_name``, ``too_large``, ``unroutable``, ``schema_invalid``.
    """

    def __init__(self, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.details = details

    def as_dict(self) -> dict[str, Any]:
        return {"error": self.reason, "message": self.message, **self.details}


class Unavailable(BridgeError):
    """Temporal could not be reached or did not confirm; the event is not held anywhere."""

    def __init__(self, message: str, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
