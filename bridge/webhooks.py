"""Webhooks: prove a delivery came from its provider, then turn it into events.

``POST /api/v1/hooks/{slug}`` (see :mod:`adapters.http`) does, in this order:

1. :meth:`WebhookRoute.verify` — the signature over the raw body bytes, before anything parses
   them. One :class:`Verifier` per ``verify.kind``: ``none``, ``hmac``, ``github``, ``stripe``,
   ``standard-webhooks``. Every secret in ``secret``/``secrets`` is tried, so a secret can be
   rotated without a gap. A failure raises :class:`SignatureInvalid`, whose reason is for the log
   only: the caller learns nothing about which part failed.
2. :meth:`WebhookRoute.events` — parse the body, find the delivery id, and make one event per
   ``events:`` entry whose CEL filter holds (every entry without a filter matches).

Event ids are stable across redeliveries and distinct per entry: ``{delivery_id}:{entry name}``,
with source ``webhook:{slug}``. The delivery id is, first that exists: the provider's
(``X-GitHub-Delivery``, the Stripe event ``id``, ``webhook-id``) · the configured ``id_from`` ·
the SHA-256 of the body.

Nothing here knows HTTP frameworks: headers come in as a mapping with lower-case names.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs

from bridge import templates
from bridge.config import Webhook, WebhookVerify
from bridge.errors import BridgeError, ConfigError, EventRejected
from bridge.event import EventSignal
from bridge.filters import Filter, FilterError, activation
from bridge.locator import Locator

log = logging.getLogger(__name__)

SOURCE_PREFIX = "webhook:"
Headers = Mapping[str, str]

# Never copied into event metadata: credentials, and any header whose name says it is one.
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
_SECRET_WORDS = ("signature", "secret", "token", "password", "api-key", "apikey")


class SignatureInvalid(BridgeError):
    """A delivery whose signature does not verify. The message says why, for the log only."""


class Verifier(Protocol):
    """One webhook signature scheme.

    ``verify`` raises :class:`SignatureInvalid` unless ``body`` carries a valid signature made
    with one of the configured secrets; ``now`` is the current Unix time. ``delivery_id`` names
    the delivery as the provider does, or is None. ``signature_headers`` (lower-case) are kept
    out of event metadata.
    """

    kind: str
    signature_headers: frozenset[str]

    def verify(self, headers: Headers, body: bytes, now: float) -> None: ...

    def delivery_id(self, headers: Headers, payload: Any) -> str | None: ...


def _digest(algorithm: str, key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, algorithm).digest()


def _ascii(value: str) -> bytes:
    # compare_digest refuses non-ASCII str; a header is whatever the sender put there.
    return value.encode("utf-8", "replace")


def _any_equal(given: Iterable[str], expected: Sequence[str]) -> bool:
    """True when some given value equals some expected one, each pair compared in constant time."""
    found = False
    for g in given:
        for e in expected:
            found |= hmac.compare_digest(_ascii(g), _ascii(e))
    return found


def _fresh(timestamp: str | None, now: float, tolerance: int) -> int:
    """The timestamp as an int, if it is one and within ``tolerance`` seconds of ``now``."""
    try:
        ts = int((timestamp or "").strip())
    except ValueError:
        raise SignatureInvalid("timestamp is missing or not an integer") from None
    if abs(now - ts) > tolerance:
        raise SignatureInvalid(f"timestamp {ts} is more than {tolerance}s away from now")
    return ts


class NoVerify:
    """``kind: none``: anyone who can reach the URL can deliver. Must be configured explicitly."""

    kind = "none"
    signature_headers: frozenset[str] = frozenset()

    def verify(self, headers: Headers, body: bytes, now: float) -> None:
        return None

    def delivery_id(self, headers: Headers, payload: Any) -> str | None:
        return None


class HmacVerify:
    """One header holding ``prefix + encode(HMAC(secret, body))``. GitHub is this with
    ``X-Hub-Signature-256``, SHA-256, hex and the prefix ``sha256=``."""

    def __init__(
        self,
        secrets: Sequence[str],
        *,
        header: str = "x-signature",
        algorithm: str = "sha256",
        encoding: str = "hex",
        prefix: str = "",
        kind: str = "hmac",
        delivery_header: str | None = None,
    ) -> None:
        self.kind = kind
        self.header = header.lower()
        self.signature_headers = frozenset({self.header})
        self._keys = [s.encode() for s in secrets]
        self._algorithm = algorithm
        self._hex = encoding == "hex"
        self._prefix = prefix
        self._delivery_header = delivery_header

    def sign(self, body: bytes, secret_index: int = 0) -> str:
        mac = _digest(self._algorithm, self._keys[secret_index], body)
        return self._prefix + (mac.hex() if self._hex else base64.b64encode(mac).decode())

    def verify(self, headers: Headers, body: bytes, now: float) -> None:
        given = (headers.get(self.header) or "").strip()
        if not given:
            raise SignatureInvalid(f"header {self.header} is missing")
        if not given.startswith(self._prefix):
            raise SignatureInvalid(f"header {self.header} lacks the prefix {self._prefix!r}")
        if self._hex:  # hex digits are case-insensitive; base64 is not
            given = self._prefix + given[len(self._prefix) :].lower()
        if not _any_equal([given], [self.sign(body, i) for i in range(len(self._keys))]):
            raise SignatureInvalid(f"header {self.header} matches no configured secret")

    def delivery_id(self, headers: Headers, payload: Any) -> str | None:
        return headers.get(self._delivery_header) if self._delivery_header else None


def github(secrets: Sequence[str]) -> HmacVerify:
    """GitHub: ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>``; id ``X-GitHub-Delivery``.

    GitHub signs no timestamp, so a captured delivery can be replayed; its delivery id makes the
    replay start nothing new.
    """
    return HmacVerify(
        secrets,
        header="x-hub-signature-256",
        algorithm="sha256",
        encoding="hex",
        prefix="sha256=",
        kind="github",
        delivery_header="x-github-delivery",
    )


class StripeVerify:
    """Stripe: ``Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "{t}.{body}">[,v1=…]``.

    The ``whsec_…`` secret is the HMAC key as it is (Stripe does not base64-decode it). Several
    ``v1`` entries may come during Stripe's own secret roll; any one matching is enough. Other
    schemes (``v0``) are ignored. The timestamp must lie within ``tolerance`` seconds of now,
    either way (Stripe's libraries check only the past; a future one this far off is no better).
    The delivery id is the event's ``id``, the same on every retry.
    """

    kind = "stripe"
    header = "stripe-signature"
    signature_headers = frozenset({header})

    def __init__(self, secrets: Sequence[str], tolerance: int = 300) -> None:
        self._keys = [s.encode() for s in secrets]
        self.tolerance = tolerance

    def sign(self, body: bytes, timestamp: int, secret_index: int = 0) -> str:
        signed = f"{timestamp}.".encode() + body
        return _digest("sha256", self._keys[secret_index], signed).hex()

    def verify(self, headers: Headers, body: bytes, now: float) -> None:
        raw = headers.get(self.header)
        if not raw:
            raise SignatureInvalid(f"header {self.header} is missing")
        timestamps, v1 = [], []
        for item in raw.split(","):
            key, _, value = item.strip().partition("=")
            if key == "t":
                timestamps.append(value)
            elif key == "v1" and value:
                v1.append(value.strip().lower())
        if len(timestamps) != 1 or not v1:
            raise SignatureInvalid(f"header {self.header} needs one t= and at least one v1=")
        ts = _fresh(timestamps[0], now, self.tolerance)
        if not _any_equal(v1, [self.sign(body, ts, i) for i in range(len(self._keys))]):
            raise SignatureInvalid(f"no v1 signature in {self.header} matches a configured secret")

    def delivery_id(self, headers: Headers, payload: Any) -> str | None:
        event_id = payload.get("id") if isinstance(payload, dict) else None
        return event_id if isinstance(event_id, str) and event_id else None


class StandardWebhooksVerify:
    """Standard Webhooks (https://www.standardwebhooks.com): ``webhook-id``, ``webhook-timestamp``
    and ``webhook-signature`` holding space-separated ``v1,<base64 HMAC-SHA256 of
    "{id}.{timestamp}.{body}">`` entries. Secrets are base64, optionally prefixed ``whsec_``; the
    key is the decoded bytes. The ``svix-*`` spelling of the same headers is accepted too (Svix,
    which senders such as Clerk and Resend use, is where the scheme comes from).
    """

    kind = "standard-webhooks"
    signature_headers = frozenset({"webhook-signature", "svix-signature"})

    def __init__(self, secrets: Sequence[str], tolerance: int = 300) -> None:
        self._keys = [self.key(s) for s in secrets]
        self.tolerance = tolerance

    @staticmethod
    def key(secret: str) -> bytes:
        try:
            return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a standard-webhooks secret is base64, optionally prefixed 'whsec_'") from None

    @staticmethod
    def _header(headers: Headers, name: str) -> str | None:
        return headers.get(f"webhook-{name}") or headers.get(f"svix-{name}")

    def sign(self, body: bytes, msg_id: str, timestamp: int, secret_index: int = 0) -> str:
        signed = f"{msg_id}.{timestamp}.".encode() + body
        return "v1," + base64.b64encode(_digest("sha256", self._keys[secret_index], signed)).decode()

    def verify(self, headers: Headers, body: bytes, now: float) -> None:
        msg_id = self._header(headers, "id")
        signature = self._header(headers, "signature")
        if not msg_id or not signature:
            raise SignatureInvalid("webhook-id or webhook-signature is missing")
        ts = _fresh(self._header(headers, "timestamp"), now, self.tolerance)
        given = [s for s in signature.split() if s.startswith("v1,")]
        if not given or not _any_equal(given, [self.sign(body, msg_id, ts, i) for i in range(len(self._keys))]):
            raise SignatureInvalid("no v1 signature in webhook-signature matches a configured secret")

    def delivery_id(self, headers: Headers, payload: Any) -> str | None:
        return self._header(headers, "id")


def build_verifier(spec: WebhookVerify) -> Verifier:
    """The verifier for a ``verify:`` block; ValueError for a secret the kind cannot use."""
    secrets = spec.all_secrets
    if spec.kind == "none":
        return NoVerify()
    if spec.kind == "github":
        return github(secrets)
    if spec.kind == "stripe":
        return StripeVerify(secrets, spec.tolerance_seconds)
    if spec.kind == "standard-webhooks":
        return StandardWebhooksVerify(secrets, spec.tolerance_seconds)
    return HmacVerify(
        secrets,
        header=spec.header or "x-signature",
        algorithm=spec.algorithm,
        encoding=spec.encoding,
        prefix=spec.prefix,
    )


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
