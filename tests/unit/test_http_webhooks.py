"""Webhooks (POST /api/v1/hooks/{slug}) against the shared in-memory sink: signatures, ids,
answers, limits, rate limits and reloads."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from adapters.http import create_app
from bridge.config import parse_config
from bridge.errors import Unavailable
from bridge.pipeline import Pipeline
from bridge.snapshot import Snapshot
from tests.fakes import FakeSink
from tests.unit.http_support import (
    AUTH,
    GH_SECRET,
    HOOKS,
    MAX_BODY,
    SLOW,
    ST_SECRET,
    SW_SECRET,
    URL,
    chunks,
    hook_config,
    in_loop_client,
    make_app,
    order,
)

GH_VECTOR_BODY = b"Hello, World!"
GH_VECTOR_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
UNAUTHORIZED = {"error": "unauthorized", "message": "the delivery's signature did not verify"}


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One item for each webhook body parsed from now on."""
    from bridge import webhooks

    count: list[int] = []
    parse_body = webhooks.parse_body
    monkeypatch.setattr(webhooks, "parse_body", lambda body, ct: (count.append(1), parse_body(body, ct))[1])
    return count


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    """The webhook repeat counts refill nothing meanwhile."""
    from bridge import webhooks

    monkeypatch.setattr(webhooks, "_now", lambda: 1000.0)


@pytest.fixture
async def hooks(sink: FakeSink) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(make_app(sink, hook_config())) as c:
        yield c


def github_delivery(
    body: dict[str, Any] | bytes, event: str = "push", delivery: str = "d-1", secret: str = GH_SECRET
) -> tuple[bytes, dict[str, str]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    signature = "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    headers = {
        "Content-Type": "application/json",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery,
        "X-Hub-Signature-256": signature,
        "User-Agent": "GitHub-Hookshot/abc",
    }
    return raw, headers


def stripe_delivery(body: dict[str, Any], *, age: int = 0, secret: str = ST_SECRET) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(body).encode()
    t = int(time.time()) - age
    sig = hmac.new(secret.encode(), f"{t}.".encode() + raw, hashlib.sha256).hexdigest()
    return raw, {"Content-Type": "application/json", "Stripe-Signature": f"t={t},v1={sig}"}


def sw_delivery(body: dict[str, Any], msg_id: str = "msg_1", *, age: int = 0) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(body).encode()
    t = int(time.time()) - age
    key = base64.b64decode(SW_SECRET.removeprefix("whsec_"))
    sig = base64.b64encode(hmac.new(key, f"{msg_id}.{t}.".encode() + raw, hashlib.sha256).digest()).decode()
    return raw, {"webhook-id": msg_id, "webhook-timestamp": str(t), "webhook-signature": f"v1,{sig}"}


def body_digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


PUSH = {"ref": "refs/heads/main", "repository": {"full_name": "octo/repo"}}
PAYMENT = {"id": "evt_1", "type": "payment_intent.succeeded", "data": {"object": {"amount": 2000}}}


async def test_signed_github_delivery_is_accepted(sink: FakeSink, hooks: AsyncTestClient[Litestar]) -> None:
    body, headers = github_delivery(PUSH)
    resp = await hooks.post(f"{HOOKS}/github", content=body, headers={**headers, "Authorization": "Bearer x"})
    assert resp.status_code == 202, resp.text
    answer = resp.json()
    digest = body_digest(body)
    assert (answer["status"], answer["delivery_id"]) == ("accepted", digest)
    assert [(r["event_id"], r["name"], r["status"]) for r in answer["results"]] == [
        (f"{digest}:github.push", "github.push", 202),
        (f"{digest}:github.main", "github.main", 202),
    ]
    push, main = sink.events
    assert (main.name, main.payload) == ("github.main", PUSH)
    assert (push.source, push.payload) == ("webhook:github", PUSH)
    assert push.metadata["headers"]["x-github-event"] == "push"
    assert push.metadata["headers"]["user-agent"] == "GitHub-Hookshot/abc"
    assert push.metadata["webhook"] == {"slug": "github", "delivery_id": digest, "provider_delivery_id": "d-1"}
    assert push.metadata["headers"]["x-github-delivery"] == "d-1"
    dumped = json.dumps(push.metadata)
    assert "x-hub-signature-256" not in dumped and "authorization" not in dumped


async def test_github_redelivery_carries_the_same_event_ids(sink: FakeSink) -> None:
    """A redelivery to another process (which has not seen it: one process answers a repeat as
    before, without sending it again) carries the same event ids, so the same run ids."""
    body, headers = github_delivery(PUSH, delivery="same")
    for _ in range(2):  # two processes
        async with AsyncTestClient(make_app(sink, hook_config())) as other_process:
            assert (await other_process.post(f"{HOOKS}/github", content=body, headers=headers)).status_code == 202
    digest = body_digest(body)
    assert [e.id for e in sink.events] == [f"{digest}:github.push", f"{digest}:github.main"] * 2
    first, again = sink.events[0], sink.events[2]
    assert (first.source, first.id) == (again.source, again.id)  # so each target's run id is the same too


async def test_github_replay_with_new_delivery_ids_carries_the_same_event_ids(
    sink: FakeSink, hooks: AsyncTestClient[Litestar]
) -> None:
    """One captured body and signature, resent with fresh X-GitHub-Delivery GUIDs (which GitHub
    does not sign): the same delivery, answered as when it was accepted, and not sent again."""
    body, headers = github_delivery(PUSH, delivery="captured")
    answers = []
    for guid in ("captured", "forged-1", "forged-2"):
        resp = await hooks.post(f"{HOOKS}/github", content=body, headers={**headers, "X-GitHub-Delivery": guid})
        assert resp.status_code == 202, resp.text
        answers.append(resp.json())
    assert answers[0] == answers[1] == answers[2]
    assert len(sink.events) == 2  # two entries, one event each: submitted once
    assert [e.metadata["webhook"]["provider_delivery_id"] for e in sink.events] == ["captured", "captured"]


async def test_rotated_github_secret_is_accepted(sink: FakeSink, hooks: AsyncTestClient[Litestar]) -> None:
    body, headers = github_delivery(PUSH, secret="the-rotated-secret")
    assert (await hooks.post(f"{HOOKS}/github", content=body, headers=headers)).status_code == 202


async def test_signature_is_checked_before_the_body_is_parsed(sink: FakeSink, hooks: AsyncTestClient[Litestar]) -> None:
    """GitHub's published vector signs a body that is not JSON: valid signature → 400, not 401;
    the same body with a wrong signature → 401, not 400."""
    good = {"X-Hub-Signature-256": GH_VECTOR_SIGNATURE, "X-GitHub-Event": "push"}
    resp = await hooks.post(f"{HOOKS}/github", content=GH_VECTOR_BODY, headers=good)
    assert resp.status_code == 400
    assert resp.json()["error"] == "malformed"
    bad = {**good, "X-Hub-Signature-256": GH_VECTOR_SIGNATURE[:-1] + "0"}
    resp = await hooks.post(f"{HOOKS}/github", content=GH_VECTOR_BODY, headers=bad)
    assert resp.status_code == 401
    assert sink.events == []


def _tampered(body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    return body.replace(b"main", b"evil"), headers


def _without(name: str) -> Any:
    def strip(body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        return body, {k: v for k, v in headers.items() if k.lower() != name}

    return strip


@pytest.mark.parametrize(
    ("slug", "delivery"),
    [
        ("github", lambda: _tampered(*github_delivery(PUSH))),
        ("github", lambda: github_delivery(PUSH, secret="wrong")),
        ("github", lambda: _without("x-hub-signature-256")(*github_delivery(PUSH))),
        ("stripe", lambda: _tampered(*stripe_delivery({**PAYMENT, "ref": "main"}))),
        ("stripe", lambda: stripe_delivery(PAYMENT, secret="whsec_wrong")),
        ("stripe", lambda: stripe_delivery(PAYMENT, age=301)),
        ("stripe", lambda: _without("stripe-signature")(*stripe_delivery(PAYMENT))),
        ("sw", lambda: _tampered(*sw_delivery({"ref": "main"}))),
        ("sw", lambda: sw_delivery({"a": 1}, age=400)),
        ("sw", lambda: _without("webhook-timestamp")(*sw_delivery({"a": 1}))),
        ("sw", lambda: _without("webhook-signature")(*sw_delivery({"a": 1}))),
    ],
    ids=[
        "github-tampered",
        "github-wrong-secret",
        "github-missing",
        "stripe-tampered",
        "stripe-wrong-secret",
        "stripe-stale",
        "stripe-missing",
        "sw-tampered",
        "sw-stale",
        "sw-no-timestamp",
        "sw-missing",
    ],
)
async def test_bad_signatures_are_401_and_all_look_alike(
    sink: FakeSink, hooks: AsyncTestClient[Litestar], slug: str, delivery: Any
) -> None:
    body, headers = delivery()
    resp = await hooks.post(f"{HOOKS}/{slug}", content=body, headers=headers)
    assert resp.status_code == 401
    assert resp.json() == UNAUTHORIZED
    assert sink.events == []


async def test_a_bearer_token_is_no_signature(sink: FakeSink, hooks: AsyncTestClient[Litestar]) -> None:
    body, headers = github_delivery(PUSH)
    headers = {k: v for k, v in headers.items() if k != "X-Hub-Signature-256"}
    resp = await hooks.post(f"{HOOKS}/github", content=body, headers={**headers, **AUTH})
    assert resp.status_code == 401
    assert sink.events == []


async def test_stripe_delivery_renders_input_and_uses_the_event_id(
    sink: FakeSink, hooks: AsyncTestClient[Litestar]
) -> None:
    body, headers = stripe_delivery(PAYMENT)
    resp = await hooks.post(f"{HOOKS}/stripe", content=body, headers=headers)
    assert resp.status_code == 202, resp.text
    [event] = sink.events
    assert (event.id, event.name) == ("evt_1:stripe.payment", "stripe.payment")
    assert event.payload == {"amount": 2000, "event": "evt_1"}
    assert "stripe-signature" not in event.metadata["headers"]


async def test_standard_webhooks_delivery_is_accepted(sink: FakeSink, hooks: AsyncTestClient[Litestar]) -> None:
    body, headers = sw_delivery({"type": "user.created"}, "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W")
    resp = await hooks.post(f"{HOOKS}/sw", content=body, headers=headers)
    assert resp.status_code == 202, resp.text
    assert [e.id for e in sink.events] == ["msg_2KWPBgLlAfxdpx2AI54pPJ85f4W:sw.event"]
    assert "webhook-signature" not in sink.events[0].metadata["headers"]
    assert sink.events[0].metadata["headers"]["webhook-id"] == "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"


async def test_kind_none_accepts_unsigned_and_ids_by_body_hash(
    sink: FakeSink, hooks: AsyncTestClient[Litestar]
) -> None:
    body = b'{"x": 1}'
    answers = [await hooks.post(f"{HOOKS}/open", content=body) for _ in range(2)]
    assert [a.status_code for a in answers] == [202, 202] and answers[0].json() == answers[1].json()
    expected = "sha256:" + hashlib.sha256(body).hexdigest() + ":open.event"
    assert [e.id for e in sink.events] == [expected]  # the repeat is answered as before, not sent again


async def test_no_matching_entry_is_200_ignored(sink: FakeSink, hooks: AsyncTestClient[Litestar]) -> None:
    body, headers = github_delivery({"zen": "Design for failure."}, event="ping", delivery="p-1")
    resp = await hooks.post(f"{HOOKS}/github", content=body, headers=headers)
    assert resp.status_code == 200
    assert resp.json()["status"] == "ignored" and resp.json()["delivery_id"] == body_digest(body)
    assert sink.entered.is_set() is False
    text = (await hooks.get("/metrics", headers=AUTH)).text
    assert 'signal_bridge_events_dropped_total{adapter="webhook",reason="no_match"} 1.0' in text


async def test_a_filter_out_of_its_budget_is_counted_and_logged_as_such_not_as_no_match(
    sink: FakeSink, caplog: pytest.LogCaptureFixture
) -> None:
    """It does not match (as in the dispatcher). Before, the delivery was counted as one no entry
    wanted (``no_match``), with only a DEBUG line saying why; now as ``filter_limited``, warned."""
    scan = {
        "slug": "scan",
        "verify": {"kind": "none"},
        "events": [{"name": "open.event", "filter": "payload.items.exists(i, i == 99999)"}],
    }
    config = hook_config([scan], max_body_bytes=1024 * 1024)
    body = json.dumps({"items": [*range(3000), 99999]}).encode()
    async with AsyncTestClient(make_app(sink, config)) as hooks:
        resp = await hooks.post(f"{HOOKS}/scan", content=body)
        text = (await hooks.get("/metrics", headers=AUTH)).text
    assert resp.status_code == 200 and resp.json()["status"] == "ignored"
    assert 'signal_bridge_events_dropped_total{adapter="webhook",reason="filter_limited"} 1.0' in text
    assert 'reason="no_match"' not in text
    assert any("out of budget" in r.getMessage() and "entries=open.event" in r.getMessage() for r in caplog.records)


async def test_unknown_slug_is_404(sink: FakeSink, hooks: AsyncTestClient[Litestar]) -> None:
    body, headers = github_delivery(PUSH)
    resp = await hooks.post(f"{HOOKS}/gitlab", content=body, headers=headers)
    assert resp.status_code == 404
    assert resp.json()["error"] == "not_found"


async def test_webhook_body_over_limit_is_413(sink: FakeSink, hooks: AsyncTestClient[Litestar]) -> None:
    body, headers = github_delivery({"pad": "x" * MAX_BODY})
    resp = await hooks.post(f"{HOOKS}/github", content=body, headers=headers)
    assert resp.status_code == 413
    async with in_loop_client(make_app(sink, hook_config())) as c:
        resp = await c.post(f"{HOOKS}/github", content=chunks(body), headers=headers)
    assert resp.request.headers["transfer-encoding"] == "chunked"
    assert resp.status_code == 413
    assert sink.events == []


async def test_webhook_event_no_workflow_takes_is_422(sink: FakeSink, hooks: AsyncTestClient[Litestar]) -> None:
    resp = await hooks.post(f"{HOOKS}/typo", content=b"{}")
    assert resp.status_code == 422
    answer = resp.json()
    assert answer["status"] == "rejected"
    assert answer["results"][0]["error"] == "unroutable"
    resp = await hooks.post(f"{HOOKS}/typed", content=b'{"orderId": 5}')
    assert resp.status_code == 422
    assert resp.json()["results"][0]["error"] == "schema_invalid"
    assert sink.events == []


async def test_webhook_unavailable_is_503_with_retry_after(sink: FakeSink) -> None:
    sink.unavailable = Unavailable("temporal down", retry_after=30)
    async with AsyncTestClient(make_app(sink, hook_config(retry_after_seconds=8))) as c:
        body, headers = github_delivery(PUSH, delivery="d-503")
        resp = await c.post(f"{HOOKS}/github", content=body, headers=headers)
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "8"
    assert resp.json()["delivery_id"] == body_digest(body)


async def test_webhook_accepted_only_after_the_sink_returned(sink: FakeSink) -> None:
    sink.release = asyncio.Event()
    async with in_loop_client(make_app(sink, hook_config())) as c:
        body, headers = github_delivery(PUSH)
        request = asyncio.create_task(c.post(f"{HOOKS}/github", content=body, headers=headers))
        await asyncio.wait_for(sink.entered.wait(), 10)
        await asyncio.sleep(0)
        assert not request.done()
        sink.release.set()
        resp = await asyncio.wait_for(request, 10)
    assert resp.status_code == 202


async def test_webhook_refusals_are_counted(hooks: AsyncTestClient[Litestar]) -> None:
    body, headers = github_delivery(PUSH, secret="wrong")
    await hooks.post(f"{HOOKS}/github", content=body, headers=headers)
    await hooks.post(f"{HOOKS}/nope", content=b"{}")
    body, headers = github_delivery(PUSH)
    await hooks.post(f"{HOOKS}/github", content=body, headers=headers)
    text = (await hooks.get("/metrics", headers=AUTH)).text
    assert 'signal_bridge_events_rejected_total{adapter="webhook",reason="unauthorized"} 1.0' in text
    assert 'signal_bridge_events_rejected_total{adapter="webhook",reason="not_found"} 1.0' in text
    assert 'signal_bridge_events_accepted_total{adapter="webhook"} 2.0' in text


async def test_openapi_lists_the_hooks_endpoint(hooks: AsyncTestClient[Litestar]) -> None:
    paths = (await hooks.get("/schema/openapi.json", headers=AUTH)).json()["paths"]
    assert "post" in paths["/api/v1/hooks/{slug}"]


# --- rate limits and reloads ---------------------------------------------------------------


async def test_per_webhook_rate_limit_is_429_and_forgeries_do_not_spend_it(sink: FakeSink) -> None:
    async with AsyncTestClient(make_app(sink, hook_config(rate_limit={"per_webhook": SLOW}))) as c:
        forged_body, forged = github_delivery(PUSH, secret="forged")
        for _ in range(5):
            assert (await c.post(f"{HOOKS}/github", content=forged_body, headers=forged)).status_code == 401
        codes = []
        for i in range(3):
            body, headers = github_delivery({**PUSH, "n": i}, delivery=f"d-{i}")
            codes.append(await c.post(f"{HOOKS}/github", content=body, headers=headers))
        other = await c.post(f"{HOOKS}/open", content=b"{}")
    assert [r.status_code for r in codes] == [202, 202, 429]
    assert codes[2].headers["Retry-After"].isdigit()
    assert other.status_code == 202  # its own bucket


async def test_a_webhooks_own_rate_limit_wins(sink: FakeSink) -> None:
    webhooks = [
        {"slug": "one", "verify": {"kind": "none"}, "events": [{"name": "open.a"}], "rate_limit": {"rate": 0.001}},
        {"slug": "many", "verify": {"kind": "none"}, "events": [{"name": "open.b"}]},
    ]
    cfg = hook_config(webhooks, rate_limit={"per_webhook": {"rate": 1000, "burst": 1000}})
    async with AsyncTestClient(make_app(sink, cfg)) as c:
        one = [(await c.post(f"{HOOKS}/one", content=b'{"n": %d}' % i)).status_code for i in range(2)]
        many = [(await c.post(f"{HOOKS}/many", content=b'{"n": %d}' % i)).status_code for i in range(5)]
    assert one == [202, 429]
    assert many == [202] * 5


async def test_no_rate_limit_by_default(sink: FakeSink) -> None:
    async with AsyncTestClient(make_app(sink, hook_config())) as c:
        codes = {(await c.post(URL, json=order(), headers=AUTH)).status_code for _ in range(30)}
        codes |= {(await c.post(f"{HOOKS}/open", content=b"{}")).status_code for _ in range(30)}
    assert codes == {202}


async def test_a_delivery_is_judged_by_the_config_it_was_mapped_with_not_one_reloaded_meanwhile(
    sink: FakeSink,
) -> None:
    """The handler maps a delivery with its request's snapshot; the pipeline checked the events
    against the routes current at submit. A reload in between (an event renamed with its trigger)
    refused the delivery as unroutable (422, final for most senders), though either config alone
    takes it."""
    mapped_with = Snapshot.compile(hook_config())
    reloaded = Snapshot.compile(
        parse_config(
            {"project": "shop", "workflows": [{"id": "x", "workflow_type": "X", "triggers": [{"name": "renamed"}]}]},
            origin="test",
        )
    )
    app = create_app(Pipeline(lambda: reloaded.routes, sink), lambda: mapped_with)
    async with AsyncTestClient(app) as c:
        resp = await c.post(f"{HOOKS}/open", content=b"{}")
    assert resp.status_code == 202, resp.text
    assert [e.name for e in sink.events] == ["open.event"]


async def test_webhooks_follow_a_reloaded_config(sink: FakeSink) -> None:
    one = {"slug": "one", "verify": {"kind": "none"}, "events": [{"name": "open.a"}], "rate_limit": {"rate": 0.001}}
    two = {"slug": "two", "verify": {"kind": "none"}, "events": [{"name": "open.b"}]}
    current = Snapshot.compile(hook_config([one]))
    app = create_app(Pipeline(current.routes, sink), lambda: current)
    async with AsyncTestClient(app) as c:
        assert (await c.post(f"{HOOKS}/one", content=b"{}")).status_code == 202
        assert (await c.post(f"{HOOKS}/two", content=b"{}")).status_code == 404
        current = Snapshot.compile(hook_config([one, two]))  # reloaded: a webhook added, one's limit unchanged
        assert (await c.post(f"{HOOKS}/two", content=b"{}")).status_code == 202
        assert (await c.post(f"{HOOKS}/one", content=b"{}")).status_code == 429  # its bucket was kept
        current = Snapshot.compile(hook_config([two]))  # reloaded: one removed
        assert (await c.post(f"{HOOKS}/one", content=b"{}")).status_code == 404
    assert [e.name for e in sink.events] == ["open.a", "open.b"]


async def test_replaying_a_captured_delivery_spends_neither_a_signal_nor_the_webhooks_rate_limit(
    sink: FakeSink,
) -> None:
    """GitHub signs no timestamp: a captured delivery verifies for ever. Each replay was submitted
    again and charged to the webhook's bucket, so a replayer shut the provider's own deliveries
    out (429) for as long as it went on."""
    cfg = hook_config(rate_limit={"per_webhook": {"rate": 0.01, "burst": 3}})
    async with AsyncTestClient(make_app(sink, cfg)) as c:
        body, headers = github_delivery(PUSH, delivery="captured")
        replays = [await c.post(f"{HOOKS}/github", content=body, headers=headers) for _ in range(10)]
        fresh_body, fresh = github_delivery({**PUSH, "n": 2}, delivery="fresh")
        genuine = await c.post(f"{HOOKS}/github", content=fresh_body, headers=fresh)
    assert {r.status_code for r in replays} == {202} and len({r.text for r in replays}) == 1
    assert genuine.status_code == 202, genuine.text
    assert len(sink.calls) == 2, "the captured delivery was submitted once, the fresh one once"


async def test_replaying_a_delivery_answered_ignored_or_refused_spends_nothing_and_is_answered_as_before(
    sink: FakeSink,
) -> None:
    """Only deliveries accepted whole were kept: a replay of one answered ``200 ignored`` took a
    token of the webhook's rate limit (then no entry matched), and a replay of one refused in part
    took one and sent its held events again, so a replayer shut the provider's deliveries out (429)."""
    webhooks = [
        {"slug": "picky", "verify": {"kind": "none"}, "events": [{"name": "open.a", "filter": 'payload.k == "a"'}]},
        {"slug": "mixed", "verify": {"kind": "none"}, "events": [{"name": "open.b"}, {"name": "nobody.listens"}]},
    ]
    cfg = hook_config(webhooks, rate_limit={"per_webhook": {"rate": 0.001, "burst": 2}})
    async with AsyncTestClient(make_app(sink, cfg)) as c:
        ignored = [await c.post(f"{HOOKS}/picky", content=b'{"k": "b"}') for _ in range(5)]
        refused = [await c.post(f"{HOOKS}/mixed", content=b'{"n": 1}') for _ in range(5)]
        genuine = [await c.post(f"{HOOKS}/{slug}", content=b'{"k": "a"}') for slug in ("picky", "mixed")]
    assert [r.status_code for r in ignored] == [200] * 5
    assert [r.status_code for r in refused] == [422] * 5 and len({r.text for r in refused}) == 1
    assert refused[0].json()["accepted"] == 1
    assert [r.status_code for r in genuine] == [202, 422], [r.text for r in genuine]
    assert [e.name for e in sink.events] == ["open.b", "open.a", "open.b"], (
        "the refused delivery's held event went once"
    )


async def test_a_delivery_refused_for_a_while_is_not_answered_so_again(sink: FakeSink) -> None:
    sink.unavailable = Unavailable("temporal down", retry_after=1)
    async with AsyncTestClient(make_app(sink, hook_config())) as c:
        body, headers = github_delivery(PUSH, delivery="d-later")
        first = await c.post(f"{HOOKS}/github", content=body, headers=headers)
        sink.unavailable = None
        again = await c.post(f"{HOOKS}/github", content=body, headers=headers)
    assert (first.status_code, again.status_code) == (503, 202)
    assert len(sink.events) == 2


async def test_copies_of_a_delivery_sent_at_once_are_sent_to_temporal_once_and_spend_one_token() -> None:
    """A delivery's answer was kept only once it had one: copies of a captured delivery sent at
    the same time each reached Temporal, each took a token of the webhook's rate limit, and the
    provider's next delivery was refused (429)."""
    sink = FakeSink()
    sink.release = asyncio.Event()
    cfg = hook_config(rate_limit={"per_webhook": {"rate": 0.001, "burst": 2}})
    async with in_loop_client(make_app(sink, cfg)) as c:
        body, headers = github_delivery(PUSH, delivery="captured")
        first = asyncio.create_task(c.post(f"{HOOKS}/github", content=body, headers=headers))
        await asyncio.wait_for(sink.entered.wait(), 10)
        copies = [await c.post(f"{HOOKS}/github", content=body, headers=headers) for _ in range(5)]
        sink.release.set()
        assert (await asyncio.wait_for(first, 10)).status_code == 202
        after = await c.post(f"{HOOKS}/github", content=body, headers=headers)  # answered as before
        fresh_body, fresh = github_delivery({**PUSH, "n": 2}, delivery="fresh")
        genuine = await c.post(f"{HOOKS}/github", content=fresh_body, headers=fresh)
    assert [r.status_code for r in copies] == [429] * 5
    assert all("being handled" in r.json()["message"] and r.headers["Retry-After"] == "1" for r in copies)
    assert after.status_code == 202
    assert genuine.status_code == 202, genuine.text
    assert len(sink.calls) == 2, "the captured delivery once, the fresh one once"


async def test_a_replay_with_other_headers_answered_first_does_not_cost_the_provider_its_events() -> None:
    """Which entries match may depend on headers the signature does not cover. A replay with
    ``X-GitHub-Event: ping`` matched only the body's entry and its answer was kept; the provider's
    own delivery, sent again after a 503, was then answered as before, and its push event never sent."""
    sink = FakeSink()
    sink.unavailable = Unavailable("temporal down", retry_after=1)
    async with AsyncTestClient(make_app(sink, hook_config())) as c:
        body, headers = github_delivery(PUSH, delivery="d-1")
        refused = await c.post(f"{HOOKS}/github", content=body, headers=headers)
        sink.unavailable = None
        replay = await c.post(f"{HOOKS}/github", content=body, headers={**headers, "X-GitHub-Event": "ping"})
        retried = await c.post(f"{HOOKS}/github", content=body, headers=headers)
        again = await c.post(f"{HOOKS}/github", content=body, headers=headers)
    assert refused.status_code == 503
    assert replay.status_code == 202 and [r["name"] for r in replay.json()["results"]] == ["github.main"]
    assert retried.status_code == 202, retried.text
    assert sorted(e.name for e in sink.events) == ["github.main", "github.main", "github.push"]
    assert again.status_code == 202 and len(sink.calls) == 3  # the 503, the replay, the retry: then kept whole


async def test_a_copy_of_a_delivery_is_answered_before_its_body_is_parsed(sink: FakeSink, parsed: list[int]) -> None:
    """A repeat was parsed, filtered and rendered before its kept answer was found: a replayed
    750 KB delivery cost 24 ms of the event loop each time (a forged one 0.4 ms). A copy the same
    byte for byte, headers events see included, is now answered first; one with other headers is
    read again (its events may differ), and an ignored delivery is kept too."""

    async with AsyncTestClient(make_app(sink, hook_config())) as c:
        body, headers = github_delivery(PUSH, delivery="d-1")
        answers = [await c.post(f"{HOOKS}/github", content=body, headers=headers) for _ in range(5)]
        assert len(parsed) == 1
        other = await c.post(f"{HOOKS}/github", content=body, headers={**headers, "X-Request-Id": "r-2"})
        assert len(parsed) == 2
        ignored_body, ignored_headers = github_delivery({"ref": "refs/heads/dev"}, event="issues", delivery="d-2")
        ignored = [await c.post(f"{HOOKS}/github", content=ignored_body, headers=ignored_headers) for _ in range(3)]
        assert len(parsed) == 3
    assert {a.status_code for a in answers} == {202} and len({a.text for a in answers}) == 1
    assert other.status_code == 202
    assert [r.status_code for r in ignored] == [200] * 3
    assert len(sink.calls) == 1


async def test_a_replayer_changing_a_header_each_time_is_read_a_few_times_then_refused(
    sink: FakeSink, parsed: list[int], frozen: None
) -> None:
    """A copy with other unsigned headers must be parsed, filtered and rendered before it is known
    to send nothing new (24 ms of the event loop for 750 KB): a replayer with one captured
    delivery and a fresh ``X-Request-Id`` each time could hold the loop. Past the first
    FREE_VARIANTS, it has REPEAT_BURST such copies read for nothing, then ``429``; the provider's
    budget and new deliveries are untouched."""
    from bridge import webhooks

    cfg = hook_config(rate_limit={"per_webhook": {"rate": 0.001, "burst": 2}})
    async with AsyncTestClient(make_app(sink, cfg)) as c:
        body, headers = github_delivery(PUSH, delivery="d-1")
        replays = [
            await c.post(f"{HOOKS}/github", content=body, headers={**headers, "X-Request-Id": f"r-{n}"})
            for n in range(webhooks.FREE_VARIANTS + webhooks.REPEAT_BURST + 4)
        ]
        fresh_body, fresh = github_delivery({**PUSH, "n": 2}, delivery="fresh")
        genuine = await c.post(f"{HOOKS}/github", content=fresh_body, headers=fresh)
        rejected = await c.get("/metrics", headers=AUTH)
    statuses = [r.status_code for r in replays]
    assert statuses == [202] * (webhooks.FREE_VARIANTS + webhooks.REPEAT_BURST) + [429] * 4, statuses
    assert all(r.headers["Retry-After"] == "1" and "sent nothing new" in r.json()["message"] for r in replays[-4:])
    assert len(parsed) == webhooks.FREE_VARIANTS + webhooks.REPEAT_BURST + 1, "the free, the burst, the fresh one"
    assert genuine.status_code == 202, genuine.text
    assert len(sink.calls) == 2, "the captured delivery once, the fresh one once"
    assert 'signal_bridge_events_rejected_total{adapter="webhook",reason="rate_limited"} 4.0' in rejected.text


async def test_a_copy_answered_as_before_is_answered_so_again_before_it_is_read(
    sink: FakeSink, parsed: list[int], frozen: None
) -> None:
    """A copy with other headers is read once; answered as before (it sent nothing new), its
    answer is kept under its own headers too, so the same copy sent again is not read again."""
    from bridge import webhooks

    async with AsyncTestClient(make_app(sink, hook_config())) as c:
        body, headers = github_delivery(PUSH, delivery="d-1")
        first = await c.post(f"{HOOKS}/github", content=body, headers=headers)
        copy = {**headers, "X-Request-Id": "r-1"}
        again = [await c.post(f"{HOOKS}/github", content=body, headers=copy) for _ in range(3 * webhooks.REPEAT_BURST)]
    assert first.status_code == 202 and {a.status_code for a in again} == {202}
    assert len(parsed) == 2, "the delivery, and its copy once"
    assert len(sink.calls) == 1


async def test_copies_read_for_nothing_are_counted_by_the_address_that_sends_them(frozen: None) -> None:
    """While Temporal is away, one address that sends again the copies of many deliveries (their
    answers, 503, are not kept) is refused once it had its burst read for nothing; the provider's
    own retries, and another address's, are still read."""
    from bridge import webhooks

    sink = FakeSink()
    sink.unavailable = Unavailable("temporal down", retry_after=1)
    app = make_app(sink, hook_config())
    captured = [github_delivery({**PUSH, "n": n}, delivery=f"d-{n}") for n in range(webhooks.REPEAT_BURST + 1)]
    async with in_loop_client(app, "192.0.2.10") as provider, in_loop_client(app, "203.0.113.9") as replayer:
        async with in_loop_client(app, "198.51.100.7") as other:

            async def post(client: httpx.AsyncClient, body: bytes, headers: dict[str, str]) -> int:
                return (await client.post(f"{HOOKS}/github", content=body, headers=headers)).status_code

            first = [await post(provider, body, headers) for body, headers in captured]
            replays = [await post(replayer, body, headers) for body, headers in captured]
            body, headers = captured[-1]
            others, retry = await post(other, body, headers), await post(provider, body, headers)
    assert first == [503] * len(captured)
    assert replays == [503] * webhooks.REPEAT_BURST + [429], "read until the address had its burst"
    assert (others, retry) == (503, 503), "read: other addresses have their own"


async def test_the_providers_retries_of_deliveries_refused_for_a_while_cost_nothing_once_they_send(
    frozen: None,
) -> None:
    """A delivery answered ``503`` (Temporal away) is sent again as it was: the bridge asked for
    that retry, and it sends events, so it costs nothing of the repeat buckets (they counted it,
    and refused the retries past their burst with ``429``). A retry refused again costs one."""
    from bridge import webhooks

    sink = FakeSink()
    sink.unavailable = Unavailable("temporal down", retry_after=1)
    n = webhooks.REPEAT_BURST + 4
    async with AsyncTestClient(make_app(sink, hook_config())) as c:
        deliveries = [github_delivery({**PUSH, "n": k}, delivery=f"d-{k}") for k in range(n)]
        down = [await c.post(f"{HOOKS}/github", content=b, headers=h) for b, h in deliveries]
        still_down = [await c.post(f"{HOOKS}/github", content=b, headers=h) for b, h in deliveries[: n // 2]]
        sink.unavailable = None
        back = [await c.post(f"{HOOKS}/github", content=b, headers=h) for b, h in deliveries]
    assert [r.status_code for r in down] == [503] * n
    assert [r.status_code for r in still_down] == [503] * (n // 2), "each a first retry, within the burst"
    assert [r.status_code for r in back] == [202] * n, [r.text for r in back]
    assert len(sink.events) == 2 * n  # github.push and github.main of each


async def test_one_body_sent_as_several_topics_is_never_counted(sink: FakeSink, frozen: None) -> None:
    """A provider may send one body several times, as topics (unsigned headers) of which entries
    match some and none others: each is read, however many bodies it sends so."""
    from bridge import webhooks

    entries = [{"name": "github.create", "filter": 'metadata.headers["x-topic"] == "orders/create"'}]
    hooks = [{"slug": "github", "verify": {"kind": "github", "secret": GH_SECRET}, "events": entries}]
    async with AsyncTestClient(make_app(sink, hook_config(hooks))) as c:
        answers = []
        for n in range(2 * (webhooks.FREE_VARIANTS + webhooks.REPEAT_BURST)):
            body, headers = github_delivery({"order": n}, delivery=f"o-{n}")
            for topic in ("paid", "fulfilled", "create"):  # the unwanted first
                sent = {**headers, "X-Topic": f"orders/{topic}"}
                answers.append((await c.post(f"{HOOKS}/github", content=body, headers=sent)).status_code)
    assert answers == [200, 200, 202] * (len(answers) // 3)
    assert len(sink.events) == len(answers) // 3


async def test_copies_that_fail_their_template_are_counted_too(sink: FakeSink, frozen: None) -> None:
    """A copy refused ``422`` (its ``input:`` fails on this body) was parsed and rendered for
    nothing, as one answered as before: it counts."""
    from bridge import webhooks

    entries = [{"name": "github.push", "input": {"x": "{{ payload.ref | int('x', 'y', 'z') }}"}}]
    hooks = [{"slug": "github", "verify": {"kind": "github", "secret": GH_SECRET}, "events": entries}]
    async with AsyncTestClient(make_app(sink, hook_config(hooks))) as c:
        body, headers = github_delivery(PUSH, delivery="d-1")
        replays = [
            (await c.post(f"{HOOKS}/github", content=body, headers={**headers, "X-Request-Id": f"r-{n}"})).status_code
            for n in range(webhooks.FREE_VARIANTS + webhooks.REPEAT_BURST + 2)
        ]
    assert replays == [422] * (webhooks.FREE_VARIANTS + webhooks.REPEAT_BURST) + [429] * 2, replays


async def test_a_copy_in_flight_with_other_headers_does_not_hold_the_providers_events_out() -> None:
    """A copy in flight refused every other copy of its delivery id: a replay with
    ``X-GitHub-Event: ping`` (only the body's entry) held in flight got the provider's own push
    delivery refused 429, and its push event was never sent (GitHub does not retry a 429)."""
    sink = FakeSink()
    sink.release = asyncio.Event()
    async with in_loop_client(make_app(sink, hook_config())) as c:
        body, headers = github_delivery(PUSH, delivery="d-1")
        replay = asyncio.create_task(
            c.post(f"{HOOKS}/github", content=body, headers={**headers, "X-GitHub-Event": "ping"})
        )
        await asyncio.wait_for(sink.entered.wait(), 10)
        genuine = asyncio.create_task(c.post(f"{HOOKS}/github", content=body, headers=headers))
        await asyncio.sleep(0.1)
        sink.release.set()
        answers = await asyncio.wait_for(asyncio.gather(replay, genuine), 10)
    assert [a.status_code for a in answers] == [202, 202], [a.text for a in answers]
    assert "github.push" in {e.name for e in sink.events}


async def test_copies_taking_turns_with_other_headers_spend_one_token_each_event_set() -> None:
    """The kept answer was replaced by each copy's own: two entries keyed on X-GitHub-Event, and a
    replay alternating the header was sent again each time, took a token each time, and the
    provider's next delivery was refused 429."""
    sink = FakeSink()
    entries = [
        {"name": f"github.{kind}", "filter": f'metadata.headers["x-github-event"] == "{kind}"'}
        for kind in ("push", "release")
    ]
    hooks = [{"slug": "github", "verify": {"kind": "github", "secret": GH_SECRET}, "events": entries}]
    cfg = hook_config(hooks, rate_limit={"per_webhook": {"rate": 0.001, "burst": 3}})
    async with AsyncTestClient(make_app(sink, cfg)) as c:
        body, headers = github_delivery(PUSH, delivery="d-1")
        replays = [
            await c.post(f"{HOOKS}/github", content=body, headers={**headers, "X-GitHub-Event": kind, "X-N": str(n)})
            for n, kind in enumerate(["push", "release"] * 3)
        ]
        fresh_body, fresh = github_delivery({**PUSH, "n": 2}, delivery="fresh")
        genuine = await c.post(f"{HOOKS}/github", content=fresh_body, headers=fresh)
    assert {r.status_code for r in replays} == {202}
    assert len(sink.calls) == 3, "push once, release once, the fresh delivery once"
    assert genuine.status_code == 202, genuine.text
