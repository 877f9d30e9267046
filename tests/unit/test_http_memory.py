"""What the bodies of the requests in flight may hold in memory once parsed (http.max_parsed_bytes).

Parsed, a body of small lists holds 21 times its size: ``max_concurrent_requests`` bodies of 1 MiB
held 21 GiB while Temporal was slow, and one token holder's 250 about 5 GiB. Each body's memory is
now estimated before it is parsed (:func:`bridge.decode.parsed_weight`) and charged until it is
answered."""

from __future__ import annotations

import asyncio
import gc
import json
import tracemalloc
from typing import Any

import pytest

from adapters.http import create_app
from adapters.http.parse import CE_BATCH, parse
from bridge.decode import parsed_weight
from bridge.pipeline import Pipeline
from bridge.snapshot import Snapshot
from tests.fakes import FakeSink
from tests.unit.http_support import AUTH, URL, hook_config, in_loop_client, make_config, order

MIB = 1024 * 1024
OTHER = {"Authorization": "Bearer other-token"}


def lists(event_id: str, n: int) -> dict[str, Any]:
    """An event whose payload is ``n`` empty lists: about 3 bytes of JSON each, 64 held."""
    return {**order(items=[[]] * n), "id": event_id}


def weight(event: Any) -> int:
    return parsed_weight(json.dumps(event).encode(), 1000)


def config(**http: Any) -> Any:
    cfg = hook_config([{"slug": "open", "verify": {"kind": "none"}, "events": [{"name": "open.event"}]}])
    return cfg.model_copy(
        update={"http": cfg.http.model_copy(update={"max_body_bytes": MIB, "max_parsed_bytes": MIB, **http})}
    )


def metric(text: str, name: str, **labels: str) -> float:
    want = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "} "
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(want)), 0.0)


async def test_past_max_parsed_bytes_a_body_is_503_unparsed_and_smaller_ones_go_on() -> None:
    sink = FakeSink()
    sink.release = asyncio.Event()
    snap = Snapshot.compile(config(retry_after_seconds=4))
    pipeline = Pipeline(snap.routes, sink)
    big = lists("big", 4000)
    assert 0.5 * MIB < weight(big) < MIB  # two do not fit together
    async with in_loop_client(create_app(pipeline, snap)) as c:
        held = asyncio.create_task(c.post(URL, json=big, headers=AUTH))
        await asyncio.wait_for(sink.entered.wait(), 10)
        refused = await asyncio.wait_for(c.post(URL, json=lists("second", 4000), headers=OTHER), 5)
        hook = await asyncio.wait_for(c.post("/api/v1/hooks/open", json={"items": [[]] * 4000}), 5)
        small = asyncio.create_task(c.post(URL, json={**order(), "id": "small"}, headers=OTHER))
        await asyncio.sleep(0.1)
        sink.release.set()
        answers = await asyncio.wait_for(asyncio.gather(held, small), 10)
        again = await c.post(URL, json=lists("second", 4000), headers=OTHER)
        text = (await c.get("/metrics", headers=AUTH)).text
    for resp in (refused, hook):
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"] == "overloaded" and resp.headers["Retry-After"] == "4"
        assert "memory" in resp.json()["message"]
    assert [a.status_code for a in answers] == [202, 202]
    assert again.status_code == 202, again.text
    assert [e.id for e in sink.events] == ["big", "small", "second"]
    assert metric(text, "signal_bridge_events_rejected_total", adapter="http", reason="overloaded") == 1
    assert metric(text, "signal_bridge_events_rejected_total", adapter="webhook", reason="overloaded") == 1


async def test_one_token_holds_at_most_its_share_while_another_is_left_room() -> None:
    """A token may hold three quarters of the room alone; past a quarter, a body that would leave
    the others less than a quarter is 429, and another token's body is taken."""
    sink = FakeSink()
    sink.release = asyncio.Event()
    snap = Snapshot.compile(config())
    pipeline = Pipeline(snap.routes, sink)
    assert 0.2 * MIB < weight(lists("x", 1150)) < 0.25 * MIB
    async with in_loop_client(create_app(pipeline, snap)) as c:
        held = []
        for i in range(3):  # about 0.7 MiB of 1, from one token
            held.append(asyncio.create_task(c.post(URL, json=lists(f"h{i}", 1150), headers=AUTH)))
            await asyncio.sleep(0.05)
        await asyncio.wait_for(sink.entered.wait(), 10)
        over = await asyncio.wait_for(c.post(URL, json=lists("over", 1150), headers=AUTH), 5)
        other = asyncio.create_task(c.post(URL, json=lists("other", 1150), headers=OTHER))
        await asyncio.sleep(0.1)
        sink.release.set()
        answers = await asyncio.wait_for(asyncio.gather(*held, other), 10)
    assert over.status_code == 429, over.text
    assert over.json()["error"] == "rate_limited" and "share of memory" in over.json()["message"]
    assert [a.status_code for a in answers] == [202] * 4, [a.text for a in answers]
    assert sorted(e.id for e in sink.events) == ["h0", "h1", "h2", "other"]


async def test_one_body_alone_goes_whatever_it_weighs() -> None:
    """A body heavier than all of max_parsed_bytes is taken when nothing else is held: it would
    otherwise never be."""
    sink = FakeSink()
    snap = Snapshot.compile(config())
    event = lists("heavy", 20_000)
    assert weight(event) > MIB
    async with in_loop_client(create_app(Pipeline(snap.routes, sink), snap)) as c:
        resp = await c.post(URL, json=event, headers=AUTH)
    assert resp.status_code == 202, resp.text
    assert [e.id for e in sink.events] == ["heavy"]


def test_max_parsed_bytes_defaults_to_256_mib() -> None:
    assert make_config().http.max_parsed_bytes == 256 * MIB


def held_by(body: bytes, content_type: str) -> int:
    """What parsing ``body`` into events and encoding each holds, with the body itself."""
    pipeline = Pipeline(Snapshot.compile(make_config()).routes, FakeSink())
    gc.collect()
    tracemalloc.start()
    try:
        parsed = parse({"content-type": content_type}, body, {"headers": {}}, None, max_batch=1000, scope="http:t")
        events = parsed if isinstance(parsed, list) else [parsed]
        encodings = [pipeline.examine(e)[1] for e in events if not isinstance(e, Exception)]
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del parsed, events, encodings
    return held + len(body)


SHAPES = {
    "empty lists": order(items=[[]] * 80_000),
    "empty objects": order(items=[{}] * 80_000),
    "short strings": order(items=["ab"] * 50_000),
    "one CJK character each": order(items=["\u4e00"] * 40_000),
    "one emoji each": order(items=["\U0001f600"] * 40_000),
    "small objects": order(items=[{"ab": "cd"}] * 25_000),
    "floats": order(items=[1.5] * 60_000),
    "distinct keys": order(**{f"k{i}": i for i in range(25_000)}),
    "one long string": order(text="x" * 250_000),
    "a batch of bare events": [{"name": "o"} for _ in range(1000)],
    "a batch of events": [{**order(), "id": str(i)} for i in range(1000)],
}


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_a_bodys_weight_is_at_least_what_it_holds_parsed(shape: str) -> None:
    body = json.dumps(SHAPES[shape], ensure_ascii=False, separators=(",", ":")).encode()
    assert held_by(body, "application/json") <= parsed_weight(body, 1000)


def test_a_cloudevents_batchs_weight_is_at_least_what_it_holds_parsed() -> None:
    batch = [{"specversion": "1.0", "id": str(i), "source": "/s", "type": "t", "data": {}} for i in range(1000)]
    body = json.dumps(batch, separators=(",", ":")).encode()
    assert held_by(body, CE_BATCH) <= parsed_weight(body, 1000)
