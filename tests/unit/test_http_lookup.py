"""``GET /api/v1/events/{id}`` under load from one token holder: each look-up asks Temporal's
visibility and describes a run per workflow entry, so it spends the token's rate limit as an event
does, and one process makes at most ``IN_FLIGHT`` of them at once."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar.testing import AsyncTestClient

from adapters.http import create_app, lookup
from bridge.pipeline import Pipeline
from bridge.snapshot import Snapshot
from tests.fakes import FakeSink
from tests.helpers import assert_eventually
from tests.unit.http_support import AUTH, OTHER_NAMED, TOKEN, in_loop_client, make_config

URL = "/api/v1/events/e-1"


def run(event_id: str, source: str) -> dict[str, Any]:
    return {
        "workflow_entry": "all",
        "workflow_id": f"all-{event_id}",
        "run_id": "r-1",
        "status": "running",
        "start_time": "2026-01-01T00:00:00Z",
        "close_time": None,
        "event_id": event_id,
        "event_name": "order.created",
        "source": source,
        "url": None,
    }


async def test_a_look_up_spends_the_tokens_rate_limit() -> None:
    calls = 0

    async def look_up(event_id: str, source: str) -> list[dict[str, Any]]:
        nonlocal calls
        calls += 1
        return [run(event_id, source)]

    snap = Snapshot.compile(make_config(rate_limit={"per_token": {"rate": 0.01, "burst": 2}}))
    app = create_app(Pipeline(snap.routes, FakeSink()), lambda: snap, lookup=look_up)
    async with AsyncTestClient(app) as c:
        codes = [(await c.get(URL, headers=AUTH)).status_code for _ in range(3)]
        refused = await c.get(URL, headers=AUTH)
    assert codes == [200, 200, 429] and calls == 2, "the third asked Temporal nothing"
    assert refused.json()["error"] == "rate_limited" and int(refused.headers["retry-after"]) >= 1


async def test_look_ups_past_the_ones_in_flight_are_refused_and_the_others_answer() -> None:
    gate, waiting = asyncio.Event(), 0

    async def look_up(event_id: str, source: str) -> list[dict[str, Any]]:
        nonlocal waiting
        waiting += 1
        await gate.wait()
        return [run(event_id, source)]

    snap = Snapshot.compile(make_config(tokens=[TOKEN, OTHER_NAMED]))
    app = create_app(Pipeline(snap.routes, FakeSink()), lambda: snap, lookup=look_up)
    async with in_loop_client(app) as c:
        held = [asyncio.create_task(c.get(f"{URL}{i}", headers=AUTH)) for i in range(lookup.IN_FLIGHT)]
        await assert_eventually(lambda: waiting == lookup.IN_FLIGHT, timeout=5, interval=0.01)
        extra = await c.get(URL, headers=AUTH)
        other = asyncio.create_task(c.get(URL, headers={"Authorization": "Bearer other-token"}))
        await assert_eventually(lambda: waiting == lookup.IN_FLIGHT + 1, timeout=5, interval=0.01)
        gate.set()
        answers = await asyncio.gather(*held)
        after = await c.get(URL, headers=AUTH)
        elsewhere = await other
    assert extra.status_code == 429 and extra.json()["error"] == "rate_limited"
    assert extra.headers["retry-after"] == "1"
    assert [a.status_code for a in answers] == [200] * lookup.IN_FLIGHT and after.status_code == 200
    assert elsewhere.status_code == 200, "another token's look-ups go on"


async def test_any_id_the_api_accepts_can_be_looked_up() -> None:
    """The path form takes an id without ``/`` of up to the 4,096 characters POST takes; the query
    form takes any id exactly, such as a CloudEvent's ``{source}#{id}`` with a URL for its source
    (a path is read with its empty segments dropped)."""
    asked: list[str] = []

    async def look_up(event_id: str, source: str) -> list[dict[str, Any]]:
        asked.append(event_id)
        return [run(event_id, source)]

    snap = Snapshot.compile(make_config())
    app = create_app(Pipeline(snap.routes, FakeSink()), lambda: snap, lookup=look_up)
    cloudevent = "https://shop.example/orders#ev-1?x=1 y"
    async with AsyncTestClient(app) as c:
        long = await c.get("/api/v1/events/" + "k" * 4096, headers=AUTH)
        too_long = await c.get("/api/v1/events/" + "k" * 4097, headers=AUTH)
        exact = await c.get("/api/v1/events", params={"id": cloudevent}, headers=AUTH)
        missing = await c.get("/api/v1/events", headers=AUTH)
        empty = await c.get("/api/v1/events", params={"id": ""}, headers=AUTH)
        unauthorized = await c.get("/api/v1/events", params={"id": "e-1"})
        unauthorized_without_id = await c.get("/api/v1/events")
    assert long.status_code == 200 and too_long.status_code == 404
    assert exact.status_code == 200 and exact.json()["event_id"] == cloudevent
    assert asked == ["k" * 4096, cloudevent], "nothing longer than an event id is asked of Temporal"
    assert missing.status_code == 400 and missing.json()["error"] == "malformed"
    assert empty.status_code == 400 and empty.json()["error"] == "malformed", "an empty id is no id (docs)"
    assert unauthorized.status_code == 401 and unauthorized_without_id.status_code == 401, "the token first"
