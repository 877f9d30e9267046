"""Property-based tests of every webhook kind (issue 9, item 11): for any bytes and headers,
``verify`` passes or raises ``SignatureInvalid``, and ``events`` returns a delivery or raises
``EventRejected``; nothing else escapes. A delivery signed as configured always verifies, and
its event ids never depend on a header the provider does not sign.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.errors import EventRejected
from bridge.signatures import SignatureInvalid
from bridge.snapshot import parse
from bridge.webhooks import WebhookRoute, compile_webhooks

SECRET = "a-webhook-secret-of-some-length"
SW_KEY = b"a-standard-webhooks-key-32-bytes"
SW_SECRET = "whsec_" + base64.b64encode(SW_KEY).decode()
NOW = 1_700_000_000

ENTRIES: list[dict[str, Any]] = [
    {"name": "all"},
    {"name": "filtered", "filter": 'has(payload.a) && payload.a > 1 && metadata.headers["x-kind"] == "k"'},
    {"name": "shaped", "input": {"a": "{{ .payload.a }}", "kind": "{{ .headers['x-kind'] }}", "id": "{{ .id }}"}},
]
HOOKS: list[dict[str, Any]] = [
    {"slug": "github", "verify": {"kind": "github", "secret": SECRET}},
    {"slug": "stripe", "verify": {"kind": "stripe", "secret": SECRET, "tolerance_seconds": 300}},
    {"slug": "sw", "verify": {"kind": "standard-webhooks", "secret": SW_SECRET}},
    {"slug": "hmac", "verify": {"kind": "hmac", "secret": SECRET}, "id_from": "header:X-Delivery"},
    {
        "slug": "hmac-b64",
        "verify": {
            "kind": "hmac",
            "secret": SECRET,
            "header": "X-Sig",
            "algorithm": "sha1",
            "encoding": "base64",
            "prefix": "sha1=",
        },
        "id_from": "field:meta.id",
    },
    {"slug": "none", "verify": {"kind": "none"}, "id_from": "field:id"},
]
ROUTES: dict[str, WebhookRoute] = compile_webhooks(
    parse(
        {
            "project": "props",
            "webhooks": [{**hook, "events": ENTRIES} for hook in HOOKS],
            "workflows": [{"id": "w", "workflow_type": "W", "triggers": [{"name": "*"}]}],
        },
        origin="test",
    ).config.webhooks
)
SLUGS = sorted(ROUTES)
EXAMPLES = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- strategies ----------------------------------------------------------------------------


def hexes(n: int) -> st.SearchStrategy[str]:
    return st.binary(min_size=n, max_size=n).map(bytes.hex)


def b64s(n: int) -> st.SearchStrategy[str]:
    return st.binary(min_size=n, max_size=n).map(lambda b: base64.b64encode(b).decode())


numbers = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20).map(str),
    st.integers(min_value=0, max_value=20).map(lambda n: "9" * n),
    st.integers(min_value=300, max_value=500).map(lambda n: "9" * n),  # past a float's range
    st.just(str(NOW)),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
text = st.text(max_size=40) | st.text(st.characters(codec="latin-1"), max_size=40)
timestamps = numbers | numbers.map(lambda n: f" {n} ") | text
stripe_values = st.tuples(
    timestamps.map(lambda t: [t]) | st.lists(timestamps, max_size=3),
    st.lists(hexes(32) | text, min_size=1, max_size=3),
).map(lambda tv: ",".join([*(f"t={t}" for t in tv[0]), *(f"v1={v}" for v in tv[1])]))
sw_values = st.lists(b64s(32).map(lambda b: "v1," + b) | text, max_size=3).map(" ".join)

header_values = st.one_of(
    text,
    numbers,
    hexes(32).map(lambda h: "sha256=" + h),
    stripe_values,
    sw_values,
    st.builds(lambda a, b: f"{a}={b}", text, text),
)
KNOWN_HEADERS = [
    "x-hub-signature-256",
    "x-github-delivery",
    "x-github-event",
    "stripe-signature",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "svix-id",
    "svix-timestamp",
    "svix-signature",
    "x-signature",
    "x-sig",
    "x-delivery",
    "x-kind",
    "traceparent",
    "x-correlation-id",
    "content-type",
]
header_names = st.sampled_from(KNOWN_HEADERS) | st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True)
# Each kind's own headers, present more often than chance would have them, holding valid-looking
# values, garbage, huge numbers or non-ASCII text.
OWN_HEADERS: dict[str, dict[str, st.SearchStrategy[str]]] = {
    "github": {"x-hub-signature-256": hexes(32).map(lambda h: "sha256=" + h) | text, "x-github-delivery": text},
    "stripe": {"stripe-signature": stripe_values | text},
    "sw": {"webhook-id": text, "webhook-timestamp": timestamps, "webhook-signature": sw_values | text},
    "hmac": {"x-signature": hexes(32) | text, "x-delivery": text},
    "hmac-b64": {"x-sig": b64s(20).map(lambda b: "sha1=" + b) | text},
    "none": {"x-delivery": text},
}


def headers_for(slug: str) -> st.SearchStrategy[dict[str, str]]:
    own = st.fixed_dictionaries({}, optional=OWN_HEADERS[slug])
    svix = st.fixed_dictionaries(
        {}, optional={"svix-id": text, "svix-timestamp": timestamps, "svix-signature": sw_values}
    )
    extra = st.dictionaries(header_names, header_values, max_size=6)
    return st.builds(lambda *ds: {k: v for d in ds for k, v in d.items()}, extra, svix if slug == "sw" else own, own)


headers_st = st.dictionaries(header_names, header_values, max_size=8)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats()
    | st.text(max_size=10)
    | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)
json_bodies = st.builds(
    lambda value, ascii_only: json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"),
    json_values,
    st.booleans(),
)
objects = st.fixed_dictionaries(
    {"a": json_values, "id": json_values, "meta": st.fixed_dictionaries({"id": json_values})}
).map(lambda v: json.dumps(v).encode())
deep = st.builds(
    lambda n, opener, closer: opener * n + closer * n,
    st.integers(min_value=0, max_value=3_000),
    st.sampled_from([b"[", b'{"a":']),
    st.sampled_from([b"]", b"}"]),
)
forms = st.builds(lambda b: b"payload=" + quote_from_bytes(b).encode(), json_bodies | st.binary(max_size=50))
bodies = st.one_of(st.binary(max_size=200), json_bodies, objects, deep, forms)
content_types = st.one_of(
    st.none(),
    st.sampled_from(
        ["application/json", "application/x-www-form-urlencoded", "application/x-www-form-urlencoded; charset=utf-8"]
    ),
    text,
)
nows = st.just(float(NOW)) | st.floats(min_value=0, max_value=1e12)


# --- signing, written out from the providers' documentation --------------------------------


def mac(key: bytes, message: bytes, algorithm: str = "sha256") -> bytes:
    return hmac.new(key, message, algorithm).digest()


def on_the_wire(text: str) -> bytes:
    """A header value as a client sends it: Latin-1 when it can be, else UTF-8 (which the server
    then reads as Latin-1 text)."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode()


def signed(slug: str, body: bytes, headers: dict[str, str], t: int = NOW) -> dict[str, str]:
    """``headers`` plus a valid signature of ``body`` for the webhook ``slug``."""
    if slug == "github":
        return {**headers, "x-hub-signature-256": "sha256=" + mac(SECRET.encode(), body).hex()}
    if slug == "stripe":
        return {**headers, "stripe-signature": f"t={t},v1={mac(SECRET.encode(), f'{t}.'.encode() + body).hex()}"}
    if slug == "sw":
        msg_id = headers.get("webhook-id") or "msg_1"
        sig = base64.b64encode(mac(SW_KEY, on_the_wire(msg_id) + f".{t}.".encode() + body)).decode()
        out = {k: v for k, v in headers.items() if not k.startswith(("webhook-", "svix-"))}
        return {**out, "webhook-id": msg_id, "webhook-timestamp": str(t), "webhook-signature": f"v1,{sig}"}
    if slug == "hmac":
        return {**headers, "x-signature": mac(SECRET.encode(), body).hex()}
    if slug == "hmac-b64":
        return {**headers, "x-sig": "sha1=" + base64.b64encode(mac(SECRET.encode(), body, "sha1")).decode()}
    return headers


def events_or_rejected(route: WebhookRoute, headers: dict[str, str], body: bytes, content_type: str | None) -> Any:
    try:
        return route.events(headers, body, content_type)
    except EventRejected as exc:
        return exc


# --- properties ----------------------------------------------------------------------------


@pytest.mark.parametrize("slug", SLUGS)
@EXAMPLES
@given(data=st.data(), body=bodies, now=nows)
def test_verify_passes_or_raises_signature_invalid(slug: str, data: st.DataObject, body: bytes, now: float) -> None:
    headers = data.draw(headers_for(slug), label="headers")
    try:
        ROUTES[slug].verify(headers, body, now)
    except SignatureInvalid:
        pass


@pytest.mark.parametrize("slug", SLUGS)
@EXAMPLES
@given(data=st.data(), body=bodies, content_type=content_types)
def test_events_return_a_delivery_or_raise_event_rejected(
    slug: str, data: st.DataObject, body: bytes, content_type: str | None
) -> None:
    headers = data.draw(headers_for(slug), label="headers")
    route = ROUTES[slug]
    result = events_or_rejected(route, headers, body, content_type)
    if isinstance(result, EventRejected):
        assert result.reason in ("malformed", "input_failed")
        return
    assert result.delivery_id
    for event in result.events:
        assert event.id == f"{result.delivery_id}:{event.name}"
        assert event.source == f"webhook:{slug}"
        assert isinstance(event.payload, dict)
        json.dumps(event.to_dict()).encode()  # what the signal encoder will do: it must not fail


@EXAMPLES
@given(slug=st.sampled_from(SLUGS), headers=headers_st, body=bodies)
def test_a_delivery_signed_as_configured_verifies(slug: str, headers: dict[str, str], body: bytes) -> None:
    ROUTES[slug].verify(signed(slug, body, headers), body, NOW)


@EXAMPLES
@given(
    slug=st.sampled_from(SLUGS),
    headers=headers_st,
    body=bodies,
    content_type=content_types,
    fresh=st.dictionaries(st.sampled_from(["x-github-delivery", "x-delivery", "user-agent"]), text, max_size=3),
)
def test_event_ids_never_depend_on_an_unsigned_header(
    slug: str, headers: dict[str, str], body: bytes, content_type: str | None, fresh: dict[str, str]
) -> None:
    """A replay may change any header the signature does not cover: the event ids stay."""
    route = ROUTES[slug]
    first = signed(slug, body, headers)
    replay = signed(slug, body, {**headers, **fresh})
    route.verify(replay, body, NOW)
    a, b = (events_or_rejected(route, h, body, content_type) for h in (first, replay))
    if isinstance(a, EventRejected) or isinstance(b, EventRejected):
        assert type(a) is type(b)  # an input template may see the headers, and fail for some
        return
    assert a.delivery_id == b.delivery_id
    assert [e.id for e in a.events if e.name == "all"] == [e.id for e in b.events if e.name == "all"]


@settings(max_examples=100, deadline=None)
@given(slug=st.sampled_from(["stripe", "sw"]), age=st.integers(min_value=-(10**6), max_value=10**6))
def test_signed_timestamps_hold_to_the_window(slug: str, age: int) -> None:
    body = b'{"id": "evt_1"}'
    headers = signed(slug, body, {}, t=NOW - age)
    try:
        ROUTES[slug].verify(headers, body, NOW)
    except SignatureInvalid:
        assert abs(age) > 300
    else:
        assert abs(age) <= 300


def test_the_real_clock_is_used_when_none_is_given() -> None:
    body = b"{}"
    t = int(time.time())
    ROUTES["stripe"].verify(signed("stripe", body, {}, t=t), body)


def test_digest_is_of_the_raw_bytes() -> None:
    body = b'{"a": 1}'
    delivery = ROUTES["github"].events({"x-github-delivery": "x"}, body)
    assert delivery.delivery_id == "sha256:" + hashlib.sha256(body).hexdigest()
