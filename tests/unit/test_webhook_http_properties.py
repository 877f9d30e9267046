"""Webhook deliveries nobody thought of, through the app (issue 9, items 9 and 11): hypothesis
sends any slug, headers and body, signed or not, to ``POST /api/v1/hooks/{slug}``; the answer is
never a 5xx. The edges it is most likely to miss are also sent by hand: each is answered with its
reason, logged and counted.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar import Litestar
from litestar.testing import AsyncTestClient

from bridge.config import BridgeConfig, parse_config
from bridge.errors import HTTP_STATUS
from bridge.webhooks import WebhookRoute
from tests.fakes import FakeSink
from tests.unit.http_support import AUTH, HOOKS, make_app
from tests.unit.test_webhook_properties import (
    ENTRIES,
    SLUGS,
    bodies,
    content_types,
    headers_for,
    on_the_wire,
    signed,
)
from tests.unit.test_webhook_properties import HOOKS as KIND_HOOKS

ANSWERS = {200, 202, 400, 401, 404, 413, 422, 429}
ENTRY_NAMES = [e["name"] for e in ENTRIES]
TRANSPORT_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "expect", "upgrade"}
EXAMPLES = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def config() -> BridgeConfig:
    return parse_config(
        {
            "project": "shop",
            "http": {"max_body_bytes": 16 * 1024, "auth": {"tokens": ["t0k-3n"]}},
            "webhooks": [
                *({**hook, "events": ENTRIES} for hook in KIND_HOOKS),
                {"slug": "typo", "verify": {"kind": "none"}, "events": [{"name": "nobody.listens"}]},
                {"slug": "typed", "verify": {"kind": "none"}, "events": [{"name": "order.created"}]},
            ],
            "workflows": [
                {
                    "id": "hooks",
                    "workflow_type": "Hooks",
                    "triggers": [{"name": n} for n in ("all", "filtered", "shaped")],
                },
                {
                    "id": "orders",
                    "workflow_type": "Orders",
                    "triggers": [{"name": "order.created", "schema": {"type": "object", "required": ["orderId"]}}],
                },
            ],
        },
        origin="test",
    )


@pytest.fixture(scope="module")
async def client() -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(make_app(FakeSink(), config())) as c:
        yield c


def wire(headers: dict[str, str]) -> dict[bytes, bytes]:
    """Headers as a client would put them on the wire: no line breaks or NULs."""
    out = {}
    for name, value in headers.items():
        if name in TRANSPORT_HEADERS:
            continue
        out[name.encode()] = on_the_wire("".join(c for c in value if c not in "\r\n\x00"))
    return out


slugs = st.sampled_from([*SLUGS, "typo", "typed", "?"]).flatmap(  # "?": any text, most often no webhook
    lambda slug: st.text(min_size=1, max_size=12) if slug == "?" else st.just(slug)
)


@EXAMPLES
@given(data=st.data(), slug=slugs, body=bodies, content_type=content_types, sign=st.booleans())
async def test_no_request_to_a_webhook_is_answered_with_a_server_error(
    client: AsyncTestClient[Litestar],
    data: st.DataObject,
    slug: str,
    body: bytes,
    content_type: str | None,
    sign: bool,
) -> None:
    headers = data.draw(headers_for(slug if slug in SLUGS else "none"), label="headers")
    if content_type is not None:
        headers["content-type"] = content_type
    if sign and slug in SLUGS:
        headers = signed(slug, body, headers, t=int(time.time()))
    resp = await client.post(f"{HOOKS}/{quote(slug, safe='')}", content=body, headers=wire(headers))
    assert resp.status_code in ANSWERS, resp.text
    answer = resp.json()
    if resp.status_code == 429:  # the examples share one client: its copies of one delivery are counted
        assert answer["error"] == "rate_limited" and "copies sent nothing new" in answer["message"], answer
    if resp.status_code != 404:  # a slug with a "/" is no route: litestar's own 404 answers it
        assert answer.get("error") in HTTP_STATUS or answer["status"] in ("accepted", "ignored", "rejected", "partial")


# --- by hand: the answer, the log line and the count --------------------------------------


async def rejected(client: AsyncTestClient[Litestar], reason: str) -> float:
    text = (await client.get("/metrics", headers=AUTH)).text
    label = f'signal_bridge_events_rejected_total{{adapter="webhook",reason="{reason}"}} '
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(label)), 0.0)


HUGE = "9" * 400
NOW = int(time.time())


def stripe(t: str) -> dict[str, str]:
    return {"stripe-signature": f"t={t},v1={'0' * 64}"}


def sw(t: str) -> dict[str, str]:
    return {"webhook-id": "msg_1", "webhook-timestamp": t, "webhook-signature": "v1," + "A" * 44}


UNAUTHORIZED = {
    "stripe-400-digit-t": ("stripe", stripe(HUGE), b"{}"),
    "stripe-16-digit-t": ("stripe", stripe("1" * 16), b"{}"),
    "stripe-non-ascii-t": ("stripe", stripe("\u00b2"), b"{}"),
    "stripe-from-the-future": ("stripe", signed("stripe", b"{}", {}, t=NOW + 3600), b"{}"),
    "sw-400-digit-timestamp": ("sw", sw(HUGE), b"{}"),
    "sw-negative-timestamp": ("sw", sw("-1"), b"{}"),
    "sw-stale": ("sw", signed("sw", b"{}", {}, t=NOW - 3600), b"{}"),
    "github-non-ascii-signature": ("github", {"x-hub-signature-256": "sha256=\u00e9" * 8}, b"{}"),
}


@pytest.mark.parametrize(("slug", "headers", "body"), UNAUTHORIZED.values(), ids=UNAUTHORIZED.keys())
async def test_unreadable_or_out_of_window_signatures_are_401_logged_and_counted(
    client: AsyncTestClient[Litestar],
    caplog: pytest.LogCaptureFixture,
    slug: str,
    headers: dict[str, str],
    body: bytes,
) -> None:
    before = await rejected(client, "unauthorized")
    resp = await client.post(f"{HOOKS}/{slug}", content=body, headers=wire(headers))
    assert (resp.status_code, resp.json()["error"]) == (401, "unauthorized")
    assert await rejected(client, "unauthorized") == before + 1
    [line] = [r.getMessage() for r in caplog.records if r.name == "adapters.http.webhooks"]
    assert line.startswith(f"webhook refused slug={slug} kind=")
    assert HUGE not in line and "\n" not in line  # the sender's value is cut and escaped


MALFORMED = {
    "deep": b"[" * 3000 + b"]" * 3000,
    "nan": b'{"a": NaN}',
    "huge-integer": b'{"a": ' + b"7" * 5000 + b"}",
    "65-bit-integer": b'{"a": 36893488147419103232}',
    "lone-surrogate-id": b'{"id": "evt_\\ud800"}',
    "invalid-utf8": b'{"a": "\xff"}',
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
@pytest.mark.parametrize("slug", ["github", "stripe", "none"])
async def test_signed_bodies_json_cannot_carry_are_400_logged_and_counted(
    client: AsyncTestClient[Litestar], caplog: pytest.LogCaptureFixture, slug: str, body: bytes
) -> None:
    before = await rejected(client, "malformed")
    resp = await client.post(f"{HOOKS}/{slug}", content=body, headers=wire(signed(slug, body, {}, t=int(time.time()))))
    assert (resp.status_code, resp.json()["error"]) == (400, "malformed"), resp.text
    assert await rejected(client, "malformed") == before + 1
    assert any("reason=malformed" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


async def test_a_replayed_github_delivery_starts_nothing_new(client: AsyncTestClient[Litestar]) -> None:
    body = b'{"a": 2, "replayed": true}'
    captured = signed("github", body, {"x-github-delivery": "72d3162e", "x-kind": "k"})
    answers: list[Any] = []
    for guid in ("72d3162e", "forged-1", "forged-2"):
        resp = await client.post(f"{HOOKS}/github", content=body, headers=wire({**captured, "x-github-delivery": guid}))
        assert resp.status_code == 202, resp.text
        answers.append(resp.json())
    assert answers[0] == answers[1] == answers[2]
    assert [r["event_id"].split(":")[0] for r in answers[0]["results"]] == ["sha256"] * 3


async def test_a_parser_bug_is_a_logged_400_not_a_500(
    client: AsyncTestClient[Litestar], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever ``events`` raises besides EventRejected is caught at the adapter's edge: logged with
    its traceback, counted as malformed, answered 400."""

    def broken(*_: object, **__: object) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(WebhookRoute, "events", broken)
    before = await rejected(client, "malformed")
    # A body no other test of this module's client sent: a copy of one answered before is answered
    # as it was, before the body is read (the property test above may well have sent "{}").
    resp = await client.post(f"{HOOKS}/none", content=json.dumps({"parser-bug": uuid.uuid4().hex}).encode())
    assert (resp.status_code, resp.json()["error"]) == (400, "malformed")
    assert "Recursion" not in resp.text
    assert await rejected(client, "malformed") == before + 1
    [bug] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert bug.exc_info is not None and bug.exc_info[0] is RecursionError


async def test_a_verifier_bug_lets_nothing_in(
    client: AsyncTestClient[Litestar], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object, **__: object) -> None:
        raise OverflowError("int too large to convert to float")

    monkeypatch.setattr(WebhookRoute, "verify", broken)
    resp = await client.post(f"{HOOKS}/github", content=b"{}")
    assert (resp.status_code, resp.json()["error"]) == (401, "unauthorized")
    [bug] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert bug.exc_info is not None and bug.exc_info[0] is OverflowError
