"""Webhooks: a verified delivery becomes one event per matching ``events:`` entry.

:meth:`WebhookRoute.verify` checks the signature over the raw body bytes before anything parses
them (the schemes are in :mod:`bridge.signatures`); :meth:`WebhookRoute.events` then parses the
body, names the delivery and applies each entry's CEL filter and ``input:`` template. Event
ids, sources and what each verification kind protects against: docs/webhooks.md.

A delivery is named only by what its signature covers: a delivery id the provider signs, an
``id_from: field:`` of the signed body, else a digest of the body. An unsigned delivery id
(GitHub's ``X-GitHub-Delivery``, ``id_from: header:``) is kept in metadata, never in an event id,
or a replay with a fresh header would start everything again.

For any bytes and headers, ``verify`` returns or raises ``SignatureInvalid`` and ``events``
returns or raises :class:`EventRejected`; nothing else.

Nothing here knows HTTP frameworks: headers come in as a mapping with lower-case names.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qs

from bridge import templates
from bridge.config import Webhook
from bridge.decode import located_id, parse_json
from bridge.errors import ConfigError, EventRejected
from bridge.event import EventSignal
from bridge.filters import Filter, FilterError, activation
from bridge.locator import Locator
from bridge.ratelimit import TokenBucket
from bridge.signatures import Verifier, build_verifier

log = logging.getLogger(__name__)
K = TypeVar("K")
V = TypeVar("V")

SOURCE_PREFIX = "webhook:"
Headers = Mapping[str, str]

# Never copied into event metadata: any header whose name says it is a credential (Authorization,
# Proxy-Authorization, Cookie and Set-Cookie among them).
# Gateways put credentials in headers of their own (X-Functions-Key, Ocp-Apim-Subscription-Key,
# X-Auth, X-Shopify-Hmac-Sha256, AccessKey, api_key): any name with one of these in it is taken for
# one; but Bitbucket names its event in X-Event-Key, and an Idempotency-Key is no secret.
_SECRET_WORDS = ("signature", "secret", "token", "password", "auth", "key", "credential", "session", "hmac", "cookie")
_KEYS_KEPT = frozenset({"x-event-key", "idempotency-key"})
MAX_KEPT_HEADERS = 64
"""At most this many headers reach an event's metadata (the first ones sent); every event of a
delivery carries a copy."""
MAX_KEPT_VALUE = 512
"""A longer header value is left out of metadata, not cut (a cut trace header is no trace header)."""


def kept_headers(headers: Headers, drop: Iterable[str] = ()) -> dict[str, str]:
    """Lower-cased headers without credentials or signatures, for event metadata and filters:
    at most :data:`MAX_KEPT_HEADERS` of them, none longer than :data:`MAX_KEPT_VALUE`."""
    dropped = {d.lower() for d in drop}
    out: dict[str, str] = {}
    for name, value in headers.items():
        lower = name.lower()
        if (
            lower in dropped
            or (lower not in _KEYS_KEPT and any(word in lower for word in _SECRET_WORDS))
            or len(value) > MAX_KEPT_VALUE
        ):
            continue
        out[lower] = value
        if len(out) == MAX_KEPT_HEADERS:
            break
    return out


def parse_body(body: bytes, content_type: str | None) -> Any:
    """JSON, bounded as every adapter's (:func:`bridge.decode.parse_json`); or a form whose one
    field is ``payload``, such JSON (GitHub's form-encoded deliveries).

    The Content-Type is not signed, so it must not change what the signed bytes mean: a JSON body
    read as a form would give up any ``payload=`` a sender planted in a string of it (JSON leaves
    ``&`` and ``=`` as they are). A form is read only when its bytes have GitHub's form shape
    (``payload=`` and no other field), which no JSON body has: one body, one meaning."""
    text = body
    if (content_type or "").split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
        if not body.startswith(b"payload=") or b"&" in body:
            raise EventRejected("malformed", "a form body must be one 'payload' field, as GitHub sends it")
        try:
            fields = parse_qs(body.decode(), strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            raise EventRejected("malformed", "form body does not parse") from None
        if "payload" not in fields:
            raise EventRejected("malformed", "form body has no 'payload' field")
        text = fields["payload"][0].encode()
    return parse_json(text)


def _keep_last(into: OrderedDict[K, V], key: K, value: V, most: int) -> None:
    """``into[key] = value`` as its newest entry, the oldest dropped past ``most``."""
    into[key] = value
    into.move_to_end(key)
    while len(into) > most:
        into.popitem(last=False)


@dataclass(frozen=True)
class EventEntry:
    """One ``events:`` entry: its name, its filter (None: always), its ``input:`` template."""

    name: str
    filter: Filter | None = None
    input: Any = None


@dataclass
class Delivery:
    """What one verified delivery became: its id, the id the provider gave it if any (signed or
    not), and one event per matching entry. Event ids are formed of ``delivery_id`` only."""

    delivery_id: str
    provider_delivery_id: str | None = None
    events: list[EventSignal] = field(default_factory=list)
    limited: list[str] = field(default_factory=list)  # entries whose filter ran out of its budget


ANSWERS_KEPT = 4096  # delivery answers a webhook route keeps (each a few hundred bytes)
REPEAT_RATE = 1.0
"""Copies a second, after REPEAT_BURST at once, that one address (an IPv6 /48), and one copy
read again, may have read for nothing (:meth:`WebhookRoute.repeat`)."""
REPEAT_BURST = 8
FREE_VARIANTS = 8
"""Copies of one signed delivery with different headers that are read whatever they send: the
first, and the provider's own (one body sent as several topics that match several entries)."""
ADDRESSES_KEPT = 4096  # addresses whose repeat buckets a route keeps (the last ones to read for nothing)


@dataclass
class Begun:
    """A signed delivery this route began to read (:meth:`WebhookRoute.keys`): its first
    FREE_VARIANTS copy keys, each with a bucket once it is read again, and the ids of its events
    held so far."""

    variants: dict[str, TokenBucket | None]
    held: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Repeat:
    """A copy of a signed delivery begun before, let in on a token of each of ``buckets``: given
    back (:meth:`WebhookRoute.held_new`) if the copy held an event not held before."""

    buckets: tuple[TokenBucket, ...]


def _bucket() -> TokenBucket:
    return TokenBucket(REPEAT_RATE, REPEAT_BURST, clock=_now)


def repeat_source(address: str) -> str:
    """Whose count a copy from ``address`` (a host, or an IPv6 /64 network) goes on: the address,
    or for IPv6 its /48 (a tunnel broker hands out a /48 of /64s for free)."""
    try:
        network = ipaddress.ip_network(address, strict=False)
    except ValueError:
        return address
    if network.version == 6 and network.prefixlen > 48:
        return str(network.supernet(new_prefix=48))
    return address


def _now() -> float:
    """The repeat buckets' clock (a test's to set)."""
    return time.monotonic()


class WebhookRoute:
    def __init__(
        self, slug: str, verifier: Verifier, entries: Sequence[EventEntry], *, id_from: Locator | None = None
    ) -> None:
        self.slug = slug
        self.verifier = verifier
        self.entries = tuple(entries)
        self.id_from = id_from
        # The final answers of the deliveries this route answered last (the snapshot's: a reload,
        # which may map them otherwise, starts afresh), with their status: a repeat is answered as
        # before, not submitted again and not charged to the webhook's rate limit, so replaying a
        # captured delivery neither costs a signal nor spends the provider's own budget.
        self.answered: OrderedDict[str, tuple[int, Any, frozenset[str]]] = OrderedDict()
        self.copies: OrderedDict[str, tuple[int, Any, frozenset[str]]] = OrderedDict()  # by keys()[1]
        # The deliveries being handled now, with the events each copy in flight sends: a copy
        # that comes meanwhile (a replay sent many times at once) and would send none other is
        # refused at once, not submitted again on the provider's rate limit; one that would (its
        # unsigned headers match other entries) is sent.
        self.in_flight: dict[str, Counter[str]] = {}
        # A copy with other headers is parsed, its filters run and its templates rendered before it
        # is known to send nothing new (24 ms of the event loop for 750 KB), so a replayer changing
        # a header each time could hold the loop. The signed deliveries this route began to read
        # (``begun``) and the addresses that sent copies of them that sent nothing (``repeats``) are
        # counted, :meth:`repeat`. The provider's own copies cost nothing: its first, its retries
        # once they send, and one body sent as several topics.
        self.begun: OrderedDict[str, Begun] = OrderedDict()
        self.repeats: OrderedDict[str, TokenBucket] = OrderedDict()

    def remember(self, delivery: Delivery, status: int, answer: Any, copy: str | None = None) -> None:
        """Keep a delivery's answer (the last ANSWERS_KEPT): one only a reload could change; with
        the ids of the events it sent (:meth:`answer_to`), and under ``copy`` (:meth:`keys`)
        too, for a copy that is the same byte for byte (:meth:`answer_to_copy`)."""
        ids = frozenset(e.id for e in delivery.events)
        if (before := self.answered.get(delivery.delivery_id)) is not None:
            ids |= before[2]  # sent then, and not again: copies with other headers take turns at no cost
        kept = (status, answer, ids)
        for key, into in ((delivery.delivery_id, self.answered), (copy, self.copies)):
            if key is not None:
                _keep_last(into, key, kept, ANSWERS_KEPT)

    def keys(self, headers: Headers, body: bytes, content_type: str | None) -> tuple[str, str]:
        """``(signed, copy)`` for a verified delivery. ``signed``: what its signature covers, the
        body and the values of :meth:`Verifier.signed_headers`; the same for every copy of one
        signed delivery, a replay's included. ``copy``: what makes two deliveries give the same
        events: the body, its content type, and the headers events and filters see
        (:func:`kept_headers`)."""
        body_digest = hashlib.sha256(body)
        signed = body_digest.copy()
        signed.update(json.dumps(self.verifier.signed_headers(headers)).encode())
        seen = kept_headers(headers, self.verifier.signature_headers)
        body_digest.update(json.dumps([content_type, sorted(seen.items())]).encode())
        return signed.hexdigest(), body_digest.hexdigest()

    def repeat(self, signed: str, copy: str, address: str) -> tuple[Repeat | None, float]:
        """Whether a copy (:meth:`keys`) from ``address`` is counted, and the seconds until it may
        be read (0.0: now; then its tokens are taken). Free (None): the first copy of its signed
        delivery, and its first FREE_VARIANTS copies with different headers. Counted, on a token of
        each bucket it waits for (REPEAT_BURST at once, REPEAT_RATE a second): its address's
        (:func:`repeat_source`), and for one of those free copies read again (a retry whose
        answer was not kept) that copy's own. What one copy holds the same copy holds, so a
        replayer that spends a copy's count holds nothing of the provider's out; and no count is
        the delivery's, which a replayer could spend to hold out the provider's retries that
        differ from its first copy in a header (an attempt header, one a proxy adds)."""
        begun = self.begun.get(signed)
        if begun is None:
            _keep_last(self.begun, signed, Begun({copy: None}), ANSWERS_KEPT)
            return None, 0.0
        self.begun.move_to_end(signed)
        by_copy: TokenBucket | None = None
        if copy in begun.variants:
            by_copy = begun.variants[copy] or _bucket()
            begun.variants[copy] = by_copy
        elif len(begun.variants) < FREE_VARIANTS:
            begun.variants[copy] = None
            return None, 0.0
        source = repeat_source(address)
        by_address = self.repeats.get(source) or _bucket()
        _keep_last(self.repeats, source, by_address, ADDRESSES_KEPT)
        buckets = (by_address,) if by_copy is None else (by_address, by_copy)
        wait = max(bucket.due() for bucket in buckets)
        if not wait:
            for bucket in buckets:
                bucket.take()
        return Repeat(buckets), wait

    def held_new(self, signed: str, held: Iterable[str], repeat: Repeat | None) -> bool:
        """Note the ids of events a copy of ``signed`` had held. When one was not held before, the
        copy sent something: its tokens (``repeat``) are given back. Whether one was."""
        begun = self.begun.get(signed)
        new = set(held) - begun.held if begun is not None else set(held)
        if begun is not None:
            begun.held |= new
        if new and repeat is not None:
            for bucket in repeat.buckets:
                bucket.give_back()
        return bool(new)

    def remember_copy(self, delivery_id: str, copy: str) -> None:
        """Keep the answer kept for ``delivery_id`` under ``copy`` too: a copy answered as before
        (it sent nothing the delivery did not) is answered so again before it is read."""
        if (kept := self.answered.get(delivery_id)) is not None:
            _keep_last(self.copies, copy, kept, ANSWERS_KEPT)

    def answer_to_copy(self, key: str) -> tuple[int, Any, int] | None:
        """The answer kept for a delivery this one is a copy of (:meth:`keys`), with how many
        events it had: known before its body is parsed, its filters run and its templates
        rendered (a replayed 750 KB delivery cost 24 ms of the event loop each time)."""
        kept = self.copies.get(key)
        return None if kept is None else (kept[0], kept[1], len(kept[2]))

    def answer_to(self, delivery: Delivery) -> tuple[int, Any] | None:
        """The answer kept for this delivery, when it sent every event this copy would: which
        entries match may depend on headers the signature does not cover, and a replay with other
        headers, answered first, would otherwise have the provider's own delivery answered as
        before without the events only its headers match."""
        kept = self.answered.get(delivery.delivery_id)
        if kept is None or not {e.id for e in delivery.events} <= kept[2]:
            return None
        return kept[0], kept[1]

    @property
    def source(self) -> str:
        return f"{SOURCE_PREFIX}{self.slug}"

    def verify(self, headers: Headers, body: bytes, now: float | None = None) -> None:
        """Raise :class:`SignatureInvalid` unless the delivery is signed as configured."""
        self.verifier.verify(headers, body, time.time() if now is None else now)

    def delivery_ids(self, headers: Headers, body: bytes, payload: Any) -> tuple[str, str | None]:
        """``(delivery id, provider's delivery id)``. The first is what the signature covers: the
        provider's signed id, else ``id_from: field:``, else ``sha256:`` of the body. The second is
        the provider's own id for the delivery, signed or not, for metadata and logs."""
        signed = self.verifier.signed_id(headers, payload)
        announced = self.verifier.announced_id(headers)
        from_body = None
        if self.id_from is not None:
            if self.id_from.kind == "field":
                from_body = located_id(self.id_from, headers, payload)
            else:
                announced = announced or self.id_from.resolve(headers, payload)
        delivery_id = signed or from_body or f"sha256:{hashlib.sha256(body).hexdigest()}"
        return delivery_id, signed or announced

    def events(self, headers: Headers, body: bytes, content_type: str | None = None) -> Delivery:
        """The events of a *verified* delivery; EventRejected when the body is unusable."""
        payload = parse_body(body, content_type)
        delivery_id, provider_id = self.delivery_ids(headers, body, payload)
        if not isinstance(payload, dict):
            payload = {"data": payload}
        metadata = self.metadata(headers, delivery_id, provider_id)
        delivery = Delivery(delivery_id, provider_id)
        for entry in self.entries:
            event_id = f"{delivery_id}:{entry.name}"
            if entry.filter is not None:
                verdict = entry.filter.evaluate(self._activation(entry, payload, metadata, event_id))
                if verdict is None:  # out of budget: no match, but not as a filter that does not hold
                    delivery.limited.append(entry.name)
                if verdict is not True:
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

    def metadata(self, headers: Headers, delivery_id: str, provider_id: str | None = None) -> dict[str, Any]:
        kept = kept_headers(headers, self.verifier.signature_headers)
        webhook = {"slug": self.slug, "delivery_id": delivery_id}
        if provider_id is not None:
            webhook["provider_delivery_id"] = provider_id
        meta: dict[str, Any] = {"headers": kept, "webhook": webhook}
        if "x-correlation-id" in kept:
            meta["correlation_id"] = kept["x-correlation-id"]
        if "traceparent" in kept:
            meta["traceparent"] = kept["traceparent"]
        return meta

    def _activation(self, entry: EventEntry, payload: dict[str, Any], metadata: dict[str, Any], event_id: str) -> Any:
        try:
            return activation(entry.name, payload, self.source, metadata, event_id)
        except ValueError as exc:  # CEL's int is signed 64-bit: a larger (unsigned) one overflows
            raise EventRejected(
                "malformed", f"webhook {self.slug!r}, event {entry.name!r}: the filter cannot read the body: {exc}"
            ) from None

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
    _warn_shared_secrets(webhooks, origin)
    return routes


def _warn_shared_secrets(webhooks: Sequence[Webhook], origin: str) -> None:
    """A secret two webhooks share lets a delivery captured on one verify on the other (no
    signature covers the URL), and start its workflows: said at load, naming the slugs."""
    holders: dict[str, list[str]] = {}
    for hook in webhooks:
        for secret in set(hook.verify.all_secrets):
            holders.setdefault(secret, []).append(hook.slug)
    for slugs in holders.values():
        if len(slugs) > 1:
            log.warning(
                "%s: webhooks %s share a secret: a delivery to one verifies on the others and starts "
                "their workflows; give each webhook its own secret",
                origin,
                ", ".join(repr(s) for s in slugs),
            )
