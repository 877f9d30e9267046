"""CEL filters over an event: the names ``name``, ``payload``, ``source``, ``metadata``, ``id``."""

from __future__ import annotations

import logging
from typing import Any

import celpy
from celpy import celtypes

from bridge.errors import BridgeError

log = logging.getLogger(__name__)
_ENV = celpy.Environment()


class FilterError(BridgeError):
    """A CEL expression that does not compile."""


class Filter:
    """A compiled CEL expression. A runtime error (a missing field, a type clash) is no match."""

    def __init__(self, source: str) -> None:
        self.source = source
        try:
            self._program = _ENV.program(_ENV.compile(source))
        except Exception as exc:
            raise FilterError(f"filter {source!r} does not compile: {exc}") from None

    def matches(self, activation: Activation) -> bool:
        """Evaluate against an :func:`activation` (converted to CEL values once per event)."""
        try:
            result = self._program.evaluate(activation)
        except Exception as exc:
            log.debug("filter %r did not evaluate: %s", self.source, exc)
            return False
        return isinstance(result, bool | celtypes.BoolType) and bool(result)


Activation = Any
"""The names a filter sees, as CEL values: build it once per event, evaluate every filter on it."""


def activation(name: str, payload: Any, source: str, metadata: dict[str, Any], event_id: str) -> Activation:
    return _cel_activation(
        {
            "name": name,
            "payload": payload,
            "source": source,
            "metadata": metadata,
            "id": event_id,
        }
    )


def _cel_activation(values: dict[str, Any]) -> Any:
    """The activation as CEL values (celpy's converter is untyped and not re-exported)."""
    return celpy.json_to_cel(values)  # type: ignore[attr-defined]
