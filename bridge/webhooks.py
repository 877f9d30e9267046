"""Webhooks: a verified delivery becomes one event per matching ``events:`` entry.

:meth:`WebhookRoute.verify` checks the signature over the raw body bytes before anything parses
them (the schemes are in :mod:`bridge.signatures`); :meth:`WebhookRoute.events` then parses the
body, finds the delivery id and applies each entry's CEL filter and ``input:`` template. Event
ids, sources and what each verification kind protects against: docs/webhooks.md.

Nothing here knows HTTP frameworks: headers come in as a mapping with lower-case names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from bridge import templates
from bridge.config import Webhook
from bridge.errors import ConfigError, EventRejected
from bridge.event import EventSignal
from bridge.filters import Filter, FilterError, activation
from bridge.locator import Locator
from bridge.signatures import Verifier, build_verifier

log = logging.getLogger(__name__)

SOURCE_PREFIX = "webhook:"
Headers = Mapping[str, str]

# Never copied into event metadata: credentials, and any header whose name says it is one.
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
_SECRET_WORDS = ("signature", "secret", "token", "password", "api-key", "apikey")


def kept_headers(headers: Headers, drop: Iterable[str] = ()) -> dict[str, str]:
    """Lower-cased headers without credentials or signatures, for event metadata and filters."""
    dropped = _SECRET_HEADERS | {d.lower() for d in drop}
    out = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower in dropped or any(word in lower for word in _SECRET_WORDS):
            continue
        out[lower] = value
    return out


def parse_body(body: bytes, content_type: str | None) -> Any:
    """JSON; or a form whose ``payload`` field is JSON (GitHub's form-encoded deliveries)."""
    text = body
    if (content_type or "").split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
        try:
            fields = parse_qs(body.decode(), strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            raise EventRejected("malformed", "form body does not parse") from None
        if "payload" not in fields:
            raise EventRejected("malformed", "form body has no 'payload' field")
        text = fields["payload"][0].encode()
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EventRejected("malformed", f"body is not JSON: {exc}") from None


@dataclass(frozen=True)
class EventEntry:
    """One ``events:`` entry: its name, its filter (None: always), its ``input:`` template."""

    name: str
    filter: Filter | None = None
    input: Any = None


@dataclass
class Delivery:
    """What one verified delivery became: its id and one event per matching entry."""

    delivery_id: str
    events: list[EventSignal] = field(default_factory=list)


class WebhookRoute:
    def __init__(
        self, slug: str, verifier: Verifier, entries: Sequence[EventEntry], *, id_from: Locator | None = None
    ) -> None:
        self.slug = slug
        self.verifier = verifier
        self.entries = tuple(entries)
        self.id_from = id_from

    @property
    def source(self) -> str:
        return f"{SOURCE_PREFIX}{self.slug}"

    def verify(self, headers: Headers, body: bytes, now: float | None = None) -> None:
        """Raise :class:`SignatureInvalid` unless the delivery is signed as configured."""
        self.verifier.verify(headers, body, time.time() if now is None else now)

    def delivery_id(self, headers: Headers, body: bytes, payload: Any) -> str:
        found = self.verifier.delivery_id(headers, payload)
        if not found and self.id_from:
            found = self.id_from.resolve(headers, payload)
        return found or f"sha256:{hashlib.sha256(body).hexdigest()}"

    def events(self, headers: Headers, body: bytes, content_type: str | None = None) -> Delivery:
        """The events of a *verified* delivery; EventRejected when the body is unusable."""
        payload = parse_body(body, content_type)
        delivery_id = self.delivery_id(headers, body, payload)
        if not isinstance(payload, dict):
            payload = {"data": payload}
        metadata = self.metadata(headers, delivery_id)
        delivery = Delivery(delivery_id)
        for entry in self.entries:
            event_id = f"{delivery_id}:{entry.name}"
            if entry.filter is not None:
                act = activation(entry.name, payload, self.source, metadata, event_id)
                if not entry.filter.matches(act):
                    continue
            delivery.events.append(
                EventSignal(
                    id=event_id,
                    name=entry.name,
                    payload=self._input(entry, payload, metadata, event_id),
                    source=self.source,
                    metadata=dict(metadata),
                )
            )
        return delivery

    def metadata(self, headers: Headers, delivery_id: str) -> dict[str, Any]:
        kept = kept_headers(headers, self.verifier.signature_headers)
        meta: dict[str, Any] = {"headers": kept, "webhook": {"slug": self.slug, "delivery_id": delivery_id}}
        if "x-correlation-id" in kept:
            meta["correlation_id"] = kept["x-correlation-id"]
        if "traceparent" in kept:
            meta["traceparent"] = kept["traceparent"]
        return meta

    def _input(self, entry: EventEntry, payload: dict[str, Any], metadata: dict[str, Any], event_id: str) -> Any:
        if entry.input is None:
            return payload
        context = {
            "payload": payload,
            "trigger": payload,
            "metadata": metadata,
            "headers": metadata["headers"],
            "name": entry.name,
            "source": self.source,
            "id": event_id,
        }
        try:
            rendered = templates.render(entry.input, context)
        except templates.TemplateError as exc:
            raise EventRejected(
                "input_failed", f"webhook {self.slug!r}, event {entry.name!r}: input: {exc}", name=entry.name
            ) from None
        return rendered if isinstance(rendered, dict) else {"data": rendered}


def compile_webhooks(webhooks: Sequence[Webhook], *, origin: str = "config") -> dict[str, WebhookRoute]:
    """Every ``webhooks:`` entry, checked and compiled: a load-time error names slug and event."""
    routes: dict[str, WebhookRoute] = {}
    for hook in webhooks:
        where = f"{origin}: webhook {hook.slug!r}"
        if hook.slug in routes:
            raise ConfigError(f"{where}: the slug is declared twice")
        try:
            verifier = build_verifier(hook.verify)
        except ValueError as exc:
            raise ConfigError(f"{where}, verify: {exc}") from None
        entries = []
        names: set[str] = set()
        for ev in hook.events:
            here = f"{where}, event {ev.name!r}"
            if ev.name in names:
                raise ConfigError(f"{here}: declared twice (join the filters with '||' instead)")
            names.add(ev.name)
            try:
                compiled = Filter(ev.filter) if ev.filter else None
                templates.check(ev.input)
            except (FilterError, templates.TemplateError) as exc:
                raise ConfigError(f"{here}: {exc}") from None
            entries.append(EventEntry(ev.name, compiled, ev.input))
        routes[hook.slug] = WebhookRoute(hook.slug, verifier, entries, id_from=hook.id_from)
    return routes
