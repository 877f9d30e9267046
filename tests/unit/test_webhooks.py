"""Webhook verification, delivery ids, header filtering, entry selection and config checks.

Each verification kind is checked against the provider's own published material where there is
some: GitHub's documented example, the Standard Webhooks reference library's vector, RFC 4231 /
RFC 2202 for the generic HMAC, and for Stripe (which publishes no fixed vector) the scheme and
fixtures of Stripe's own library tests (stripe-python ``tests/test_webhook.py``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any
from urllib.parse import quote

import pytest

from bridge.errors import ConfigError, EventRejected
from bridge.signatures import (
    MAX_SIGNATURES,
    HmacVerify,
    SignatureInvalid,
    StandardWebhooksVerify,
    StripeVerify,
    build_verifier,
    github,
)
from bridge.snapshot import parse
from bridge.webhooks import WebhookRoute, compile_webhooks, kept_headers


def config_with(*webhooks: dict[str, Any]) -> Any:
    """A config through the whole load, so compile-time errors surface here."""
    return parse(
        {
            "project": "hooks",
            "webhooks": list(webhooks),
            "workflows": [{"id": "w", "workflow_type": "W", "triggers": [{"name": "*"}]}],
        },
        origin="test.yaml",
    ).config


def route(verify: dict[str, Any], events: list[dict[str, Any]] | None = None, **extra: Any) -> WebhookRoute:
    cfg = config_with({"slug": "hook", "verify": verify, "events": events or [{"name": "any"}], **extra})
    return compile_webhooks(cfg.webhooks, origin="test.yaml")["hook"]


# --- github --------------------------------------------------------------------------------

# docs.github.com, "Validating webhook deliveries", "Testing the webhook payload validation".
GH_SECRET = "It's a Secret to Everybody"
GH_BODY = b"Hello, World!"
GH_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def gh(signature: str | None = GH_SIGNATURE) -> dict[str, str]:
    return {} if signature is None else {"x-hub-signature-256": signature}


def test_github_published_vector_verifies() -> None:
    github([GH_SECRET]).verify(gh(), GH_BODY, 0)
    assert github([GH_SECRET]).sign(GH_BODY) == GH_SIGNATURE


def test_github_upper_case_hex_verifies() -> None:
    github([GH_SECRET]).verify(gh("sha256=" + GH_SIGNATURE.removeprefix("sha256=").upper()), GH_BODY, 0)


@pytest.mark.parametrize(
    ("secrets", "headers", "body"),
    [
        ([GH_SECRET], gh(), b"Hello, World?"),
        (["It's a Secret to Nobody"], gh(), GH_BODY),
        ([GH_SECRET], gh(None), GH_BODY),
        ([GH_SECRET], gh(""), GH_BODY),
        ([GH_SECRET], gh(GH_SIGNATURE.removeprefix("sha256=")), GH_BODY),
        ([GH_SECRET], gh("sha1=" + hmac.new(GH_SECRET.encode(), GH_BODY, "sha1").hexdigest()), GH_BODY),
        (
            [GH_SECRET],
            {"x-hub-signature": "sha1=" + hmac.new(GH_SECRET.encode(), GH_BODY, "sha1").hexdigest()},
            GH_BODY,
        ),
        ([GH_SECRET], gh("sha256=é" + GH_SIGNATURE[8:]), GH_BODY),
    ],
    ids=[
        "tampered-body",
        "wrong-secret",
        "missing-header",
        "empty-header",
        "no-prefix",
        "sha1-in-256",
        "sha1-only",
        "non-ascii",
    ],
)
def test_github_refuses(secrets: list[str], headers: dict[str, str], body: bytes) -> None:
    with pytest.raises(SignatureInvalid):
        github(secrets).verify(headers, body, 0)


def test_github_rotated_secret_either_verifies() -> None:
    verifier = github(["new-secret", GH_SECRET])
    verifier.verify(gh(), GH_BODY, 0)
    verifier.verify(gh(github(["new-secret"]).sign(GH_BODY)), GH_BODY, 0)


def test_github_signs_no_timestamp_so_age_does_not_matter() -> None:
    """GitHub has no timestamp to be stale; a replay starts nothing because its body names it."""
    github([GH_SECRET]).verify(gh(), GH_BODY, 4_000_000_000)


# --- stripe --------------------------------------------------------------------------------

# stripe-python tests/test_webhook.py: DUMMY_WEBHOOK_SECRET and DUMMY_WEBHOOK_PAYLOAD.
ST_SECRET = "whsec_test_secret"
ST_BODY = b"""{
  "id": "evt_test_webhook",
  "object": "event",
  "data": { "object": { "id": "rdr_123", "object": "terminal.reader" } }
}"""
ST_T = 1_700_000_000


def stripe_sig(body: bytes = ST_BODY, t: int = ST_T, secret: str = ST_SECRET) -> str:
    """Stripe's documented scheme, written out independently of the code under test:
    v1 = hex(HMAC-SHA256(key=secret as UTF-8, msg=f"{t}.{body}"))."""
    return hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


def st(header: str | None) -> dict[str, str]:
    return {} if header is None else {"stripe-signature": header}


def test_stripe_scheme_pinned() -> None:
    # The whsec_ secret is the key as it is, not base64-decoded (unlike Standard Webhooks).
    pinned = "3bfab77baf5f7b6991a46c9b53b6547d7afc56148b10468fcad9f35c1992ffbd"
    assert stripe_sig() == pinned
    assert StripeVerify([ST_SECRET]).sign(ST_BODY, ST_T) == pinned


def test_stripe_valid() -> None:
    StripeVerify([ST_SECRET]).verify(st(f"t={ST_T},v1={stripe_sig()}"), ST_BODY, ST_T)


def test_stripe_several_v1_one_valid_verifies() -> None:
    # stripe-python test_header_contains_valid_signature; plus a v0 entry, which is ignored.
    header = f"t={ST_T},v1=bad_signature,v1={stripe_sig()},v0=6ffbb59b2300aade63f272c7d9f4a8b2"
    StripeVerify([ST_SECRET]).verify(st(header), ST_BODY, ST_T)


def test_stripe_within_tolerance_verifies() -> None:
    StripeVerify([ST_SECRET], tolerance=300).verify(st(f"t={ST_T},v1={stripe_sig()}"), ST_BODY, ST_T + 300)


@pytest.mark.parametrize(
    ("header", "body", "now"),
    [
        (f"t={ST_T},v1={stripe_sig()}", ST_BODY + b" ", ST_T),
        (f"t={ST_T},v1={stripe_sig(secret='whsec_other')}", ST_BODY, ST_T),
        (None, ST_BODY, ST_T),
        ("bad_header", ST_BODY, ST_T),
        (f"t={ST_T},v0={stripe_sig()}", ST_BODY, ST_T),
        (f"v1={stripe_sig()}", ST_BODY, ST_T),
        (f"t=soon,v1={stripe_sig()}", ST_BODY, ST_T),
        (f"t={ST_T},t={ST_T},v1={stripe_sig()}", ST_BODY, ST_T),
        (f"t={ST_T},v1={stripe_sig()}", ST_BODY, ST_T + 301),
        (f"t={ST_T},v1={stripe_sig()}", ST_BODY, ST_T - 301),
        (f"t={ST_T + 1},v1={stripe_sig()}", ST_BODY, ST_T),
    ],
    ids=[
        "tampered-body",
        "wrong-secret",
        "missing-header",
        "malformed-header",
        "v0-only",
        "no-timestamp",
        "bad-timestamp",
        "two-timestamps",
        "stale",
        "from-the-future",
        "timestamp-not-the-signed-one",
    ],
)
def test_stripe_refuses(header: str | None, body: bytes, now: int) -> None:
    with pytest.raises(SignatureInvalid):
        StripeVerify([ST_SECRET], tolerance=300).verify(st(header), body, now)


def test_stripe_tolerance_is_configurable() -> None:
    # stripe-python test_raise_on_timestamp_outside_tolerance: tolerance 10, 15 s old.
    header = st(f"t={ST_T - 15},v1={stripe_sig(t=ST_T - 15)}")
    with pytest.raises(SignatureInvalid):
        StripeVerify([ST_SECRET], tolerance=10).verify(header, ST_BODY, ST_T)
    StripeVerify([ST_SECRET], tolerance=20).verify(header, ST_BODY, ST_T)


def test_stripe_rotated_secret_either_verifies() -> None:
    verifier = StripeVerify(["whsec_new", ST_SECRET])
    verifier.verify(st(f"t={ST_T},v1={stripe_sig()}"), ST_BODY, ST_T)
    verifier.verify(st(f"t={ST_T},v1={stripe_sig(secret='whsec_new')}"), ST_BODY, ST_T)


def test_stripe_signed_id_is_the_event_id() -> None:
    assert StripeVerify([ST_SECRET]).signed_id({}, json.loads(ST_BODY)) == "evt_test_webhook"
    assert StripeVerify([ST_SECRET]).signed_id({}, {"object": "event"}) is None
    assert StripeVerify([ST_SECRET]).announced_id({"x-github-delivery": "d"}) is None


# --- standard webhooks ---------------------------------------------------------------------

# standard-webhooks/standard-webhooks libraries/python/tests/test_webhooks.py, test_sign_function.
SW_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SW_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SW_T = 1614265330
SW_BODY = b'{"test": 2432232314}'
SW_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def sw(signature: str | None = SW_SIGNATURE, msg_id: str | None = SW_ID, ts: str | None = str(SW_T)) -> dict[str, str]:
    headers = {"webhook-id": msg_id, "webhook-timestamp": ts, "webhook-signature": signature}
    return {k: v for k, v in headers.items() if v is not None}


def sw_sig(body: bytes = SW_BODY, msg_id: str = SW_ID, t: int = SW_T, secret: str = SW_SECRET) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    return "v1," + base64.b64encode(hmac.new(key, f"{msg_id}.{t}.".encode() + body, hashlib.sha256).digest()).decode()


def test_standard_webhooks_published_vector() -> None:
    verifier = StandardWebhooksVerify([SW_SECRET])
    assert verifier.sign(SW_BODY, SW_ID, SW_T) == SW_SIGNATURE
    verifier.verify(sw(), SW_BODY, SW_T)


def test_standard_webhooks_secret_with_or_without_prefix() -> None:
    StandardWebhooksVerify([SW_SECRET.removeprefix("whsec_")]).verify(sw(), SW_BODY, SW_T)


def test_standard_webhooks_multi_signature_header() -> None:
    # The reference library's test_multi_sig_payload_is_valid.
    sigs = [
        "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
        "v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
        SW_SIGNATURE,
        "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
    ]
    StandardWebhooksVerify([SW_SECRET]).verify(sw(" ".join(sigs)), SW_BODY, SW_T)


def test_standard_webhooks_svix_headers() -> None:
    headers = {"svix-id": SW_ID, "svix-timestamp": str(SW_T), "svix-signature": SW_SIGNATURE}
    StandardWebhooksVerify([SW_SECRET]).verify(headers, SW_BODY, SW_T)
    assert StandardWebhooksVerify([SW_SECRET]).signed_id(headers, {}) == SW_ID


@pytest.mark.parametrize(
    ("headers", "body", "now"),
    [
        (sw(), SW_BODY + b" ", SW_T),
        (sw(sw_sig(secret="whsec_" + base64.b64encode(b"another secret of 24 bytes").decode())), SW_BODY, SW_T),
        (sw("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA="), SW_BODY, SW_T),
        (sw(None), SW_BODY, SW_T),
        (sw(msg_id=None), SW_BODY, SW_T),
        (sw(ts=None), SW_BODY, SW_T),
        (sw(ts="hello"), SW_BODY, SW_T),
        (sw(msg_id="msg_other"), SW_BODY, SW_T),
        (sw(SW_SIGNATURE.replace("v1,", "v2,")), SW_BODY, SW_T),
        (sw(SW_SIGNATURE.removeprefix("v1,")), SW_BODY, SW_T),
        (sw(), SW_BODY, SW_T + 301),
        (sw(), SW_BODY, SW_T - 301),
    ],
    ids=[
        "tampered-body",
        "wrong-secret",
        "invalid-signature",
        "missing-signature",
        "missing-id",
        "missing-timestamp",
        "invalid-timestamp",
        "other-id",
        "unknown-version",
        "no-version",
        "stale",
        "from-the-future",
    ],
)
def test_standard_webhooks_refuses(headers: dict[str, str], body: bytes, now: int) -> None:
    with pytest.raises(SignatureInvalid):
        StandardWebhooksVerify([SW_SECRET], tolerance=300).verify(headers, body, now)


def test_standard_webhooks_rotated_secret_either_verifies() -> None:
    new = "whsec_" + base64.b64encode(b"a brand new secret, 32 bytes long").decode()
    verifier = StandardWebhooksVerify([new, SW_SECRET])
    verifier.verify(sw(), SW_BODY, SW_T)
    verifier.verify(sw(sw_sig(secret=new)), SW_BODY, SW_T)


def test_standard_webhooks_bad_secret_is_a_config_error_naming_the_webhook() -> None:
    with pytest.raises(ConfigError, match=r"test.yaml: webhook 'hook', verify: .*base64"):
        route({"kind": "standard-webhooks", "secret": "whsec_not base64!"})


# --- generic hmac --------------------------------------------------------------------------

# RFC 4231 test case 1 (SHA-256, SHA-512) and RFC 2202 test case 1 (SHA-1): a 20-byte key.
# (Test case 2's key, "Jefe", is shorter than a webhook secret may be.)
RFC_KEY = "\x0b" * 20
RFC_DATA = b"Hi There"
RFC_MAC = {
    "sha256": "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
    "sha512": "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cde"
    "daa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854",
    "sha1": "b617318655057264e28bc0b6fb378c8ef146be00",
}
SK = "a-webhook-secret-of-some-length"  # long enough to sign with


@pytest.mark.parametrize("algorithm", ["sha256", "sha512", "sha1"])
def test_hmac_rfc_vectors_hex(algorithm: str) -> None:
    r = route({"kind": "hmac", "secret": RFC_KEY, "algorithm": algorithm})
    r.verify({"x-signature": RFC_MAC[algorithm]}, RFC_DATA, 0)


def test_hmac_base64_prefix_and_header() -> None:
    mac = base64.b64encode(bytes.fromhex(RFC_MAC["sha256"])).decode()
    r = route({"kind": "hmac", "secret": RFC_KEY, "encoding": "base64", "header": "X-Shopify-Hmac-Sha256"})
    r.verify({"x-shopify-hmac-sha256": mac}, RFC_DATA, 0)
    with pytest.raises(SignatureInvalid):  # base64 is case-sensitive
        r.verify({"x-shopify-hmac-sha256": mac.swapcase()}, RFC_DATA, 0)
    r = route({"kind": "hmac", "secret": RFC_KEY, "prefix": "sha256=", "header": "X-Sig"})
    r.verify({"x-sig": "sha256=" + RFC_MAC["sha256"]}, RFC_DATA, 0)


@pytest.mark.parametrize(
    ("secret", "headers", "body"),
    [
        (RFC_KEY, {"x-signature": RFC_MAC["sha256"]}, RFC_DATA + b"!"),
        ("\x0c" * 20, {"x-signature": RFC_MAC["sha256"]}, RFC_DATA),
        (RFC_KEY, {}, RFC_DATA),
        (RFC_KEY, {"x-other": RFC_MAC["sha256"]}, RFC_DATA),
        (RFC_KEY, {"x-signature": RFC_MAC["sha512"]}, RFC_DATA),
        (RFC_KEY, {"x-signature": RFC_MAC["sha256"][:-2]}, RFC_DATA),
    ],
    ids=["tampered-body", "wrong-secret", "missing-header", "other-header", "other-algorithm", "truncated"],
)
def test_hmac_refuses(secret: str, headers: dict[str, str], body: bytes) -> None:
    with pytest.raises(SignatureInvalid):
        route({"kind": "hmac", "secret": secret}).verify(headers, body, 0)


def test_hmac_rotated_secret_either_verifies() -> None:
    r = route({"kind": "hmac", "secrets": [SK, RFC_KEY]})
    r.verify({"x-signature": RFC_MAC["sha256"]}, RFC_DATA, 0)
    r.verify({"x-signature": hmac.new(SK.encode(), RFC_DATA, "sha256").hexdigest()}, RFC_DATA, 0)


@pytest.mark.parametrize(
    "verify",
    [
        {"kind": "github", "secret": "short"},
        {"kind": "hmac", "secrets": [SK, "x" * 15]},
        {"kind": "stripe", "secret": "whsec_"},
        {"kind": "standard-webhooks", "secret": "whsec_"},  # as from whsec_${UNSET:-}: an empty key
        {"kind": "standard-webhooks", "secret": "whsec_c2hvcnQ="},  # base64 of "short"
    ],
    ids=["github", "hmac-rotation", "stripe-prefix-only", "standard-empty", "standard-short"],
)
def test_empty_or_short_keys_are_refused_at_load(verify: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"webhook 'hook', verify: .*too short to sign with; use at least 16"):
        route(verify)


def test_empty_secrets_are_dropped_never_used_as_keys() -> None:
    r = route({"kind": "hmac", "secret": "", "secrets": [RFC_KEY, ""]})
    r.verify({"x-signature": RFC_MAC["sha256"]}, RFC_DATA, 0)
    with pytest.raises(SignatureInvalid):
        r.verify({"x-signature": hmac.new(b"", RFC_DATA, "sha256").hexdigest()}, RFC_DATA, 0)


def test_hmac_secret_and_secrets_both_count() -> None:
    r = route({"kind": "hmac", "secret": "new-key-0123456789abcdef", "secrets": [RFC_KEY]})
    r.verify({"x-signature": RFC_MAC["sha256"]}, RFC_DATA, 0)


def test_none_verifies_anything_and_must_be_explicit() -> None:
    route({"kind": "none"}).verify({}, b"anything", 0)
    with pytest.raises(ConfigError, match=r"webhook 'hook'.*verify.*(kind|Field required)"):
        config_with({"slug": "hook", "verify": {}, "events": [{"name": "a"}]})
    with pytest.raises(ConfigError, match=r"webhook 'hook'.*verify.*Field required"):
        config_with({"slug": "hook", "events": [{"name": "a"}]})


# --- config checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hook", "message"),
    [
        (
            {"verify": {"kind": "none"}, "events": [{"name": "gh.push", "filter": "metadata.headers["}]},
            r"test.yaml: webhook 'hook', event 'gh.push': filter .* does not compile",
        ),
        (
            {"verify": {"kind": "none"}, "events": [{"name": "gh.push", "input": {"ref": "{{ .payload.ref "}}]},
            r"test.yaml: webhook 'hook', event 'gh.push': template .* does not parse",
        ),
        (
            {"verify": {"kind": "none"}, "events": [{"name": "a"}, {"name": "a", "filter": "true"}]},
            r"webhook 'hook', event 'a': declared twice",
        ),
        (
            {"verify": {"kind": "github"}, "events": [{"name": "a"}]},
            r"webhook 'hook', verify: .*needs a non-empty secret",
        ),
        (
            {"verify": {"kind": "none", "secret": SK}, "events": [{"name": "a"}]},
            r"webhook 'hook', verify: .*'none'",
        ),
        ({"verify": {"kind": "github", "secrets": ["", ""]}, "events": [{"name": "a"}]}, r"non-empty secret"),
        (
            {"verify": {"kind": "github", "secret": SK, "header": "X"}, "events": [{"name": "a"}]},
            r"'hmac' only",
        ),
        (
            {"verify": {"kind": "stripe", "secret": SK, "tolerance_seconds": 0}, "events": [{"name": "a"}]},
            r"tolera",
        ),
        (
            {"verify": {"kind": "hmac", "secret": SK, "algorithm": "md5"}, "events": [{"name": "a"}]},
            r"algorithm",
        ),
        ({"verify": {"kind": "webhook"}, "events": [{"name": "a"}]}, r"webhook 'hook', verify, kind"),
        ({"verify": {"kind": "none"}, "events": []}, r"webhook 'hook', events"),
        ({"verify": {"kind": "none"}, "events": [{"name": "a"}], "id_from": "body"}, r"id_from"),
        ({"verify": {"kind": "none"}, "events": [{"name": "a"}], "rate_limit": {"rate": 0}}, r"rate_limit"),
        ({"verify": {"kind": "none"}, "events": [{"name": "a", "filtr": "x"}]}, r"event 'a', filtr: unknown key"),
    ],
)
def test_config_errors_name_the_webhook_and_event(hook: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_with({"slug": "hook", **hook})


@pytest.mark.parametrize("slug", ["a/b", "", "-x", "a b", "é"])
def test_slug_must_be_a_url_segment(slug: str) -> None:
    with pytest.raises(ConfigError, match="slug"):
        config_with({"slug": slug, "verify": {"kind": "none"}, "events": [{"name": "a"}]})


def test_duplicate_slug_is_an_error() -> None:
    hook = {"slug": "gh", "verify": {"kind": "none"}, "events": [{"name": "a"}]}
    with pytest.raises(ConfigError, match="webhook slug 'gh' is declared twice"):
        config_with(hook, hook)


def test_build_verifier_kinds() -> None:
    cfg = config_with(
        {"slug": "a", "verify": {"kind": "github", "secret": SK}, "events": [{"name": "x"}]},
        {
            "slug": "b",
            "verify": {"kind": "stripe", "secret": SK, "tolerance_seconds": 60},
            "events": [{"name": "x"}],
        },
        {"slug": "c", "verify": {"kind": "hmac", "secret": SK}, "events": [{"name": "x"}]},
    )
    a, b, c = (build_verifier(w.verify) for w in cfg.webhooks)
    assert a.kind == "github" and b.kind == "stripe" and c.kind == "hmac"
    assert isinstance(b, StripeVerify) and b.tolerance == 60
    assert isinstance(c, HmacVerify) and c.header == "x-signature"


# --- metadata: headers without secrets -----------------------------------------------------


def test_kept_headers_drop_credentials_and_signatures() -> None:
    headers = {
        "Authorization": "Bearer t",
        "Cookie": "a=b",
        "X-Hub-Signature-256": "sha256=…",
        "X-Hub-Signature": "sha1=…",
        "Stripe-Signature": "t=1,v1=…",
        "webhook-signature": "v1,…",
        "X-Gitlab-Token": "secret",
        "X-Api-Key": "k",
        "X-Custom-Sig": "abc",
        # Gateways' own credential headers.
        "X-Authorization": "Bearer t",
        "Authentication": "t",
        "X-Auth": "t",
        "X-Functions-Key": "k",
        "Ocp-Apim-Subscription-Key": "k",
        "X-Access-Key": "k",
        "X-Shopify-Hmac-Sha256": "mac",
        "X-Amz-Security-Credential": "c",
        "X-Session": "s",
        "api_key": "k",
        "AccessKey": "k",
        "Key": "k",
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": "d-1",
        "X-Event-Key": "repo:push",  # Bitbucket's event name, which a filter may read
        "Idempotency-Key": "k-1",
        "Content-Type": "application/json",
    }
    assert kept_headers(headers, ["x-custom-sig"]) == {
        "x-github-event": "push",
        "x-github-delivery": "d-1",
        "x-event-key": "repo:push",
        "idempotency-key": "k-1",
        "content-type": "application/json",
    }


def test_event_metadata_has_no_configured_signature_header() -> None:
    r = route({"kind": "hmac", "secret": RFC_KEY, "header": "X-Proof"})
    delivery = r.events({"x-proof": RFC_MAC["sha256"], "x-kind": "k", "traceparent": "00-a-b-01"}, b"{}")
    [event] = delivery.events
    assert event.metadata["headers"] == {"x-kind": "k", "traceparent": "00-a-b-01"}
    assert event.metadata["traceparent"] == "00-a-b-01"
    assert event.metadata["webhook"] == {"slug": "hook", "delivery_id": delivery.delivery_id}


# --- delivery ids and event ids ------------------------------------------------------------


def test_github_delivery_id_is_the_body_digest_and_the_header_only_metadata() -> None:
    """X-GitHub-Delivery is not signed: it names nothing, or a replay with a new one would run."""
    r = route({"kind": "github", "secret": SK}, [{"name": "github.push"}])
    delivery = r.events({"x-github-delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958"}, b'{"ref": "main"}')
    digest = "sha256:" + hashlib.sha256(b'{"ref": "main"}').hexdigest()
    assert delivery.delivery_id == digest
    assert delivery.provider_delivery_id == "72d3162e-cc78-11e3-81ab-4c9367dc0958"
    [event] = delivery.events
    assert event.id == f"{digest}:github.push"
    assert event.metadata["webhook"] == {
        "slug": "hook",
        "delivery_id": digest,
        "provider_delivery_id": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
    }
    assert event.source == "webhook:hook"
    assert event.name == "github.push" and event.payload == {"ref": "main"}


def test_stripe_delivery_id_from_body() -> None:
    r = route({"kind": "stripe", "secret": ST_SECRET}, [{"name": "stripe.event"}])
    assert r.events({}, ST_BODY).events[0].id == "evt_test_webhook:stripe.event"


def test_standard_webhooks_delivery_id_from_header() -> None:
    r = route({"kind": "standard-webhooks", "secret": SW_SECRET}, [{"name": "sw"}])
    delivery = r.events(sw(), SW_BODY)
    assert (delivery.delivery_id, delivery.provider_delivery_id) == (SW_ID, SW_ID)


BODY_77 = b'{"meta": {"id": 77}}'


@pytest.mark.parametrize("kind", [{"kind": "none"}, {"kind": "hmac", "secret": SK}, {"kind": "github", "secret": SK}])
def test_id_from_header_is_metadata_only(kind: dict[str, Any]) -> None:
    r = route(kind, id_from="header:X-Request-Id")
    delivery = r.events({"x-request-id": "r-1"}, BODY_77)
    assert delivery.delivery_id == "sha256:" + hashlib.sha256(BODY_77).hexdigest()
    if kind["kind"] != "github":  # GitHub's own header is announced first
        assert delivery.provider_delivery_id == "r-1"
    assert r.events({"x-request-id": "r-2"}, BODY_77).delivery_id == delivery.delivery_id


def test_id_from_field_reads_the_signed_body() -> None:
    r = route({"kind": "hmac", "secret": SK}, id_from="field:meta.id")
    delivery = r.events({}, BODY_77)
    assert (delivery.delivery_id, delivery.provider_delivery_id) == ("77", None)


@pytest.mark.parametrize("body", [b'{"meta": {"id": {}}}', b'{"meta": {"id": true}}', b'{"meta": {"id": [7]}}'])
def test_an_id_from_field_that_is_no_string_or_integer_is_refused(body: bytes) -> None:
    """Two deliveries with ``{}`` there had one delivery id, and the second started nothing."""
    r = route({"kind": "hmac", "secret": SK}, id_from="field:meta.id")
    with pytest.raises(EventRejected, match="must be a string or an integer"):
        r.events({}, body)


def test_signed_provider_id_wins_over_id_from_and_id_from_field_over_the_digest() -> None:
    r = route({"kind": "stripe", "secret": ST_SECRET}, id_from="field:other")
    assert r.events({}, b'{"id": "evt_1", "other": "o"}').delivery_id == "evt_1"
    r = route({"kind": "github", "secret": SK}, id_from="field:id")
    delivery = r.events({"x-github-delivery": "gh-1"}, b'{"id": "body"}')
    assert (delivery.delivery_id, delivery.provider_delivery_id) == ("body", "gh-1")


def test_without_any_id_the_body_hash_is_the_id_and_stable() -> None:
    r = route({"kind": "none"}, id_from="field:missing")
    first = r.events({}, b'{"a": 1}').delivery_id
    assert first == "sha256:" + hashlib.sha256(b'{"a": 1}').hexdigest()
    assert r.events({"x-other": "header"}, b'{"a": 1}').delivery_id == first
    assert r.events({}, b'{"a": 2}').delivery_id != first


# --- selecting entries ---------------------------------------------------------------------

GH_ENTRIES = [
    {"name": "github.push", "filter": 'metadata.headers["x-github-event"] == "push"'},
    {"name": "github.main", "filter": 'payload.ref == "refs/heads/main"'},
    {"name": "github.pr", "filter": 'metadata.headers["x-github-event"] == "pull_request"'},
    {"name": "github.any"},
]


def gh_events(event: str, body: dict[str, Any]) -> list[Any]:
    r = route({"kind": "github", "secret": SK}, GH_ENTRIES)
    return r.events({"x-github-event": event, "x-github-delivery": "d-9"}, json.dumps(body).encode()).events


def test_every_matching_entry_yields_its_own_event_with_a_distinct_id() -> None:
    events = gh_events("push", {"ref": "refs/heads/main"})
    assert [e.name for e in events] == ["github.push", "github.main", "github.any"]
    digest = "sha256:" + hashlib.sha256(json.dumps({"ref": "refs/heads/main"}).encode()).hexdigest()
    assert [e.id for e in events] == [f"{digest}:github.push", f"{digest}:github.main", f"{digest}:github.any"]
    assert len({(e.source, e.id) for e in events}) == 3


def test_filters_select_entries() -> None:
    assert [e.name for e in gh_events("pull_request", {"ref": "refs/heads/dev"})] == ["github.pr", "github.any"]
    assert [e.name for e in gh_events("ping", {"zen": "Keep it logically awesome."})] == ["github.any"]


def test_filter_sees_name_source_and_id() -> None:
    r = route(
        {"kind": "none"},
        [{"name": "n", "filter": 'name == "n" && source == "webhook:hook" && id.endsWith(":n")'}],
    )
    assert len(r.events({}, b"{}").events) == 1


def test_no_entry_matches_gives_no_events() -> None:
    r = route({"kind": "none"}, [{"name": "only.push", "filter": 'metadata.headers["x-github-event"] == "push"'}])
    delivery = r.events({"x-github-event": "ping"}, b"{}")
    assert delivery.events == [] and delivery.delivery_id.startswith("sha256:")


def test_filter_that_fails_at_runtime_does_not_match() -> None:
    r = route({"kind": "none"}, [{"name": "n", "filter": "payload.missing.deeper > 1"}])
    assert r.events({}, b"{}").events == []


def test_input_template_renders_against_the_payload() -> None:
    entries = [
        {
            "name": "github.push",
            "input": {
                "ref": "{{ .payload.ref }}",
                "repo": "{{ .trigger.repository.full_name }}",
                "kind": "{{ .headers['x-github-event'] }}",
                "commits": "{{ .payload.commits }}",
                "id": "{{ .id }}",
            },
        }
    ]
    r = route({"kind": "none"}, entries)
    body = {"ref": "refs/heads/main", "repository": {"full_name": "o/r"}, "commits": [{"id": "c1"}]}
    [event] = r.events({"x-github-event": "push"}, json.dumps(body).encode()).events
    assert event.payload == {
        "ref": "refs/heads/main",
        "repo": "o/r",
        "kind": "push",
        "commits": [{"id": "c1"}],
        "id": event.id,
    }


def test_input_that_is_not_an_object_is_wrapped() -> None:
    r = route({"kind": "none"}, [{"name": "n", "input": "{{ .payload.items }}"}])
    assert r.events({}, b'{"items": [1, 2]}').events[0].payload == {"data": [1, 2]}


def test_input_that_fails_to_render_is_rejected() -> None:
    r = route({"kind": "none"}, [{"name": "n", "input": {"x": "{{ payload.a | int('x', 'y', 'z') }}"}}])
    with pytest.raises(EventRejected) as info:
        r.events({}, b'{"a": "1"}')
    assert info.value.reason == "input_failed"


def test_a_sender_cannot_hold_the_adapter_with_lists_under_loops_inside_each_other() -> None:
    """An entry's input loops over two of the body's lists, one inside the other: a body of two
    lists of 150,000 items would have held the HTTP adapter's event loop for hours. The rendering
    stops at the template step limit and the event is refused as ``input_failed``."""
    loops = "{% for a in .payload.xs %}{% for b in .payload.ys %}{{ a }}{{ b }}{% endfor %}{% endfor %}"
    r = route({"kind": "none"}, [{"name": "n", "input": {"pairs": loops}}])
    assert r.events({}, b'{"xs": [1, 2], "ys": [3]}').events[0].payload == {"pairs": "1323"}
    body = json.dumps({"xs": [0] * 150_000, "ys": [0] * 150_000}).encode()
    with pytest.raises(EventRejected, match="steps") as info:
        r.events({}, body)
    assert info.value.reason == "input_failed"


def test_body_that_is_not_an_object_is_wrapped() -> None:
    r = route({"kind": "none"})
    assert r.events({}, b"[1, 2]").events[0].payload == {"data": [1, 2]}


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b""])
def test_body_not_json_is_malformed(body: bytes) -> None:
    with pytest.raises(EventRejected) as info:
        route({"kind": "none"}).events({}, body)
    assert info.value.reason == "malformed"


def test_github_form_encoded_payload() -> None:
    r = route({"kind": "none"})
    body = b"payload=%7B%22ref%22%3A%22refs%2Fheads%2Fmain%22%7D"
    [event] = r.events({}, body, "application/x-www-form-urlencoded").events
    assert event.payload == {"ref": "refs/heads/main"}
    with pytest.raises(EventRejected):
        r.events({}, b"other=1", "application/x-www-form-urlencoded")


def test_an_unsigned_form_content_type_cannot_make_a_signed_json_body_mean_another_event() -> None:
    """A genuine JSON delivery holding a string its sender chose (a customer name) with
    ``payload=`` in it, replayed as ``application/x-www-form-urlencoded``: read as a form, the
    planted JSON became the payload and, for Stripe, a fresh event id. The signature covers only
    the bytes, so the bytes alone decide what they mean."""
    forged = json.dumps({"id": "evt_FORGED", "type": "payment_intent.succeeded"})
    planted = "a=b&payload=" + quote(forged, safe="") + "&x="
    body = json.dumps({"id": "evt_1REAL", "type": "customer.updated", "data": {"name": planted}}).encode()
    r = route({"kind": "none"})
    [event] = r.events({}, body, "application/json").events
    assert event.payload["id"] == "evt_1REAL"
    with pytest.raises(EventRejected) as info:
        r.events({}, body, "application/x-www-form-urlencoded")
    assert info.value.reason == "malformed"
    for shape in (b"payload=%7B%7D&payload=%7B%22a%22%3A1%7D", b"a=1&payload=%7B%7D"):
        with pytest.raises(EventRejected):
            r.events({}, shape, "application/x-www-form-urlencoded")


def test_a_signature_header_offers_at_most_eight_signatures() -> None:
    """Every entry was compared with every secret before an unsigned request was refused: a
    16 KiB header of 4,000 entries cost milliseconds each time. A provider sends two or three."""
    late = f"t={ST_T}," + ",".join(["v1=00"] * MAX_SIGNATURES) + f",v1={stripe_sig()}"
    with pytest.raises(SignatureInvalid):
        StripeVerify([ST_SECRET]).verify(st(late), ST_BODY, ST_T)
    within = f"t={ST_T}," + ",".join(["v1=00"] * (MAX_SIGNATURES - 1)) + f",v1={stripe_sig()}"
    StripeVerify([ST_SECRET]).verify(st(within), ST_BODY, ST_T)
