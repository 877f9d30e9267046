"""Where a message's name or id is found: ``header:<name>``, ``field:<dotted.path>`` or ``key``.

One type, parsed and validated once when the config loads, resolved here for every adapter and
webhook. ``routing_key`` is accepted as a synonym of ``key`` (the AMQP word).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, PlainSerializer

Kind = Literal["header", "field", "key"]
_KEY_WORDS = ("key", "routing_key")


@dataclass(frozen=True)
class Locator:
    kind: Kind
    name: str = ""

    @classmethod
    def parse(cls, value: object) -> Locator:
        """``header:X`` · ``field:a.b`` · ``key`` · ``routing_key``; ValueError otherwise."""
        if isinstance(value, Locator):
            return value
        if not isinstance(value, str):
            raise ValueError("a locator is a string: header:<name>, field:<dotted.path>, key or routing_key")
        if value in _KEY_WORDS:
            return cls("key")
        kind, _, name = value.partition(":")
        if kind not in ("header", "field") or not name:
            raise ValueError(f"{value!r}: use header:<name>, field:<dotted.path>, key or routing_key")
        return cls("header" if kind == "header" else "field", name)

    def __str__(self) -> str:
        return "key" if self.kind == "key" else f"{self.kind}:{self.name}"

    def resolve(self, headers: Mapping[str, str], body: Any, key: str | None = None) -> str | None:
        """The located value as text, or None when absent or empty."""
        value = self.value(headers, body, key)
        if value is None or value == "":
            return None
        return str(value)

    def value(self, headers: Mapping[str, str], body: Any, key: str | None = None) -> Any:
        """The located value as it is: text from a header or the key, any JSON value from a field."""
        if self.kind == "key":
            value: Any = key
        elif self.kind == "header":
            wanted = self.name.lower()
            value = next((v for k, v in headers.items() if k.lower() == wanted), None)
        else:
            value = lookup(body, self.name)
        return value


def lookup(data: Any, dotted: str) -> Any:
    """``a.b.c`` in nested objects, or None."""
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _no_key(locator: Locator) -> Locator:
    if locator.kind == "key":
        raise ValueError("use header:<name> or field:<dotted.path> (a webhook has no key)")
    return locator


LocatorField = Annotated[Locator, BeforeValidator(Locator.parse), PlainSerializer(str)]
"""A config field holding a :class:`Locator`; written back as its string form."""

BodyLocatorField = Annotated[Locator, BeforeValidator(lambda v: _no_key(Locator.parse(v))), PlainSerializer(str)]
"""A :class:`Locator` that cannot be ``key``: for webhooks, which carry no message key."""
