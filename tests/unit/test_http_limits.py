"""What one request to the events API may cost: batch size (http.max_batch_events), kept headers,
the per-token rate limit charged per event, and the 503 ``overloaded`` when too many events
already wait for Temporal in the process."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from adapters.http import create_app, state
from adapters.http.parse import CE_BATCH
from bridge.decode import MAX_KEPT_VALUE
from bridge.pipeline import Pipeline
from bridge.ratelimit import TokenBucket
from bridge.snapshot import Snapshot
from tests.fakes import FakeSink
from tests.helpers import assert_eventually
from tests.unit.http_support import (
    AUTH,
    GH_SECRET,
    HOOKS,
    OTHER_NAMED,
    TOKEN,
    URL,
    hook_config,
    in_loop_client,
    make_app,
    make_config,
    order,
)

MAX_BATCH = 5


def ce(event_id: str) -> dict[str, Any]:
    return {"specversion": "1.0", "id": event_id, "source": "/shop", "type": "order.created", "data": {"orderId": "A"}}


def metric(text: str, name: str, **labels: str) -> float:
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "") + " "
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(want)), 0.0)


# --- http.max_batch_events -------------------------------------------------------------------


@pytest.mark.parametrize("cloudevents", [False, True], ids=["envelopes", "cloudevents"])
async def test_a_batch_over_max_batch_events_is_413_whole(cloudevents: bool) -> None:
    sink = FakeSink()
    async with AsyncTestClient(make_app(sink, make_config(max_batch_events=MAX_BATCH))) as c:

        async def send(n: int) -> Any:
            if cloudevents:
                body = json.dumps([ce(f"e{i}") for i in range(n)]).encode()
                return await c.post(URL, content=body, headers={**AUTH, "Content-Type": CE_BATCH})
            return await c.post(URL, json=[{**order(), "id": f"e{i}"} for i in range(n)], headers=AUTH)

        at_the_cap = await send(MAX_BATCH)
        over = await send(MAX_BATCH + 1)
        text = (await c.get("/metrics", headers=AUTH)).text
    assert at_the_cap.status_code == 202
    assert over.status_code == 413
    assert over.json() == {
        "error": "batch_too_large",
        "message": f"the batch has {MAX_BATCH + 1} events; http.max_batch_events allows {MAX_BATCH}",
    }
    assert len(sink.events) == MAX_BATCH  # nothing of the larger batch
    assert metric(text, "signal_bridge_events_rejected_total", adapter="http", reason="batch_too_large") == 1


def test_max_batch_events_defaults_to_1000() -> None:
    assert make_config().http.max_batch_events == 1000


# --- kept headers ----------------------------------------------------------------------------


async def test_kept_headers_are_capped_in_length_and_others_never_kept() -> None:
    sink = FakeSink()
    headers = {
        **AUTH,
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "v=" + "x" * (MAX_KEPT_VALUE - 2),  # just at the cap: kept
        "user-agent": "u" * (MAX_KEPT_VALUE + 1),  # over it: left out, not cut
        "x-correlation-id": "c" * 100_000,
        "cookie": "session=secret",
        "x-api-key": "secret",
    }
    async with AsyncTestClient(make_app(sink)) as c:
        assert (await c.post(URL, json=order(), headers=headers)).status_code == 202
    meta = sink.events[0].metadata
    assert meta["headers"] == {"traceparent": headers["traceparent"], "tracestate": headers["tracestate"]}
    assert "correlation_id" not in meta
    assert "secret" not in json.dumps(meta)


async def test_a_repeated_kept_header_keeps_its_first_value() -> None:
    sink = FakeSink()
    async with in_loop_client(make_app(sink)) as c:
        headers = [*AUTH.items(), ("x-request-id", "first"), ("x-request-id", "second")]
        assert (await c.post(URL, json=order(), headers=headers)).status_code == 202
    assert sink.events[0].metadata["headers"]["x-request-id"] == "first"


@pytest.mark.parametrize("cloudevents", [False, True], ids=["envelopes", "cloudevents"])
async def test_the_events_of_a_batch_share_the_requests_kept_headers(cloudevents: bool) -> None:
    """A batch does not copy the request's headers once per event."""
    sink = FakeSink()
    headers = {**AUTH, "tracestate": "t" * MAX_KEPT_VALUE}
    async with AsyncTestClient(make_app(sink)) as c:
        if cloudevents:
            body = json.dumps([ce(f"e{i}") for i in range(4)]).encode()
            resp = await c.post(URL, content=body, headers={**headers, "Content-Type": CE_BATCH})
        else:
            resp = await c.post(URL, json=[order()] * 4, headers=headers)
    assert resp.status_code == 202
    kept = [e.metadata["headers"] for e in sink.events]
    assert len(kept) == 4 and all(h is kept[0] for h in kept)


# --- rate limits: per event ------------------------------------------------------------------

BUDGET_OF_FIVE = {"per_token": {"rate": 0.001, "burst": 5}}  # five events, then one every 1000 s


async def test_a_batch_of_n_takes_n_tokens_and_one_that_does_not_fit_is_429_whole() -> None:
    sink = FakeSink()
    async with AsyncTestClient(make_app(sink, make_config(rate_limit=BUDGET_OF_FIVE))) as c:
        first = await c.post(URL, json=[{**order(), "id": f"a{i}"} for i in range(3)], headers=AUTH)
        refused = await c.post(URL, json=[{**order(), "id": f"b{i}"} for i in range(3)], headers=AUTH)
        fits = await c.post(URL, json=[{**order(), "id": f"c{i}"} for i in range(2)], headers=AUTH)
        after = await c.post(URL, json={**order(), "id": "d"}, headers=AUTH)
    assert (first.status_code, refused.status_code, fits.status_code, after.status_code) == (202, 429, 202, 429)
    assert refused.json()["error"] == "rate_limited"
    assert "3 events" in refused.json()["message"]
    assert 990 <= int(refused.headers["Retry-After"]) <= 1000
    assert [e.id for e in sink.events] == ["a0", "a1", "a2", "c0", "c1"]


async def test_a_batch_larger_than_the_burst_goes_with_a_full_bucket_and_leaves_a_debt() -> None:
    sink = FakeSink()
    async with AsyncTestClient(make_app(sink, make_config(rate_limit=BUDGET_OF_FIVE))) as c:
        big = await c.post(URL, json=[order()] * 8, headers=AUTH)
        after = await c.post(URL, json=order(), headers=AUTH)
    assert (big.status_code, after.status_code) == (202, 429)
    assert int(after.headers["Retry-After"]) >= 3 * 1000  # the three borrowed tokens, then one more


async def test_a_refused_body_costs_its_request() -> None:
    sink = FakeSink()
    budget = {"per_token": {"rate": 0.001, "burst": 2}}
    async with AsyncTestClient(make_app(sink, make_config(rate_limit=budget))) as c:
        statuses = [
            (await c.post(URL, content=b"{nope", headers=AUTH)).status_code,
            (await c.post(URL, json=order(), headers=AUTH)).status_code,
            (await c.post(URL, json=order(), headers=AUTH)).status_code,
        ]
    assert statuses == [400, 202, 429]


def test_a_bucket_takes_a_cost_whole_or_not_at_all() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=1, burst=4, clock=lambda: now[0])
    assert bucket.take(3) == 0.0
    assert bucket.due(2) == pytest.approx(1.0)  # one left, a second in one second
    assert bucket.take(2) == pytest.approx(1.0)  # nothing taken
    now[0] = 1.0
    assert bucket.take(2) == 0.0
    now[0] = 5.0  # full again
    assert bucket.take(10) == 0.0  # over the burst: a full bucket lets it go, six tokens in debt
    assert bucket.due() == pytest.approx(7.0)


# --- 503 overloaded --------------------------------------------------------------------------


async def test_overloaded_is_503_with_the_configured_retry_after() -> None:
    """A process holding dispatcher.max_pending_events events for Temporal refuses more: 503
    ``overloaded`` with Retry-After from http.retry_after_seconds; nothing of it is held."""
    sink = FakeSink()
    sink.release = asyncio.Event()
    snap = Snapshot.compile(make_config([TOKEN, OTHER_NAMED], retry_after_seconds=2))
    pipeline = Pipeline(snap.routes, sink, max_pending=3, retry_after=30)
    other = {"Authorization": "Bearer other-token"}  # not the token holding the process's room
    async with in_loop_client(create_app(pipeline, snap)) as c:
        held = asyncio.create_task(c.post(URL, json=[{**order(), "id": f"h{i}"} for i in range(3)], headers=AUTH))
        await asyncio.wait_for(sink.entered.wait(), 10)
        one = await c.post(URL, json={**order(), "id": "o"}, headers=other)
        batch = await c.post(URL, json=[{**order(), "id": "b1"}, {**order(), "id": "b2"}], headers=other)
        sink.release.set()
        assert (await asyncio.wait_for(held, 10)).status_code == 202
        text = (await c.get("/metrics", headers=AUTH)).text
    for resp in (one, batch):
        assert resp.status_code == 503
        assert resp.headers["Retry-After"] == "2"
        assert resp.json()["error"] == "overloaded"
        assert "too many events wait for Temporal" in resp.json()["message"]
    assert one.json()["event_id"] == "o"
    assert batch.json()["event_ids"] == ["b1", "b2"]
    assert [e.id for e in sink.events] == ["h0", "h1", "h2"]
    assert metric(text, "signal_bridge_overloaded_total", adapter="http") == 2


async def test_one_token_leaves_another_a_share_of_the_waiting_events() -> None:
    """One token's large batches while Temporal was slow filled dispatcher.max_pending_events:
    every other token and webhook got 503 overloaded until they drained. Past its share, a token
    that would leave the others less than a share now gets 429, and the others are taken."""
    sink = FakeSink()
    sink.release = asyncio.Event()
    cfg = hook_config([{"slug": "open", "verify": {"kind": "none"}, "events": [{"name": "open.event"}]}])
    snap = Snapshot.compile(cfg.model_copy(update={"http": cfg.http.model_copy(update={"retry_after_seconds": 3})}))
    pipeline = Pipeline(snap.routes, sink, max_pending=8, retry_after=30)  # a share of 2
    async with in_loop_client(create_app(pipeline, snap)) as c:
        held = [
            asyncio.create_task(c.post(URL, json=[{**order(), "id": f"h{i}{j}"} for j in range(2)], headers=AUTH))
            for i in range(3)
        ]
        await asyncio.wait_for(sink.entered.wait(), 10)
        await assert_eventually(lambda: pipeline.pending == 6, timeout=5, interval=0.01)
        over = await asyncio.wait_for(c.post(URL, json={**order(), "id": "over"}, headers=AUTH), 5)
        other = asyncio.create_task(
            c.post(URL, json={**order(), "id": "o"}, headers={"Authorization": "Bearer other-token"})
        )
        hook = asyncio.create_task(c.post("/api/v1/hooks/open", json={"x": 1}))
        await asyncio.sleep(0.1)
        sink.release.set()
        answers = await asyncio.wait_for(asyncio.gather(*held, other, hook), 10)
        text = (await c.get("/metrics", headers=AUTH)).text
    assert over.status_code == 429, over.text
    assert over.json()["error"] == "rate_limited" and over.json()["event_id"] == "over"
    assert "already wait for Temporal" in over.json()["message"]
    assert over.headers["Retry-After"] == "3"
    assert [a.status_code for a in answers] == [202] * 5, [a.text for a in answers]
    assert "o" in {e.id for e in sink.events}
    assert len(sink.events) == 8 and "over" not in {e.id for e in sink.events}
    assert metric(text, "signal_bridge_overloaded_total", adapter="http") == 1


# --- http.body_timeout_seconds ---------------------------------------------------------------


@pytest.mark.parametrize("path", [URL, "/api/v1/hooks/github"], ids=["events", "webhook-no-token-needed"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_that_trickles_in_is_408_too_slow_and_frees_its_request(path: str, framing: str) -> None:
    """A sender that starts a body and stalls would hold its request (and what it sent) for as long
    as it liked: on a webhook's path, with no token needed to reach the body."""
    body = json.dumps(order()).encode()

    async def stalls() -> Any:
        yield body[:10]
        await asyncio.sleep(30)
        yield body[10:]

    headers = {**AUTH, "Content-Type": "application/json"}
    if framing == "content-length":
        headers["Content-Length"] = str(len(body))
    sink = FakeSink()
    cfg = hook_config(body_timeout_seconds=0.2) if "hooks" in path else make_config(body_timeout_seconds=0.2)
    async with in_loop_client(make_app(sink, cfg)) as c:
        resp = await asyncio.wait_for(c.post(path, content=stalls(), headers=headers), 10)
        assert resp.status_code == 408, resp.text
        assert resp.json()["error"] == "too_slow" and "within 0.2 s" in resp.json()["message"]
        adapter = "webhook" if "hooks" in path else "http"
        text = (await c.get("/metrics", headers=AUTH)).text
        assert metric(text, "signal_bridge_events_rejected_total", adapter=adapter, reason="too_slow") == 1
    assert sink.calls == []


def test_the_body_timeout_and_the_request_limit_have_defaults() -> None:
    http = make_config().http
    assert (http.body_timeout_seconds, http.max_concurrent_requests) == (30.0, 1000)


class Trickle:
    """A body whose first bytes come at once and the rest only once ``release`` is set: a sender
    holding its requests open."""

    def __init__(self, body: bytes) -> None:
        self.whole = body
        self.release = asyncio.Event()

    async def body(self) -> AsyncIterator[bytes]:
        yield self.whole[:3]
        await self.release.wait()
        yield self.whole[3:]


def signed_push() -> tuple[bytes, dict[str, str]]:
    """A GitHub push delivery to the ``github`` webhook, and its signed headers."""
    body = json.dumps({"ref": "refs/heads/main"}).encode()
    signature = "sha256=" + hmac.new(GH_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return body, {"Content-Type": "application/json", "X-Hub-Signature-256": signature, "X-GitHub-Event": "push"}


# --- http.max_requests_per_source ------------------------------------------------------------


@pytest.mark.parametrize("path", [URL, "/api/v1/hooks/open"], ids=["events", "webhook"])
async def test_one_sender_holds_at_most_its_share_of_the_requests_and_the_others_go_on(path: str) -> None:
    """A token holder (or anyone, from one address, on a webhook's path) that opened requests and
    trickled their bodies could hold every request the process takes (http.max_concurrent_requests):
    everyone else got 503s for as long as the bodies took."""
    body = json.dumps(order()).encode()
    trickle = Trickle(body)

    sink = FakeSink()
    hooks = [{"slug": s, "verify": {"kind": "none"}, "events": [{"name": "open.event"}]} for s in ("open", "other")]
    cfg = hook_config(hooks, max_requests_per_source=2)
    other = ("/api/v1/hooks/other", {}) if "hooks" in path else (URL, {"Authorization": "Bearer other-token"})
    headers = {**AUTH, "Content-Type": "application/json"}
    app = make_app(sink, cfg)
    async with in_loop_client(app) as c, in_loop_client(app, address="10.0.0.2") as from_elsewhere:
        held = [asyncio.create_task(c.post(path, content=trickle.body(), headers=headers)) for _ in range(2)]
        await asyncio.sleep(0.1)
        third = await c.post(path, content=body, headers=headers)
        # another token; on a webhook's path, an unverified request from another address
        sender = from_elsewhere if "hooks" in path else c
        elsewhere = await sender.post(other[0], content=body, headers={**other[1], "Content-Type": "application/json"})
        trickle.release.set()
        answers = await asyncio.gather(*held)
        after = await c.post(path, content=body, headers=headers)
    assert third.status_code == 429 and third.json()["error"] == "rate_limited", third.text
    assert third.headers["retry-after"] == "1"
    assert elsewhere.status_code == 202, elsewhere.text
    assert [a.status_code for a in answers] == [202, 202] and after.status_code == 202


def test_a_source_may_hold_a_quarter_of_the_requests_by_default() -> None:
    assert make_config().http.max_requests_per_source == 250


async def test_unsigned_bodies_trickled_to_a_webhook_do_not_hold_its_signed_deliveries_out() -> None:
    """A webhook's share of the requests in flight was taken before its signature was checked:
    anyone, with no secret, held all of it with unsigned bodies sent a byte at a time, and the
    provider's deliveries got 429 meanwhile (GitHub does not redeliver those by itself)."""
    trickle = Trickle(b'{"x"}')

    body, signed = signed_push()
    sink = FakeSink()
    app = make_app(sink, hook_config(max_requests_per_source=2))
    async with in_loop_client(app, address="203.0.113.9") as squatter, in_loop_client(app) as github:
        held = [asyncio.create_task(squatter.post(f"{HOOKS}/github", content=trickle.body())) for _ in range(2)]
        await asyncio.sleep(0.1)
        third = await squatter.post(f"{HOOKS}/github", content=b"{}")
        real = await github.post(f"{HOOKS}/github", content=body, headers=signed)
        trickle.release.set()
        squatted = await asyncio.gather(*held)
    assert third.status_code == 429, "one address holds at most its share"
    assert real.status_code == 202, real.text
    assert [r.status_code for r in squatted] == [401, 401]


async def test_unsigned_bodies_hold_half_the_requests_and_the_address_holding_most_gives_way() -> None:
    """Each address's unsigned webhook requests were bounded, not all of them: a few addresses
    trickling bodies held every request the process takes (http.max_concurrent_requests), and the
    events API and every provider got 503s for as long as the bodies took. Now they hold half, and
    when that is full the address holding most of it gives up its oldest request (408), or, when
    that is the newcomer's own address, the newcomer is refused (429)."""
    trickle = Trickle(b'{"x"}')

    body, signed = signed_push()
    sink = FakeSink()
    app = make_app(sink, hook_config(max_concurrent_requests=4))  # room for 2 unsigned bodies
    async with in_loop_client(app, address="203.0.113.1") as squatter, in_loop_client(app) as github:
        held = [asyncio.create_task(squatter.post(f"{HOOKS}/github", content=trickle.body())) for _ in range(2)]
        await asyncio.sleep(0.1)
        # The room is full, all of it the squatter's: its next request is refused at once.
        more = await asyncio.wait_for(squatter.post(f"{HOOKS}/github", content=trickle.body()), 2)
        real = await asyncio.wait_for(github.post(f"{HOOKS}/github", content=body, headers=signed), 2)
        cut = await asyncio.wait_for(held[0], 2)  # the squatter's oldest gave its place
        api = await github.post(URL, json=order(), headers=AUTH)
        trickle.release.set()
        last = await held[1]
        text = (await github.get("/metrics", headers=AUTH)).text
    assert more.status_code == 429 and more.headers["retry-after"] == "1", more.text
    assert real.status_code == 202, real.text
    assert cut.status_code == 408 and cut.json()["error"] == "too_slow", cut.text
    assert "when its place was needed" in cut.json()["message"]
    assert api.status_code == 202 and last.status_code == 401
    assert metric(text, "signal_bridge_events_rejected_total", adapter="webhook", reason="too_slow") == 1


async def test_the_address_holding_most_of_the_unsigned_room_gives_way_not_the_oldest_request() -> None:
    """Cutting the oldest body let a churning sender cut a provider's slow delivery: it is the
    address holding most that gives way."""
    trickle = Trickle(b'{"x"}')

    app = make_app(FakeSink(), hook_config(max_concurrent_requests=6))  # room for 3 unsigned bodies
    clients = [in_loop_client(app, address=a) for a in ("198.51.100.7", "203.0.113.1", "203.0.113.2")]
    async with clients[0] as slow_provider, clients[1] as churner, clients[2] as newcomer:
        provider = asyncio.create_task(slow_provider.post(f"{HOOKS}/github", content=trickle.body()))
        await asyncio.sleep(0.05)
        churned = [asyncio.create_task(churner.post(f"{HOOKS}/github", content=trickle.body())) for _ in range(2)]
        await asyncio.sleep(0.05)
        new = asyncio.create_task(newcomer.post(f"{HOOKS}/github", content=trickle.body()))
        first_cut = await asyncio.wait_for(churned[0], 2)
        trickle.release.set()
        rest = await asyncio.gather(provider, churned[1], new)
    assert first_cut.status_code == 408
    assert [r.status_code for r in rest] == [401, 401, 401]  # the provider's request was read whole


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        ("64:ff9b::203.0.113.9", "203.0.113.9"),  # NAT64: every IPv4 client behind it shares the /64
        ("2002:cb00:7109::1", "2002:cb00:7109::/48"),  # 6to4: each IPv4 address has a /48
        ("::1", "::1"),
        ("testclient", "testclient"),
    ],
)
def test_an_ipv6_client_counts_by_its_64_network(host: str, key: str) -> None:
    """One IPv6 subscriber holds a /64: by address, it had 2**64 shares of the unsigned requests."""
    assert state.address_key(host) == key
