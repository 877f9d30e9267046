"""Webhook signature schemes: prove a delivery came from its provider.

One :class:`Verifier` per ``verify.kind`` (``none``, ``hmac``, ``github``, ``stripe``,
``standard-webhooks``), each checked against the providers' published test vectors. What each kind
protects against, and which delivery ids it signs, is in docs/webhooks.md.

A verifier reads headers and body as a sender wrote them: whatever they hold, ``verify`` either
returns or raises :class:`SignatureInvalid`, never anything else.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from bridge.config import WebhookVerify
from bridge.errors import BridgeError

Headers = Mapping[str, str]


class SignatureInvalid(BridgeError):
    """A delivery whose signature does not verify. The message says why, for the log only."""


class Verifier(Protocol):
    """One webhook signature scheme.

    ``verify`` raises :class:`SignatureInvalid` unless ``body`` carries a valid signature made
    with one of the configured secrets; ``now`` is the current Unix time. ``signed_id`` is the
    provider's delivery id when the signature covers it (Stripe's event ``id``, Standard
    Webhooks' ``webhook-id``), else None: only such an id may name the delivery, since anyone
    replaying a captured delivery can change what is not signed. ``announced_id`` is a delivery id
    the provider sends unsigned (GitHub's ``X-GitHub-Delivery``): for metadata and logs only.
    ``signature_headers`` (lower-case) are kept out of event metadata. ``signed_headers`` is what
    else than the body a verified signature covers (a timestamp, a delivery id), as read for the
    check: two copies with the same body and the same such values are one signed delivery, sent
    again, however their signature headers are spelled.
    """

    kind: str
    signature_headers: frozenset[str]

    def verify(self, headers: Headers, body: bytes, now: float) -> None: ...

    def signed_headers(self, headers: Headers) -> tuple[str, ...]: ...

    def signed_id(self, headers: Headers, payload: Any) -> str | None: ...

    def announced_id(self, headers: Headers) -> str | None: ...


def _digest(algorithm: str, key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, algorithm).digest()


def _ascii(value: str) -> bytes:
    # compare_digest refuses non-ASCII str; a header is whatever the sender put there.
    return value.encode("utf-8", "replace")


def _wire(value: str) -> bytes:
    """A header value as the bytes that were sent: ASGI servers decode header bytes as Latin-1.
    (Text no HTTP header can carry, from a caller other than the HTTP adapter, is UTF-8.)"""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace")


MAX_SIGNATURES = 8
"""Signatures one header may offer (a provider rolling its secret sends two or three): an unsigned
request with thousands of entries, each compared with each configured secret, cost milliseconds
before it was refused."""


def _any_equal(given: Iterable[str], expected: Sequence[str]) -> bool:
    """True when some given value (of the first :data:`MAX_SIGNATURES`) equals some expected one,
    each pair compared in constant time."""
    found = False
    wanted = [_ascii(e) for e in expected]
    for n, g in enumerate(given):
        if n == MAX_SIGNATURES:
            break
        offered = _ascii(g)
        for e in wanted:
            found |= hmac.compare_digest(offered, e)
    return found


_TIMESTAMP = re.compile(r"[0-9]{1,15}")
"""Unix seconds in ASCII digits. Fifteen digits reach far past any clock; bounding them before
``int()`` keeps a 400-digit value from overflowing the float arithmetic below."""


def _seconds(timestamp: str | None) -> str:
    """A timestamp as :func:`_fresh` reads it, in its one spelling (``" 017"`` is ``"17"``); what
    is no timestamp as it is (it cannot have verified)."""
    text = (timestamp or "").strip()
    return str(int(text)) if _TIMESTAMP.fullmatch(text) else text


def _fresh(timestamp: str | None, now: float, tolerance: int) -> int:
    """The timestamp as an int, if it is one and at most ``tolerance`` seconds from ``now``,
    in the past or in the future."""
    text = (timestamp or "").strip()
    if not _TIMESTAMP.fullmatch(text):
        raise SignatureInvalid("timestamp is missing or not Unix seconds (at most 15 ASCII digits)")
    ts = int(text)
    if abs(now - ts) > tolerance:
        raise SignatureInvalid(f"timestamp {ts} is more than {tolerance}s away from now")
    return ts


class NoVerify:
    """``kind: none``: anyone who can reach the URL can deliver. Must be configured explicitly."""

    kind = "none"
    signature_headers: frozenset[str] = frozenset()

    def verify(self, headers: Headers, body: bytes, now: float) -> None:
        return None

    def signed_headers(self, headers: Headers) -> tuple[str, ...]:
        return ()

    def signed_id(self, headers: Headers, payload: Any) -> str | None:
        return None

    def announced_id(self, headers: Headers) -> str | None:
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

    def signed_headers(self, headers: Headers) -> tuple[str, ...]:
        return ()  # only the body is signed

    def signed_id(self, headers: Headers, payload: Any) -> str | None:
        return None  # only the body is signed

    def announced_id(self, headers: Headers) -> str | None:
        return (headers.get(self._delivery_header) or None) if self._delivery_header else None


def github(secrets: Sequence[str]) -> HmacVerify:
    """GitHub: ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>``.

    GitHub signs neither a timestamp nor ``X-GitHub-Delivery``: a captured delivery can be sent
    again with any delivery id. So the body names the delivery, and the header is only announced.
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
    The delivery id is the event's ``id`` (signed, being in the body), the same on every retry.
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

    def _read(self, headers: Headers) -> tuple[list[str], list[str]]:
        """The header's ``t=`` values and its ``v1=`` signatures (lower-cased)."""
        timestamps, v1 = [], []
        for item in (headers.get(self.header) or "").split(","):
            key, _, value = item.strip().partition("=")
            if key == "t":
                timestamps.append(value)
            elif key == "v1" and value:
                v1.append(value.strip().lower())
        return timestamps, v1

    def verify(self, headers: Headers, body: bytes, now: float) -> None:
        if not headers.get(self.header):
            raise SignatureInvalid(f"header {self.header} is missing")
        timestamps, v1 = self._read(headers)
        if len(timestamps) != 1 or not v1:
            raise SignatureInvalid(f"header {self.header} needs one t= and at least one v1=")
        ts = _fresh(timestamps[0], now, self.tolerance)
        if not _any_equal(v1, [self.sign(body, ts, i) for i in range(len(self._keys))]):
            raise SignatureInvalid(f"no v1 signature in {self.header} matches a configured secret")

    def signed_headers(self, headers: Headers) -> tuple[str, ...]:
        timestamps, _ = self._read(headers)
        return tuple(_seconds(t) for t in timestamps)

    def signed_id(self, headers: Headers, payload: Any) -> str | None:
        event_id = payload.get("id") if isinstance(payload, dict) else None
        return event_id if isinstance(event_id, str) and event_id else None

    def announced_id(self, headers: Headers) -> str | None:
        return None


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
        signed = _wire(msg_id) + f".{timestamp}.".encode() + body
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

    def signed_headers(self, headers: Headers) -> tuple[str, ...]:
        return (self._header(headers, "id") or "", _seconds(self._header(headers, "timestamp")))

    def signed_id(self, headers: Headers, payload: Any) -> str | None:
        return self._header(headers, "id")

    def announced_id(self, headers: Headers) -> str | None:
        return None


MIN_KEY_BYTES = 16


def _check_keys(keys: Sequence[bytes]) -> None:
    """An HMAC key anybody could guess is no key: refuse empty and short ones at load."""
    for key in keys:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(
                f"a secret of {len(key)} byte(s) is too short to sign with; use at least {MIN_KEY_BYTES} "
                "(check that the ${VAR} it comes from is set)"
            )


def build_verifier(spec: WebhookVerify) -> Verifier:
    """The verifier for a ``verify:`` block; ValueError for a secret the kind cannot use."""
    secrets = spec.all_secrets
    if spec.kind == "none":
        return NoVerify()
    if spec.kind == "standard-webhooks":
        _check_keys([StandardWebhooksVerify.key(s) for s in secrets])
    else:
        _check_keys([s.encode() for s in secrets])
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
