"""Replays, timestamps, keys and bodies at the edges, for every webhook kind (issue 9, items 5 and 9).

A delivery is named only by what its signature covers, so a replay with fresh unsigned headers
starts nothing new; signed timestamps are held to the tolerance window both ways, and a timestamp
of any length is a 401, never an overflow; short keys are refused at load; a body JSON cannot
carry through to Temporal is ``malformed``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import pytest

from bridge import webhooks
from bridge.decode import MAX_JSON_DEPTH
from bridge.errors import ConfigError, EventRejected
from bridge.signatures import SignatureInvalid, StandardWebhooksVerify, StripeVerify, Verifier
from bridge.snapshot import parse
from bridge.webhooks import (
    ADDRESSES_KEPT,
    ANSWERS_KEPT,
    FREE_VARIANTS,
    MAX_KEPT_HEADERS,
    MAX_KEPT_VALUE,
    REPEAT_BURST,
    REPEAT_RATE,
    WebhookRoute,
    compile_webhooks,
    repeat_source,
)

SECRET = "a-webhook-secret-of-some-length"
SW_KEY = b"sixteen-byte-key"
SW_SECRET = "whsec_" + base64.b64encode(SW_KEY).decode()
T = 1_700_000_000
BODY = b'{"ref": "refs/heads/main", "n": 1}'


def route(verify: dict[str, Any], **extra: Any) -> WebhookRoute:
    cfg = parse(
        {
            "project": "hooks",
            "webhooks": [{"slug": "hook", "verify": verify, "events": [{"name": "a"}, {"name": "b"}], **extra}],
            "workflows": [{"id": "w", "workflow_type": "W", "triggers": [{"name": "*"}]}],
        },
        origin="test.yaml",
    ).config
    return compile_webhooks(cfg.webhooks, origin="test.yaml")["hook"]


def hex_mac(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def ids(r: WebhookRoute, headers: dict[str, str], body: bytes = BODY) -> list[str]:
    r.verify(headers, body, T)
    return [e.id for e in r.events(headers, body).events]


def digest(body: bytes = BODY) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


# --- replays -------------------------------------------------------------------------------


def test_a_replayed_github_delivery_with_new_guids_has_the_same_event_ids() -> None:
    r = route({"kind": "github", "secret": SECRET})
    signed = {"x-hub-signature-256": "sha256=" + hex_mac(BODY), "x-github-event": "push"}
    seen = [ids(r, {**signed, "x-github-delivery": guid}) for guid in ("d-1", "d-2", "d-3", "")]
    assert seen == [[f"{digest()}:a", f"{digest()}:b"]] * 4
    other = b'{"ref": "refs/heads/main", "n": 2}'
    assert ids(r, {"x-hub-signature-256": "sha256=" + hex_mac(other), "x-github-delivery": "d-1"}, other) != seen[0]


def test_github_form_encoded_delivery_is_named_by_its_raw_bytes() -> None:
    r = route({"kind": "github", "secret": SECRET})
    form = b"payload=%7B%22a%22%3A1%7D"
    headers = {"x-hub-signature-256": "sha256=" + hex_mac(form), "x-github-delivery": "d"}
    r.verify(headers, form, T)
    assert r.events(headers, form, "application/x-www-form-urlencoded").delivery_id == digest(form)


def test_a_replayed_hmac_delivery_with_a_new_header_id_has_the_same_event_ids() -> None:
    r = route({"kind": "hmac", "secret": SECRET}, id_from="header:X-Delivery")
    signed = {"x-signature": hex_mac(BODY)}
    first, second = (r.events({**signed, "x-delivery": h}, BODY) for h in ("one", "two"))
    assert [e.id for e in first.events] == [e.id for e in second.events] == [f"{digest()}:a", f"{digest()}:b"]
    assert (first.provider_delivery_id, second.provider_delivery_id) == ("one", "two")
    assert first.events[0].metadata["webhook"]["provider_delivery_id"] == "one"


def test_kind_none_ignores_a_header_id_too() -> None:
    r = route({"kind": "none"}, id_from="header:X-Delivery")
    assert r.events({"x-delivery": "1"}, BODY).delivery_id == r.events({"x-delivery": "2"}, BODY).delivery_id


def test_stripe_retry_has_a_new_timestamp_and_the_same_event_ids() -> None:
    r = route({"kind": "stripe", "secret": SECRET})
    body = b'{"id": "evt_1", "type": "x"}'
    seen = []
    for t in (T, T + 3600):
        header = {"stripe-signature": f"t={t},v1={hex_mac(f'{t}.'.encode() + body)}"}
        r.verify(header, body, t)
        seen.append([e.id for e in r.events(header, body).events])
    assert seen == [["evt_1:a", "evt_1:b"]] * 2


def test_standard_webhooks_id_is_signed_so_a_new_one_is_refused() -> None:
    verifier = StandardWebhooksVerify([SW_SECRET])
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(T), "webhook-signature": verifier.sign(BODY, "msg_1", T)}
    verifier.verify(headers, BODY, T)
    with pytest.raises(SignatureInvalid):
        verifier.verify({**headers, "webhook-id": "msg_2"}, BODY, T)


def test_standard_webhooks_non_ascii_id_is_signed_as_its_wire_bytes() -> None:
    """ASGI servers hand header bytes over as Latin-1 text: ``é`` sent in UTF-8 arrives as ``Ã©``
    and must be signed as the two bytes that were sent."""
    sent = "msg_é".encode()
    mac = hmac.new(SW_KEY, sent + f".{T}.".encode() + BODY, hashlib.sha256).digest()
    headers = {
        "webhook-id": sent.decode("latin-1"),
        "webhook-timestamp": str(T),
        "webhook-signature": "v1," + base64.b64encode(mac).decode(),
    }
    StandardWebhooksVerify([SW_SECRET]).verify(headers, BODY, T)


def signed_key(r: WebhookRoute, headers: dict[str, str], body: bytes = BODY) -> str:
    r.verify(headers, body, T)
    return r.keys(headers, body, "application/json")[0]


def test_a_signed_delivery_is_one_however_its_signature_headers_are_spelled() -> None:
    """A replayer may spell a signature header otherwise and still verify (hex in capitals, the
    ``v1`` entries of a roll in another order, ``svix-*`` for ``webhook-*``): each copy is the same
    signed delivery. A retry the provider signs anew (another timestamp) is another one."""
    github = route({"kind": "github", "secret": SECRET})
    sig = "sha256=" + hex_mac(BODY)
    assert signed_key(github, {"x-hub-signature-256": sig}) == signed_key(
        github, {"x-hub-signature-256": "sha256=" + hex_mac(BODY).upper(), "x-github-delivery": "other"}
    )
    stripe = route({"kind": "stripe", "secret": SECRET})
    v1 = hex_mac(f"{T}.".encode() + BODY)
    first = signed_key(stripe, {"stripe-signature": f"t={T},v1={v1}"})
    assert signed_key(stripe, {"stripe-signature": f"v1=00,v1={v1.upper()}, t=0{T}"}) == first
    assert signed_key(stripe, {"stripe-signature": f"t=\x1c{T},v1={v1}"}) == first  # int() alone refuses \x1c
    later = hex_mac(f"{T + 60}.".encode() + BODY)
    assert signed_key(stripe, {"stripe-signature": f"t={T + 60},v1={later}"}) != first
    sw = route({"kind": "standard-webhooks", "secret": SW_SECRET})
    sig = StandardWebhooksVerify([SW_SECRET]).sign(BODY, "msg_1", T)
    webhook = {"webhook-id": "msg_1", "webhook-timestamp": str(T), "webhook-signature": sig}
    svix = {"svix-id": "msg_1", "svix-timestamp": f" {T}", "svix-signature": f"v1,bogus {sig}"}
    assert signed_key(sw, webhook) == signed_key(sw, svix)
    other = StandardWebhooksVerify([SW_SECRET]).sign(BODY, "msg_2", T)
    assert signed_key(sw, {**webhook, "webhook-id": "msg_2", "webhook-signature": other}) != signed_key(sw, webhook)


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    """The repeat buckets refill nothing meanwhile."""
    monkeypatch.setattr(webhooks, "_now", lambda: 1000.0)


def _counted(r: WebhookRoute, key: str, copy: str, address: str) -> float:
    """The wait of a copy that, let in, holds nothing new."""
    repeat, wait = r.repeat(key, copy, address)
    assert repeat is not None
    if not wait:
        r.held_new(key, [], repeat)
    return wait


def _github(r: WebhookRoute) -> str:
    return signed_key(r, {"x-hub-signature-256": "sha256=" + hex_mac(BODY)})


def test_copies_past_the_free_variants_are_counted_by_the_address_that_sends_them(frozen: None) -> None:
    r = route({"kind": "github", "secret": SECRET})
    key = _github(r)
    for n in range(FREE_VARIANTS):  # the first copy, and the others with other headers
        assert r.repeat(key, f"variant-{n}", "192.0.2.10") == (None, 0.0)
    assert [_counted(r, key, f"replay-{n}", "203.0.113.9") for n in range(REPEAT_BURST)] == [0.0] * REPEAT_BURST
    assert 0 < _counted(r, key, "replay-late", "203.0.113.9") <= 1 / REPEAT_RATE
    assert _counted(r, key, "replay-late", "198.51.100.7") == 0.0, "another address has its own count"


def test_a_replayer_cannot_hold_out_the_providers_retry_with_other_headers(frozen: None) -> None:
    """A retry that differs from the first copy in a header (an attempt header, a trace header a
    proxy adds), from another of the provider's addresses, waits for nothing a replayer spent."""
    r = route({"kind": "github", "secret": SECRET})
    key = _github(r)
    assert r.repeat(key, "provider-copy", "192.0.2.10") == (None, 0.0)
    for n in range(1, FREE_VARIANTS):
        assert r.repeat(key, f"replay-{n}", "203.0.113.9") == (None, 0.0)
    for address in ("203.0.113.9", "203.0.113.10", "2001:db8:1:1::/64"):
        while _counted(r, key, f"ping-{address}", address) == 0.0:
            pass
    assert _counted(r, key, "provider-copy x-attempt: 2", "192.0.2.11") == 0.0
    assert _counted(r, key, "provider-copy", "192.0.2.10") == 0.0, "its first copy read again"


def test_a_copy_read_again_waits_for_its_own_count(frozen: None) -> None:
    """A replayer that reads one of the free copies again from many addresses is read for nothing
    a burst of times; that copy holds what the provider's identical retry would, so nothing of
    the provider's is held out."""
    r = route({"kind": "github", "secret": SECRET})
    key = _github(r)
    assert r.repeat(key, "provider-copy", "192.0.2.10") == (None, 0.0)
    assert r.repeat(key, "replay-1", "203.0.113.9") == (None, 0.0)
    waits = [_counted(r, key, "replay-1", f"198.51.100.{n}") for n in range(REPEAT_BURST + 1)]
    assert waits[:REPEAT_BURST] == [0.0] * REPEAT_BURST and waits[-1] > 0


def test_ipv6_addresses_are_counted_by_their_48() -> None:
    assert repeat_source("2001:db8:1:2::/64") == repeat_source("2001:db8:1:ffff::/64") == "2001:db8:1::/48"
    assert repeat_source("2001:db8:2::/48") == "2001:db8:2::/48"
    assert repeat_source("203.0.113.9") == "203.0.113.9"
    assert repeat_source("testclient") == "testclient"


def test_a_copy_that_held_new_events_gives_its_tokens_back(frozen: None) -> None:
    """Only a copy that held nothing new is read for nothing: the retry of a delivery held in
    part holds the rest and costs nothing; a replay of it holds what was held already."""
    r = route({"kind": "none"})
    assert r.repeat("d", "first", "a") == (None, 0.0)
    assert r.held_new("d", ["d:0"], None) is True
    for n in range(1, 3 * REPEAT_BURST):
        repeat, wait = r.repeat("d", "first", "a")
        assert wait == 0.0 and r.held_new("d", ["d:0", f"d:{n}"], repeat) is True
    waits = []
    for _ in range(REPEAT_BURST + 1):
        repeat, wait = r.repeat("d", "first", "a")
        waits.append(wait)
        if not wait:
            assert r.held_new("d", ["d:0"], repeat) is False
    assert waits[:REPEAT_BURST] == [0.0] * REPEAT_BURST and waits[-1] > 0


def test_tokens_are_taken_as_a_copy_is_let_in(frozen: None) -> None:
    """Copies in flight at once (each waiting on Temporal) are let in a burst of times, not each
    on the same token."""
    r = route({"kind": "none"})
    assert r.repeat("d", "first", "a") == (None, 0.0)
    waits = [r.repeat("d", "first", "b")[1] for _ in range(REPEAT_BURST + 1)]
    assert waits[:REPEAT_BURST] == [0.0] * REPEAT_BURST and waits[-1] > 0


def test_an_address_is_read_for_nothing_a_burst_of_times_whatever_it_replays(frozen: None) -> None:
    r = route({"kind": "none"})
    for n in range(REPEAT_BURST):
        assert r.repeat(f"d{n}", "first", "provider") == (None, 0.0)
        assert _counted(r, f"d{n}", "first", "203.0.113.9") == 0.0
    assert r.repeat("late", "first", "provider") == (None, 0.0)
    assert _counted(r, "late", "first", "203.0.113.9") > 0
    assert _counted(r, "late", "first", "198.51.100.7") == 0.0, "another address has its own bucket"


def test_the_deliveries_and_addresses_a_route_keeps_for_repeats_are_bounded() -> None:
    r = route({"kind": "none"})
    for n in range(ANSWERS_KEPT + 10):
        r.repeat(f"d{n}", "c", "a")
    for n in range(ADDRESSES_KEPT + 10):
        r.repeat(f"d{ANSWERS_KEPT + 9}", "c", f"10.0.{n // 256}.{n % 256}")
    assert len(r.begun) == ANSWERS_KEPT and "d0" not in r.begun
    assert len(r.repeats) == ADDRESSES_KEPT
    newest = ADDRESSES_KEPT + 9
    assert "10.0.0.1" not in r.repeats and f"10.0.{newest // 256}.{newest % 256}" in r.repeats


# --- the tolerance window ------------------------------------------------------------------


def signed_at(t: str | int) -> int:
    """The time a valid-looking signature is made for: ``t`` if it is one, else any."""
    text = str(t)
    return int(text) if text.isdigit() and len(text) <= 15 else T


def stripe_headers(t: str | int, body: bytes = BODY) -> dict[str, str]:
    return {"stripe-signature": f"t={t},v1={StripeVerify([SECRET]).sign(body, signed_at(t))}"}


def sw_headers(t: str | int, body: bytes = BODY) -> dict[str, str]:
    sig = StandardWebhooksVerify([SW_SECRET]).sign(body, "msg_1", signed_at(t))
    return {"webhook-id": "msg_1", "webhook-timestamp": str(t), "webhook-signature": sig}


KINDS: dict[str, tuple[Callable[[int], Verifier], Callable[[str | int], dict[str, str]]]] = {
    "stripe": (lambda tol: StripeVerify([SECRET], tol), stripe_headers),
    "standard-webhooks": (lambda tol: StandardWebhooksVerify([SW_SECRET], tol), sw_headers),
}


EDGES: dict[str, tuple[Callable[[int], int], bool]] = {
    "now": (lambda tol: 0, True),
    "past-edge": (lambda tol: tol, True),  # now - t == tolerance: t lies in the past
    "future-edge": (lambda tol: -tol, True),
    "past-beyond": (lambda tol: tol + 1, False),
    "future-beyond": (lambda tol: -tol - 1, False),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tolerance", [1, 300])
@pytest.mark.parametrize("edge", EDGES)
def test_tolerance_window_edges_past_and_future(kind: str, tolerance: int, edge: str) -> None:
    """``now - t`` from ``-tolerance`` to ``+tolerance`` passes; a second beyond, either way, is refused."""
    make, headers = KINDS[kind]
    delta, passes = EDGES[edge]
    now = T + delta(tolerance)
    if passes:
        make(tolerance).verify(headers(T), BODY, now)
    else:
        with pytest.raises(SignatureInvalid, match="away from now"):
            make(tolerance).verify(headers(T), BODY, now)


@pytest.mark.parametrize("kind", KINDS)
def test_a_fraction_of_a_second_beyond_the_window_is_refused(kind: str) -> None:
    make, headers = KINDS[kind]
    make(300).verify(headers(T), BODY, T + 300.0)
    for now in (T + 300.001, T - 300.001):
        with pytest.raises(SignatureInvalid):
            make(300).verify(headers(T), BODY, now)


HUGE = "9" * 400


BAD_TIMESTAMPS = {
    "400-digits": HUGE,
    "16-digits": "1" + "0" * 15,
    "negative": f"-{T}",
    "plus": f"+{T}",
    "underscores": "1_700_000_000",
    "fraction": f"{T}.5",
    "exponent": "1.7e9",
    "arabic-indic-digits": "\u0661\u0667" + "\u0660" * 8,  # int() would take them
    "empty": "",
    "blank": " ",
    "hex": "0x65",
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("timestamp", BAD_TIMESTAMPS.values(), ids=BAD_TIMESTAMPS.keys())
def test_a_timestamp_that_is_not_short_unix_seconds_is_refused(kind: str, timestamp: str) -> None:
    """Checked before int(): a 400-digit value would overflow ``now - ts`` (a float)."""
    make, headers = KINDS[kind]
    with pytest.raises(SignatureInvalid, match="not Unix seconds"):
        make(300).verify(headers(timestamp), BODY, T)


@pytest.mark.parametrize("kind", KINDS)
def test_fifteen_digits_parse_and_are_merely_stale(kind: str) -> None:
    make, headers = KINDS[kind]
    with pytest.raises(SignatureInvalid, match="away from now"):
        make(300).verify(headers("9" * 15), BODY, T)


def test_github_and_hmac_have_no_window() -> None:
    for r in (route({"kind": "github", "secret": SECRET}), route({"kind": "hmac", "secret": SECRET})):
        name = "x-hub-signature-256" if r.verifier.kind == "github" else "x-signature"
        prefix = "sha256=" if r.verifier.kind == "github" else ""
        for now in (0, T, 10**12):
            r.verify({name: prefix + hex_mac(BODY)}, BODY, now)


# --- keys ----------------------------------------------------------------------------------


def b64(n: int) -> str:
    return base64.b64encode(b"k" * n).decode()


@pytest.mark.parametrize(
    ("verify", "ok"),
    [
        ({"kind": "standard-webhooks", "secret": "whsec_" + b64(15)}, False),
        ({"kind": "standard-webhooks", "secret": "whsec_" + b64(16)}, True),
        ({"kind": "standard-webhooks", "secret": b64(15)}, False),
        ({"kind": "standard-webhooks", "secret": b64(16)}, True),
        ({"kind": "standard-webhooks", "secrets": ["whsec_" + b64(32), "whsec_"]}, False),
        ({"kind": "standard-webhooks", "secrets": ["whsec_" + b64(32), ""]}, True),
        ({"kind": "standard-webhooks", "secrets": ["whsec_" + b64(32), "whsec_" + b64(8)]}, False),
        ({"kind": "hmac", "secret": "k" * 15}, False),
        ({"kind": "hmac", "secret": "k" * 16}, True),
        ({"kind": "hmac", "secrets": ["k" * 32, "k" * 15]}, False),
        ({"kind": "hmac", "secrets": ["k" * 32, ""], "secret": ""}, True),
        ({"kind": "github", "secrets": ["k" * 15, "k" * 32]}, False),
        ({"kind": "stripe", "secret": "whsec_" + "k" * 9}, False),
        ({"kind": "stripe", "secret": "whsec_" + "k" * 10}, True),
        ({"kind": "hmac", "secret": "é" * 8}, True),  # 16 bytes in UTF-8
        ({"kind": "hmac", "secret": "é" * 7}, False),
    ],
)
def test_key_length_edges_for_every_secret_of_a_rotation(verify: dict[str, Any], ok: bool) -> None:
    if ok:
        route(verify)
    else:
        with pytest.raises(ConfigError, match=r"webhook 'hook', verify: .*too short to sign with; use at least 16"):
            route(verify)


# --- bodies JSON cannot carry --------------------------------------------------------------


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(
    "body",
    [
        b"[NaN]",
        b'{"a": Infinity}',
        b"-Infinity",
        b"[1e400]",
        b"[-1e999]",
        str(2**64).encode(),
        str(-(2**63) - 1).encode(),
        b"[" + b"9" * 5000 + b"]",
        nested(MAX_JSON_DEPTH + 1),
        b'{"a": ' * (MAX_JSON_DEPTH + 1) + b"1" + b"}" * (MAX_JSON_DEPTH + 1),
        nested(2_500),
        nested(100_000),
        b'["\\ud800"]',
        b'{"\\udfff": 1}',
        b'"\\ud83d"',
        b'["\xed\xa0\x80"]',  # a surrogate encoded in UTF-8: not UTF-8
        b"payload=%5B%22%5Cud800%22%5D",  # the same, in a form
        b'{"a": "\xff"}',
    ],
    ids=[
        "nan",
        "infinity",
        "minus-infinity",
        "overflow",
        "minus-overflow",
        "uint64-max+1",
        "int64-min-1",
        "5000-digits",
        "depth-101",
        "objects-101",
        "depth-2500",
        "depth-100000",
        "lone-high-surrogate",
        "lone-low-surrogate-key",
        "top-level-surrogate",
        "utf8-surrogate",
        "form-surrogate",
        "invalid-utf8",
    ],
)
def test_bodies_json_cannot_carry_are_malformed(body: bytes) -> None:
    form = "application/x-www-form-urlencoded" if body.startswith(b"payload=") else None
    with pytest.raises(EventRejected) as info:
        route({"kind": "none"}).events({}, body, form)
    assert info.value.reason == "malformed"


@pytest.mark.parametrize(
    ("body", "payload"),
    [
        (
            json.dumps([2**64 - 1, 2**63 - 1, -(2**63), 1.5e308, -1e-400]).encode(),
            {"data": [2**64 - 1, 2**63 - 1, -(2**63), 1.5e308, -0.0]},
        ),
        (nested(MAX_JSON_DEPTH), {"data": json.loads(nested(MAX_JSON_DEPTH))}),
        (b'["\\ud83d\\ude00", "\xc3\xa9"]', {"data": ["\U0001f600", "é"]}),
        (b"\xef\xbb\xbf{}", {}),
        (b'{"id": "1234567890123456789012345"}', {"id": "1234567890123456789012345"}),
    ],
    ids=["64-bit-and-double-bounds", "depth-100", "surrogate-pair-and-utf8", "bom", "long-digits-in-a-string"],
)
def test_bodies_at_the_bounds_are_accepted(body: bytes, payload: Any) -> None:
    [event, _] = route({"kind": "none"}).events({}, body).events
    assert event.payload == payload


def test_an_integer_a_filter_cannot_read_is_malformed_not_a_crash() -> None:
    """CEL's int is signed 64-bit; the bridge takes unsigned 64-bit integers too."""
    r = compile_webhooks(
        parse(
            {
                "project": "hooks",
                "webhooks": [
                    {"slug": "hook", "verify": {"kind": "none"}, "events": [{"name": "f", "filter": "payload.n > 1"}]}
                ],
                "workflows": [{"id": "w", "workflow_type": "W", "triggers": [{"name": "*"}]}],
            }
        ).config.webhooks
    )["hook"]
    assert [e.name for e in r.events({}, json.dumps({"n": 2**63 - 1}).encode()).events] == ["f"]
    with pytest.raises(EventRejected, match="the filter cannot read the body") as info:
        r.events({}, json.dumps({"n": 2**63}).encode())
    assert info.value.reason == "malformed"


def test_form_payload_is_held_to_the_same_bounds() -> None:
    with pytest.raises(EventRejected) as info:
        route({"kind": "none"}).events({}, b"payload=%5BNaN%5D", "application/x-www-form-urlencoded")
    assert info.value.reason == "malformed"


# --- kept headers --------------------------------------------------------------------------


def test_kept_headers_are_capped_in_count_and_length() -> None:
    headers = {f"x-h{i:03}": "v" for i in range(MAX_KEPT_HEADERS + 10)}
    headers = {"x-long": "v" * (MAX_KEPT_VALUE + 1), "x-edge": "v" * MAX_KEPT_VALUE, **headers}
    [event, _] = route({"kind": "none"}).events(headers, b"{}").events
    kept = event.metadata["headers"]
    assert len(kept) == MAX_KEPT_HEADERS
    assert "x-long" not in kept and kept["x-edge"] == "v" * MAX_KEPT_VALUE
    assert list(kept)[:3] == ["x-edge", "x-h000", "x-h001"]
