"""What the bodies of the requests in flight may hold in memory once parsed (http.max_parsed_bytes).

Parsed, a body of small lists holds 21 times its size: ``max_concurrent_requests`` bodies of 1 MiB
held 21 GiB while Temporal was slow, and one token holder's 250 about 5 GiB. Each body's memory is
now estimated before it is parsed (:func:`bridge.decode.parsed_weight`) and charged until it is
answered."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import socket
import tracemalloc
from typing import Any

import pytest
from uvicorn.server import ServerState

from adapters.http import create_app
from adapters.http.parse import CE_BATCH, parse
from adapters.http.request import trace_metadata
from adapters.http.state import HTTP_STATE, HttpState
from bridge.decode import parsed_weight
from bridge.event import EventSignal
from bridge.pipeline import Pipeline
from bridge.runtime.app import server_config
from bridge.runtime.http_protocol import HeadTimeoutProtocol
from bridge.snapshot import Snapshot
from tests.fakes import FakeSink
from tests.helpers import assert_eventually
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
    # Counted as the other 503 overloaded are: not refused for good
    assert metric(text, "signal_bridge_overloaded_total", adapter="http") == 1
    assert metric(text, "signal_bridge_overloaded_total", adapter="webhook") == 1
    assert metric(text, "signal_bridge_events_rejected_total", adapter="http", reason="overloaded") == 0


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
            await assert_eventually(lambda n=i + 1: len(sink.calls) == n, timeout=5, interval=0.01)
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


async def test_what_a_batchs_events_keep_beyond_its_body_is_charged_as_they_are_encoded() -> None:
    """Each event of a batch keeps the request's headers (five of up to 512 characters) and
    encodes them again: 1,000 small events with long headers held about 20 times what their
    body was charged, and a few requests held tens of MiB against a charge of 2."""
    sink = FakeSink()
    sink.release = asyncio.Event()
    snap = Snapshot.compile(config(max_parsed_bytes=8 * MIB))
    pipeline = Pipeline(snap.routes, sink)
    body = json.dumps([order()] * 1000).encode()
    assert parsed_weight(body, 1000) < 2 * MIB  # the body alone: four such requests would fit
    headers: dict[str, Any] = {**AUTH, "Content-Type": "application/json", **{h: b"\xe9" * 512 for h in KEPT}}
    async with in_loop_client(create_app(pipeline, snap)) as c:
        first = asyncio.create_task(c.post(URL, content=body, headers=headers))
        await asyncio.wait_for(sink.entered.wait(), 10)
        second = await asyncio.wait_for(c.post(URL, content=body, headers={**headers, **OTHER}), 5)
        sink.release.set()
        assert (await asyncio.wait_for(first, 10)).status_code == 202
    assert second.status_code == 503 and second.json()["error"] == "overloaded", second.text
    assert len(sink.events) == 1000  # the first request's; nothing of the second
    assert pipeline.metrics.child(pipeline.metrics.overloaded, "http")._value.get() == 1


@pytest.mark.parametrize("leaves", [False, True], ids=["read-late", "left-unread"])
async def test_a_batch_answer_stays_charged_until_the_client_has_read_it(leaves: bool) -> None:
    """A batch's answer holds each event's id: 1,000 events of 60 bytes, sent with an
    ``Idempotency-Key`` of 4,000 characters, are answered in 4 MB. Given back as the handler
    returned, each answer a client did not read held that much in the server's buffers past
    ``http.max_parsed_bytes``; now it is charged until the client read nearly all of it, or left.
    Served by the server the bridge runs (uvicorn, its protocol) over a socket pair."""
    sink = FakeSink()
    cfg = config(max_parsed_bytes=64 * MIB)
    snap = Snapshot.compile(cfg)
    app = create_app(Pipeline(snap.routes, sink), snap)
    http = app.state[HTTP_STATE]
    server = server_config(app, cfg.http)
    server.load()
    ours, theirs = socket.socketpair()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.connect_accepted_socket(
        lambda: HeadTimeoutProtocol(config=server, server_state=ServerState(), app_state={}), ours
    )
    body = json.dumps([order()] * 1000).encode()
    head = (
        f"POST {URL} HTTP/1.1\r\nHost: bridge\r\nAuthorization: {AUTH['Authorization']}\r\n"
        f"Content-Type: application/json\r\nIdempotency-Key: {'k' * 4000}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    await loop.sock_sendall(theirs, head + body)
    await assert_eventually(lambda: len(sink.events) == 1000, timeout=10, interval=0.01, what="the batch held")
    await asyncio.sleep(0.2)  # the answer is written as far as the socket takes it
    assert http._parsed > 4_000_000  # its answer, not read yet
    if leaves:
        theirs.close()
    else:
        answer = b""
        while not answer.endswith(b"}]}"):
            answer += await asyncio.wait_for(loop.sock_recv(theirs, 1 << 20), 10)
        head_part, _, text = answer.partition(b"\r\n\r\n")
        assert b" 202 " in head_part.split(b"\r\n")[0] and f"content-length: {len(text)}".encode() in head_part.lower()
        assert len(json.loads(text)["results"]) == 1000
    await assert_eventually(lambda: http._parsed == 0, timeout=10, interval=0.01, what="the charge given back")
    assert not http._parsed_of
    if not leaves:
        theirs.close()


def test_max_parsed_bytes_defaults_to_256_mib() -> None:
    assert make_config().http.max_parsed_bytes == 256 * MIB


def held_by(body: bytes, content_type: str, headers: dict[str, str] | None = None, key: str | None = None) -> int:
    """What parsing ``body`` into events and encoding each holds, with the body itself."""
    pipeline = Pipeline(Snapshot.compile(make_config()).routes, FakeSink())
    received = {"content-type": content_type, **(headers or {})}
    gc.collect()
    tracemalloc.start()
    try:
        meta = trace_metadata(received)
        parsed = parse(received, body, meta, key, max_batch=1000, scope="http:t")
        events = [e for e in (parsed if isinstance(parsed, list) else [parsed]) if isinstance(e, EventSignal)]
        encodings = [data for e in events if (data := pipeline.examine(e)[1])]
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(encodings) == len(events) > 0, "every event routable: its encoding is what it holds"
    del parsed, events, encodings, meta
    return held + len(body)


def charged(body: bytes, content_type: str, headers: dict[str, str] | None = None, key: str | None = None) -> int:
    """What HttpState.parsing charges for ``body`` once its events are encoded."""
    snap = Snapshot.compile(make_config(max_body_bytes=MIB))
    pipeline = Pipeline(snap.routes, FakeSink())
    state = HttpState(pipeline, lambda: snap)
    received = {"content-type": content_type, **(headers or {})}
    with state.parsing(snap, "http", "http:t", body) as weighed:
        parsed = parse(received, body, trace_metadata(received), key, max_batch=1000, scope="http:t")
        for e in parsed if isinstance(parsed, list) else [parsed]:
            if isinstance(e, EventSignal):
                weighed.encoded(pipeline.examine(e)[1])
        return weighed.weight


def dump(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def shipped(**payload: Any) -> dict[str, Any]:
    return {"name": "order.shipped", "payload": payload}


def ce_base64(event_id: str, data: bytes) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "/s",
        "type": "order.shipped",
        "datacontenttype": "application/json",
        "data_base64": base64.b64encode(data).decode(),
    }


KEPT = ("traceparent", "tracestate", "x-request-id", "x-correlation-id", "user-agent")
SHAPES: dict[str, tuple[bytes, str, dict[str, str], str | None]] = {
    "empty lists": (dump(shipped(items=[[]] * 80_000)), "application/json", {}, None),
    "empty objects": (dump(shipped(items=[{}] * 80_000)), "application/json", {}, None),
    "short strings": (dump(shipped(items=["ab"] * 50_000)), "application/json", {}, None),
    "one CJK character each": (dump(shipped(items=["\u4e00"] * 40_000)), "application/json", {}, None),
    "one emoji each": (dump(shipped(items=["\U0001f600"] * 40_000)), "application/json", {}, None),
    "ASCII and one emoji": (dump(shipped(text="x" * 250_000 + "\U0001f600")), "application/json", {}, None),
    "small objects": (dump(shipped(items=[{"ab": "cd"}] * 25_000)), "application/json", {}, None),
    "floats": (dump(shipped(items=[1.5] * 60_000)), "application/json", {}, None),
    "distinct keys": (dump(shipped(**{f"k{i}": i for i in range(25_000)})), "application/json", {}, None),
    "one long string": (dump(shipped(text="x" * 250_000)), "application/json", {}, None),
    "a batch of bare events": (dump([{"name": "order.shipped"}] * 1000), "application/json", {}, None),
    "a batch of events": (dump([{**order(), "id": str(i)} for i in range(1000)]), "application/json", {}, None),
    "a batch keeping long headers": (
        dump([{"name": "order.shipped"}] * 1000),
        "application/json",
        {h: "\xe9" * 512 for h in KEPT},
        None,
    ),
    "a batch with a long key": (dump([{"name": "order.shipped"}] * 1000), "application/json", {}, "\xe9" * 4000),
    "a CloudEvent of base64 JSON": (
        dump(ce_base64("1", dump([{}] * 80_000))),
        "application/cloudevents+json",
        {},
        None,
    ),
    "a CloudEvents batch of base64 JSON": (
        dump([ce_base64(str(i), dump([{}] * 80)) for i in range(1000)]),
        CE_BATCH,
        {},
        None,
    ),
    "a CloudEvents batch of base64 JSON, its key escaped": (
        dump([ce_base64(str(i), dump([{}] * 80)) for i in range(1000)]).replace(
            b'"data_base64"', b'"data\\u005fbase64"'
        ),
        CE_BATCH,
        {},
        None,
    ),
    "a CloudEvents batch": (
        dump([{"specversion": "1.0", "id": str(i), "source": "/s", "type": "order.shipped"} for i in range(1000)]),
        CE_BATCH,
        {},
        None,
    ),
}


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_what_a_body_is_charged_is_at_least_what_it_holds_parsed_and_encoded(shape: str) -> None:
    body, content_type, headers, key = SHAPES[shape]
    assert len(body) <= MIB
    assert held_by(body, content_type, headers, key) <= charged(body, content_type, headers, key)


def test_a_body_that_only_names_data_base64_is_weighed_as_any_other() -> None:
    """Any body holding the text ``data_base64`` weighed 64 times its size, as if it hid JSON: a
    1 MiB batch of envelopes was charged 61 MiB, and a token's fourth such request refused."""
    body = dump([{**order(note="data_base64"), "id": str(i)} for i in range(1000)])
    assert charged(body, "application/json") == charged(
        body.replace(b"data_base64", b"data_base65"), "application/json"
    )


@pytest.mark.parametrize("key", [b'"data_base64"', b'"data\\u005fbase64"'], ids=["key", "key-escaped"])
def test_json_a_batch_hides_in_base64_is_charged_as_it_is_decoded_before_any_event_is_encoded(key: bytes) -> None:
    """A batch's events are all parsed before the first is encoded: base64 JSON decoded in them
    was held uncharged while the loop went on to other requests (a 0.9 MiB body held 18 MiB
    charged 2.9), and the body's bytes could not say so when the key was escaped."""
    body = dump([ce_base64(str(i), dump([{}] * 200)) for i in range(1000)]).replace(b'"data_base64"', key)
    snap = Snapshot.compile(make_config(max_body_bytes=MIB))
    state = HttpState(Pipeline(snap.routes, FakeSink()), lambda: snap)
    with state.parsing(snap, "http", "http:t", body) as weighed:
        gc.collect()
        tracemalloc.start()
        try:
            parsed = parse({"content-type": CE_BATCH}, body, {"headers": {}}, None, max_batch=1000, scope="http:t")
            held = tracemalloc.get_traced_memory()[0] + 3 * len(body)  # with the body, and room for encodings
        finally:
            tracemalloc.stop()
        assert len(parsed) == 1000 and all(isinstance(e, EventSignal) for e in parsed)
        assert held <= weighed.weight


async def test_a_batch_refused_for_the_json_it_hides_is_503_not_malformed() -> None:
    sink = FakeSink()
    sink.release = asyncio.Event()
    snap = Snapshot.compile(config())
    pipeline = Pipeline(snap.routes, sink)
    body = dump([{**ce_base64(str(i), dump([{}] * 100)), "type": "order.created"} for i in range(100)])
    assert weight(lists("big", 2000)) + parsed_weight(body, 1000) < MIB  # by their bodies, both fit
    async with in_loop_client(create_app(pipeline, snap)) as c:
        held = asyncio.create_task(c.post(URL, json=lists("big", 2000), headers=AUTH))
        await asyncio.wait_for(sink.entered.wait(), 10)
        hiding = await c.post(URL, content=body, headers={**OTHER, "Content-Type": CE_BATCH})
        sink.release.set()
        assert (await asyncio.wait_for(held, 10)).status_code == 202
    assert hiding.status_code == 503 and hiding.json()["error"] == "overloaded", hiding.text
    assert [e.id for e in sink.events] == ["big"]
