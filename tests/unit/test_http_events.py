"""The events API (POST /api/v1/events) against the shared in-memory sink: status codes, ids,
auth, body limits, batches, CloudEvents and the per-token rate limit."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, cast

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from adapters.http import create_app
from adapters.http.events import as_utf8, authorize
from adapters.http.problems import Problem
from adapters.http.state import HttpState
from bridge.errors import Unavailable
from bridge.metrics import Metrics
from bridge.pipeline import Pipeline
from bridge.snapshot import Snapshot
from dispatcher.client import DispatcherClient
from dispatcher.contract import MAX_SIGNAL_EVENTS
from tests.fakes import FakeSink
from tests.unit.http_support import (
    AUTH,
    MAX_BODY,
    OTHER_NAMED,
    SLOW,
    TOKEN,
    URL,
    big_body,
    chunks,
    hook_config,
    in_loop_client,
    make_app,
    make_config,
    order,
)
from tests.unit.test_dispatcher_client import FakeTemporal

# --- accepted ------------------------------------------------------------------------------


async def test_accepted_after_the_sink_returned(sink: FakeSink) -> None:
    sink.release = asyncio.Event()
    async with in_loop_client(make_app(sink)) as c:
        request = asyncio.create_task(c.post(URL, json={**order(amount=5), "id": "evt-1"}, headers=AUTH))
        await asyncio.wait_for(sink.entered.wait(), 10)
        await asyncio.sleep(0)  # let the handler run on, should it not wait for the sink
        assert not request.done()
        assert sink.events == []
        sink.release.set()
        resp = await asyncio.wait_for(request, 10)
    assert resp.status_code == 202
    assert resp.json()["event_id"] == "evt-1"
    [event] = sink.events
    assert (event.id, event.name, event.source) == ("evt-1", "order.created", "http:token-1")
    assert event.payload == {"orderId": "A1", "amount": 5}


async def test_trace_headers_kept_and_authorization_is_not(sink: FakeSink, client: AsyncTestClient[Litestar]) -> None:
    headers = {**AUTH, "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    assert (await client.post(URL, json=order(), headers=headers)).status_code == 202
    meta = sink.events[0].metadata
    assert meta["traceparent"] == headers["traceparent"]
    assert TOKEN not in json.dumps(meta)


# --- 400 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{not json", "malformed"),
        (b"[1, 2]", "malformed"),
        (b'{"payload": {"orderId": "A1"}}', "no_name"),
        (b'{"name": "", "payload": {}}', "no_name"),
        (b'{"name": 7, "payload": {}}', "no_name"),
        (b'{"name": "order.created", "payload": [1]}', "malformed"),
        (b'{"name": "order.created", "payload": "x"}', "malformed"),
    ],
)
async def test_bad_body_is_400(sink: FakeSink, client: AsyncTestClient[Litestar], body: bytes, error: str) -> None:
    resp = await client.post(URL, content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert resp.status_code == 400
    assert resp.json()["error"] == error
    assert sink.events == []


# --- 401 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"}],
    ids=["missing", "wrong-token", "wrong-scheme", "empty-token"],
)
async def test_unauthorized(sink: FakeSink, client: AsyncTestClient[Litestar], headers: dict[str, str]) -> None:
    resp = await client.post(URL, json=order(), headers=headers)
    assert resp.status_code == 401
    assert resp.json()["error"] == "unauthorized"
    assert sink.events == []


async def test_scheme_is_case_insensitive(client: AsyncTestClient[Litestar]) -> None:
    resp = await client.post(URL, json=order(), headers={"Authorization": f"bearer {TOKEN}"})
    assert resp.status_code == 202


async def test_insecure_without_tokens_accepts(sink: FakeSink) -> None:
    async with AsyncTestClient(make_app(sink, make_config(tokens=[]), insecure=True)) as c:
        assert (await c.post(URL, json=order())).status_code == 202
    assert len(sink.events) == 1


async def test_no_tokens_and_not_insecure_refuses(sink: FakeSink) -> None:
    async with AsyncTestClient(make_app(sink, make_config(tokens=[]))) as c:
        assert (await c.post(URL, json=order(), headers={"Authorization": "Bearer "})).status_code == 401


async def test_insecure_does_not_disable_configured_tokens(sink: FakeSink) -> None:
    async with AsyncTestClient(make_app(sink, insecure=True)) as c:
        assert (await c.post(URL, json=order())).status_code == 401
        assert (await c.post(URL, json=order(), headers=AUTH)).status_code == 202


# --- 413 -----------------------------------------------------------------------------------


async def test_body_over_limit_with_content_length_is_413(sink: FakeSink, client: AsyncTestClient[Litestar]) -> None:
    resp = await client.post(URL, content=big_body(), headers={**AUTH, "Content-Type": "application/json"})
    assert resp.status_code == 413
    assert resp.json()["error"] == "too_large"
    assert sink.events == []


async def test_body_just_under_limit_is_accepted(client: AsyncTestClient[Litestar]) -> None:
    body = json.dumps(order(pad="")).encode()
    body = json.dumps(order(pad="x" * (MAX_BODY - len(body)))).encode()
    assert len(body) == MAX_BODY
    assert (await client.post(URL, content=body, headers=AUTH)).status_code == 202


async def test_chunked_body_over_limit_is_413(sink: FakeSink) -> None:
    async with in_loop_client(make_app(sink)) as c:
        resp = await c.post(URL, content=chunks(big_body()), headers=AUTH)
    assert resp.request.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in resp.request.headers
    assert resp.status_code == 413
    assert resp.json()["error"] == "too_large"
    assert sink.events == []


async def test_chunked_body_under_limit_is_accepted(sink: FakeSink) -> None:
    async with in_loop_client(make_app(sink)) as c:
        resp = await c.post(URL, content=chunks(json.dumps(order()).encode(), 10), headers=AUTH)
    assert resp.status_code == 202, resp.text
    assert len(sink.events) == 1


# --- 422 -----------------------------------------------------------------------------------


async def test_schema_violation_is_422_naming_workflow_and_schema_path(
    sink: FakeSink, client: AsyncTestClient[Litestar]
) -> None:
    resp = await client.post(URL, json={"name": "order.created", "payload": {"orderId": 42}}, headers=AUTH)
    assert resp.status_code == 422
    body = resp.json()
    assert body["error"] == "schema_invalid"
    assert body["workflow"] == "process-order"
    assert body["schema_path"] == "properties/orderId/type"
    assert sink.events == []


async def test_unknown_name_is_422_and_nothing_submitted(sink: FakeSink, client: AsyncTestClient[Litestar]) -> None:
    resp = await client.post(URL, json={"name": "user.created", "payload": {}}, headers=AUTH)
    assert resp.status_code == 422
    assert resp.json()["error"] == "unroutable"
    assert sink.entered.is_set() is False
    assert sink.events == []


# --- 503 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("hint", [12, 1], ids=["client-hint-above", "client-hint-below"])
async def test_sink_unavailable_is_503_with_the_configured_retry_after(sink: FakeSink, hint: float) -> None:
    """Retry-After is http.retry_after_seconds, whatever the dispatcher client's own hint (5 s by default)."""
    sink.unavailable = Unavailable("temporal down", retry_after=hint)
    async with AsyncTestClient(make_app(sink, make_config(retry_after_seconds=3))) as c:
        resp = await c.post(URL, json={**order(), "id": "evt-503"}, headers=AUTH)
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "3"
    assert resp.json()["error"] == "unavailable"
    assert resp.json()["event_id"] == "evt-503"


async def test_retry_after_follows_the_configured_value_below_the_client_default(sink: FakeSink) -> None:
    sink.unavailable = Unavailable("temporal down")  # the client's built-in 5 s
    async with AsyncTestClient(make_app(sink, make_config(retry_after_seconds=1))) as c:
        resp = await c.post(URL, json=order(), headers=AUTH)
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "1"


# --- event ids -----------------------------------------------------------------------------


async def test_idempotency_key_wins_over_body_id(sink: FakeSink, client: AsyncTestClient[Litestar]) -> None:
    resp = await client.post(URL, json={**order(), "id": "body-id"}, headers={**AUTH, "Idempotency-Key": "hdr"})
    assert resp.json()["event_id"] == "hdr"
    assert sink.events[0].id == "hdr"


async def test_body_id_wins_over_generated(sink: FakeSink, client: AsyncTestClient[Litestar]) -> None:
    resp = await client.post(URL, json={**order(), "id": 123}, headers=AUTH)
    assert resp.json()["event_id"] == "123"
    assert sink.events[0].id == "123"


async def test_an_integral_number_id_is_the_integer_and_a_fraction_is_refused(
    sink: FakeSink, client: AsyncTestClient[Litestar]
) -> None:
    """JSON has one kind of number: 123.0 is the integer the schema allows, and the same event as
    123; 1.5 is no id."""
    resp = await client.post(URL, json={**order(), "id": 123.0}, headers=AUTH)
    assert resp.status_code == 202 and resp.json()["event_id"] == "123"
    resp = await client.post(URL, json={**order(), "id": 1.5}, headers=AUTH)
    assert resp.status_code == 400 and resp.json()["error"] == "malformed"
    assert [e.id for e in sink.events] == ["123"]


async def test_generated_id_is_a_fresh_uuid(sink: FakeSink, client: AsyncTestClient[Litestar]) -> None:
    first = (await client.post(URL, json=order(), headers=AUTH)).json()["event_id"]
    second = (await client.post(URL, json=order(), headers=AUTH)).json()["event_id"]
    assert uuid.UUID(first) and uuid.UUID(second)
    assert first != second
    assert [e.id for e in sink.events] == [first, second]


# --- CloudEvents (DESIGN: the events API takes HTTP structured and binary mode) ------------


async def test_structured_cloudevent_is_accepted(sink: FakeSink, client: AsyncTestClient[Litestar]) -> None:
    body = {
        "specversion": "1.0",
        "id": "ce-1",
        "source": "/shop",
        "type": "order.created",
        "data": {"orderId": "A1"},
    }
    headers = {**AUTH, "Content-Type": "application/cloudevents+json"}
    resp = await client.post(URL, content=json.dumps(body).encode(), headers=headers)
    assert resp.status_code == 202, resp.text
    [event] = sink.events
    # The CloudEvent's source is part of its id; the scope is the token's, never the sender's.
    assert (event.id, event.name, event.source) == ("/shop#ce-1", "order.created", "http:token-1")
    assert event.metadata["cloudevents"]["source"] == "/shop"
    assert event.payload == {"orderId": "A1"}


async def test_binary_cloudevent_is_accepted(sink: FakeSink, client: AsyncTestClient[Litestar]) -> None:
    headers = {
        **AUTH,
        "Content-Type": "application/json",
        "ce-specversion": "1.0",
        "ce-id": "ce-2",
        "ce-source": "/shop",
        "ce-type": "order.created",
    }
    resp = await client.post(URL, json={"orderId": "A2"}, headers=headers)
    assert resp.status_code == 202, resp.text
    [event] = sink.events
    assert (event.id, event.name, event.source) == ("/shop#ce-2", "order.created", "http:token-1")
    assert event.payload == {"orderId": "A2"}


async def test_binary_cloudevent_ids_of_bytes_that_are_no_utf8_stay_apart(
    sink: FakeSink, client: AsyncTestClient[Litestar]
) -> None:
    """``batch-%FF`` and ``batch-%FE`` were both ``batch-\ufffd``: one id, and the second event
    started nothing."""
    for ce_id in ("batch-%FF", "batch-%FE"):
        headers = {**AUTH, "ce-specversion": "1.0", "ce-id": ce_id, "ce-source": "/shop", "ce-type": "order.created"}
        assert (await client.post(URL, json={"orderId": "A2"}, headers=headers)).status_code == 202
    assert [e.id for e in sink.events] == ["/shop#batch-\\xff", "/shop#batch-\\xfe"]


async def test_binary_cloudevent_content_type_is_its_datacontenttype(
    sink: FakeSink, client: AsyncTestClient[Litestar]
) -> None:
    """CloudEvents HTTP binding: in binary mode the Content-Type is the datacontenttype, so a
    non-JSON body is kept (base64), never refused or dropped."""
    ce = {"ce-specversion": "1.0", "ce-id": "ce-3", "ce-source": "/shop", "ce-type": "order.shipped"}
    resp = await client.post(URL, content=b"hello", headers={**AUTH, **ce, "Content-Type": "text/plain"})
    assert resp.status_code == 202, resp.text
    assert sink.events[0].payload == {"data_base64": "aGVsbG8=", "datacontenttype": "text/plain"}


# --- batches: a JSON array of envelopes ----------------------------------------------------


async def test_envelope_batch_answers_per_event(sink: FakeSink, client: AsyncTestClient[Litestar]) -> None:
    batch = [{**order(), "id": "b-1"}, {"name": "order.shipped", "payload": {"n": 2}, "id": "b-2"}]
    resp = await client.post(URL, json=batch, headers=AUTH)
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert (body["status"], body["accepted"], body["rejected"]) == ("accepted", 2, 0)
    assert body["results"] == [
        {"index": 0, "status": 202, "event_id": "b-1", "name": "order.created"},
        {"index": 1, "status": 202, "event_id": "b-2", "name": "order.shipped"},
    ]
    assert [(e.id, e.name, e.source) for e in sink.events] == [
        ("b-1", "order.created", "http:token-1"),
        ("b-2", "order.shipped", "http:token-1"),
    ]


async def test_envelope_batch_ids_from_idempotency_key_and_index(
    sink: FakeSink, client: AsyncTestClient[Litestar]
) -> None:
    batch = [order(), {**order(), "id": "own"}, order()]
    for _ in range(2):  # the same batch retried: the same ids, so nothing starts twice
        resp = await client.post(URL, json=batch, headers={**AUTH, "Idempotency-Key": "k"})
        assert [r["event_id"] for r in resp.json()["results"]] == ["k:0", "own", "k:2"]
    assert [e.id for e in sink.events] == ["k:0", "own", "k:2"] * 2


async def test_envelope_batch_without_key_gets_fresh_ids(client: AsyncTestClient[Litestar]) -> None:
    resp = await client.post(URL, json=[order(), order()], headers=AUTH)
    first, second = (r["event_id"] for r in resp.json()["results"])
    assert uuid.UUID(first) and uuid.UUID(second) and first != second


async def test_mixed_batch_is_207_and_only_good_events_are_submitted(
    sink: FakeSink, client: AsyncTestClient[Litestar]
) -> None:
    batch = [
        {**order(), "id": "good"},
        {"name": "nobody.listens", "payload": {}, "id": "lost"},
        {"payload": {"orderId": "A1"}},
        {"name": "order.created", "payload": {"orderId": 7}, "id": "typed"},
    ]
    resp = await client.post(URL, json=batch, headers=AUTH)
    assert resp.status_code == 207, resp.text
    body = resp.json()
    assert (body["status"], body["accepted"], body["rejected"]) == ("partial", 1, 3)
    statuses = [(r["index"], r["status"], r.get("error")) for r in body["results"]]
    assert statuses == [(0, 202, None), (1, 422, "unroutable"), (2, 400, "no_name"), (3, 422, "schema_invalid")]
    assert body["results"][3]["workflow"] == "process-order"
    assert [e.id for e in sink.events] == ["good"]


async def test_batch_of_only_refused_events_is_207_rejected(sink: FakeSink, client: AsyncTestClient[Litestar]) -> None:
    resp = await client.post(URL, json=[{"name": "nobody.listens"}], headers=AUTH)
    assert resp.status_code == 207
    assert resp.json()["status"] == "rejected"
    assert sink.entered.is_set() is False


async def test_empty_batch_is_accepted_and_submits_nothing(sink: FakeSink, client: AsyncTestClient[Litestar]) -> None:
    resp = await client.post(URL, json=[], headers=AUTH)
    assert resp.status_code == 202
    assert resp.json()["results"] == []
    assert sink.entered.is_set() is False


async def test_batch_unavailable_is_503_for_the_whole_batch(sink: FakeSink) -> None:
    sink.unavailable = Unavailable("temporal down", retry_after=9)
    async with AsyncTestClient(make_app(sink, make_config(retry_after_seconds=4))) as c:
        resp = await c.post(URL, json=[{**order(), "id": "x1"}, {**order(), "id": "x2"}], headers=AUTH)
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "4"
    assert resp.json()["event_ids"] == ["x1", "x2"]


async def test_batch_needs_the_bearer_token(sink: FakeSink, client: AsyncTestClient[Litestar]) -> None:
    assert (await client.post(URL, json=[order()])).status_code == 401
    assert sink.events == []


# --- CloudEvents made by the official SDK (cloudevents 2.x) ---------------------------------


def sdk_event(event_id: str, source: str = "/shop", type_: str = "order.created", **data: Any) -> Any:
    from cloudevents.core.v1.event import CloudEvent

    return CloudEvent({"id": event_id, "source": source, "type": type_}, {"orderId": "A1", **data})


def v2_binary(event_id: str, source: str) -> tuple[dict[str, str], bytes]:
    from cloudevents.core.bindings.http import to_binary_event

    msg = to_binary_event(sdk_event(event_id, source))
    return msg.headers, msg.body


def v2_structured(event_id: str, source: str) -> tuple[dict[str, str], bytes]:
    from cloudevents.core.bindings.http import to_structured_event

    msg = to_structured_event(sdk_event(event_id, source))
    return msg.headers, msg.body


def v1_binary(event_id: str, source: str) -> tuple[dict[str, str], bytes]:
    from cloudevents.v1.conversion import to_binary
    from cloudevents.v1.http import CloudEvent

    headers, body = to_binary(
        CloudEvent({"id": event_id, "source": source, "type": "order.created"}, {"orderId": "A1"})
    )
    return dict(headers), body


def v1_structured(event_id: str, source: str) -> tuple[dict[str, str], bytes]:
    from cloudevents.v1.conversion import to_structured
    from cloudevents.v1.http import CloudEvent

    event = CloudEvent({"id": event_id, "source": source, "type": "order.created"}, {"orderId": "A1"})
    headers, body = to_structured(event)
    return dict(headers), body


@pytest.mark.parametrize("encode", [v2_binary, v2_structured, v1_binary, v1_structured])
async def test_sdk_cloudevent_is_accepted(sink: FakeSink, client: AsyncTestClient[Litestar], encode: Any) -> None:
    headers, body = encode("ce-42", "/shop floor/1")  # a space: percent-encoded in binary mode
    resp = await client.post(URL, content=body, headers={**AUTH, **headers})
    assert resp.status_code == 202, resp.text
    assert resp.json()["event_id"] == "/shop floor/1#ce-42"
    [event] = sink.events
    assert (event.id, event.name, event.source) == ("/shop floor/1#ce-42", "order.created", "http:token-1")
    assert event.metadata["cloudevents"]["source"] == "/shop floor/1"
    assert event.payload == {"orderId": "A1"}
    assert event.metadata["cloudevents"]["specversion"] == "1.0"


def sdk_batch(*events: Any) -> bytes:
    """The SDK has no batch writer: its structured JSON for each event, in a JSON array
    (CloudEvents JSON format, section 4: ``application/cloudevents-batch+json``)."""
    from cloudevents.core.formats.json import JSONFormat

    fmt = JSONFormat()
    return b"[" + b",".join(fmt.write(e) for e in events) + b"]"


CE_BATCH_HEADERS = {**AUTH, "Content-Type": "application/cloudevents-batch+json"}


async def test_sdk_cloudevents_batch_answers_per_event(sink: FakeSink, client: AsyncTestClient[Litestar]) -> None:
    body = sdk_batch(sdk_event("1", "/a"), sdk_event("1", "/b"), sdk_event("2", "/a", "order.shipped", n=3))
    resp = await client.post(URL, content=body, headers=CE_BATCH_HEADERS)
    assert resp.status_code == 202, resp.text
    assert [(r["index"], r["status"], r["event_id"]) for r in resp.json()["results"]] == [
        (0, 202, "/a#1"),
        (1, 202, "/b#1"),
        (2, 202, "/a#2"),
    ]
    assert [(e.source, e.id, e.name) for e in sink.events] == [
        ("http:token-1", "/a#1", "order.created"),
        ("http:token-1", "/b#1", "order.created"),
        ("http:token-1", "/a#2", "order.shipped"),
    ]
    assert len({(e.source, e.id) for e in sink.events}) == 3  # same id, other source: another event
    assert sink.events[2].payload == {"orderId": "A1", "n": 3}


async def test_cloudevents_batch_with_a_bad_event_is_207(sink: FakeSink, client: AsyncTestClient[Litestar]) -> None:
    good = json.loads(sdk_batch(sdk_event("g")))[0]
    bad = {k: v for k, v in good.items() if k != "type"}
    body = json.dumps([good, bad, {**good, "id": "u", "type": "nobody.listens"}]).encode()
    resp = await client.post(URL, content=body, headers=CE_BATCH_HEADERS)
    assert resp.status_code == 207
    results = resp.json()["results"]
    assert [(r["status"], r.get("error")) for r in results] == [(202, None), (400, "malformed"), (422, "unroutable")]
    assert "type" in results[1]["message"]
    assert [e.id for e in sink.events] == ["/shop#g"]


async def test_a_cloudevents_batch_is_parsed_once_not_item_by_item_again(
    sink: FakeSink, client: AsyncTestClient[Litestar], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each item is decoded from the parsed array: not encoded to JSON and parsed once more (about
    0.3 ms per item before). The data of an item still goes through the data checks."""
    import bridge.decode

    parsed: list[bytes] = []
    real = bridge.decode.parse_json

    def counted(body: bytes) -> Any:
        parsed.append(body)
        return real(body)

    monkeypatch.setattr(bridge.decode, "parse_json", counted)
    monkeypatch.setattr("adapters.http.parse.parse_json", counted)
    body = sdk_batch(*(sdk_event(str(i), "/a", n=i) for i in range(8)))
    resp = await client.post(URL, content=body, headers=CE_BATCH_HEADERS)
    assert resp.status_code == 202, resp.text
    assert parsed == [body]
    assert [e.payload for e in sink.events] == [{"orderId": "A1", "n": i} for i in range(8)]


@pytest.mark.parametrize("body", [b'{"specversion": "1.0"}', b"[1]", b"[nope"])
async def test_cloudevents_batch_that_is_no_array_of_objects_is_400(
    sink: FakeSink, client: AsyncTestClient[Litestar], body: bytes
) -> None:
    resp = await client.post(URL, content=body, headers=CE_BATCH_HEADERS)
    assert resp.status_code == 400
    assert resp.json()["error"] == "malformed"
    assert sink.events == []


async def test_cloudevents_need_the_bearer_token(sink: FakeSink, client: AsyncTestClient[Litestar]) -> None:
    headers, body = v2_binary("x", "/s")
    assert (await client.post(URL, content=body, headers=headers)).status_code == 401
    resp = await client.post(
        URL, content=sdk_batch(sdk_event("x")), headers={"Content-Type": CE_BATCH_HEADERS["Content-Type"]}
    )
    assert resp.status_code == 401
    assert sink.events == []


# --- per-token rate limit ------------------------------------------------------------------


async def test_per_token_rate_limit_is_429_with_retry_after(sink: FakeSink) -> None:
    async with AsyncTestClient(make_app(sink, hook_config(rate_limit={"per_token": SLOW}))) as c:
        codes = [(await c.post(URL, json=order(), headers=AUTH)).status_code for _ in range(2)]
        refused = await c.post(URL, json=order(), headers=AUTH)
        other = await c.post(URL, json=order(), headers={"Authorization": "Bearer other-token"})
        text = (await c.get("/metrics", headers=AUTH)).text
    assert codes == [202, 202]
    assert refused.status_code == 429
    assert refused.json()["error"] == "rate_limited"
    assert 990 <= int(refused.headers["Retry-After"]) <= 1000
    assert other.status_code == 202
    assert len(sink.events) == 3
    assert 'signal_bridge_events_rejected_total{adapter="http",reason="rate_limited"} 1.0' in text


async def test_unauthorized_requests_do_not_spend_a_tokens_budget(sink: FakeSink) -> None:
    async with AsyncTestClient(make_app(sink, hook_config(rate_limit={"per_token": SLOW}))) as c:
        for _ in range(5):
            assert (await c.post(URL, json=order(), headers={"Authorization": "Bearer nope"})).status_code == 401
        assert (await c.post(URL, json=order(), headers=AUTH)).status_code == 202


# --- reloads -------------------------------------------------------------------------------


async def test_tokens_body_limit_and_token_limits_follow_a_reloaded_config(sink: FakeSink) -> None:
    current = Snapshot.compile(make_config(tokens=[TOKEN, OTHER_NAMED], rate_limit={"per_token": SLOW}))
    app = create_app(Pipeline(current.routes, sink), lambda: current)
    body = json.dumps(order(pad="x" * MAX_BODY)).encode()  # over MAX_BODY, under twice that
    other = {"Authorization": "Bearer other-token"}
    async with AsyncTestClient(app) as c:
        assert [(await c.post(URL, json=order(), headers=AUTH)).status_code for _ in range(2)] == [202, 202]
        assert (await c.post(URL, content=body, headers=other)).status_code == 413
        # reloaded: other-token revoked, the body limit doubled, the token limit unchanged
        current = Snapshot.compile(make_config(max_body_bytes=2 * MAX_BODY, rate_limit={"per_token": SLOW}))
        assert (await c.post(URL, json=order(), headers=other)).status_code == 401
        assert (await c.post(URL, json=order(), headers=AUTH)).status_code == 429  # its bucket was kept
        # reloaded: the token limit changed, so its bucket starts full
        current = Snapshot.compile(make_config(max_body_bytes=2 * MAX_BODY, rate_limit={"per_token": {"rate": 0.001}}))
        assert (await c.post(URL, content=body, headers=AUTH)).status_code == 202
    assert len(sink.events) == 3


def test_a_request_begun_before_a_reload_is_charged_at_the_new_limits_and_refills_nothing(sink: FakeSink) -> None:
    """A reload tightened the token's limit. The buckets used to be built again whenever a request
    of the older snapshot came between two of the newer, each time full: a token holder kept slow
    requests open across the reload and got a full burst back with each of them."""
    old = Snapshot.compile(make_config(rate_limit={"per_token": {"rate": 1, "burst": 2}}))
    new = Snapshot.compile(make_config(rate_limit={"per_token": {"rate": 0.01, "burst": 2}}))
    http = HttpState(Pipeline(new.routes, sink), lambda: new)
    name = http.token_name(new, AUTH["Authorization"])
    assert name is not None
    assert authorize(http, new, {"authorization": AUTH["Authorization"]}) == name
    tokens = http.limits().tokens
    assert tokens is not None and tokens.take(name, 2) == 0  # the new bucket, spent
    with pytest.raises(Problem) as caught:  # a request that began on the old snapshot
        authorize(http, old, {"authorization": AUTH["Authorization"]})
    assert caught.value.reason == "rate_limited"
    assert http.limits().tokens is tokens and tokens.take(name) > 0


async def test_a_batch_temporal_took_part_of_says_which_items_are_held_not_to_retry_it_whole() -> None:
    """600 events without ids go as two signals and the second fails. The first 500 are held:
    retried whole as a 503 told ("nothing of it is held") they would get new ids and start again.
    So the answer is a 207: 202 for each held item, 503 unavailable for each of the rest."""
    cfg = make_config(max_body_bytes=4 * 1024 * 1024)
    snap = Snapshot.compile(cfg)
    temporal = FakeTemporal(errors={1: RPCError("deadline", RPCStatusCode.DEADLINE_EXCEEDED, b"")})
    client = DispatcherClient(cast(Client, temporal), cfg, Metrics(), retry_after=3.0)
    body = [{"name": "order.created", "payload": {"orderId": str(i)}} for i in range(MAX_SIGNAL_EVENTS + 100)]
    async with in_loop_client(create_app(Pipeline(snap.routes, client), snap)) as http:
        resp = await http.post(URL, json=body, headers=AUTH)
    await client.close()
    assert resp.status_code == 207, resp.text
    answer = resp.json()
    assert (answer["status"], answer["accepted"], answer["rejected"]) == ("partial", MAX_SIGNAL_EVENTS, 100)
    statuses = [r["status"] for r in answer["results"]]
    assert statuses == [202] * MAX_SIGNAL_EVENTS + [503] * 100
    assert {r["error"] for r in answer["results"][MAX_SIGNAL_EVENTS:]} == {"unavailable"}
    # Sent alone under a key and without ids, they would be numbered from 0 and taken for held ones.
    assert all("with this event_id as its id" in r["message"] for r in answer["results"][MAX_SIGNAL_EVENTS:])
    held = {r["event_id"] for r in answer["results"][:MAX_SIGNAL_EVENTS]}
    assert held == set(temporal.sent()[0])


@pytest.mark.parametrize(
    ("last", "answers"),
    [
        ([{"n": i} for i in range(100)], [503] * 100),  # a signal of 100 refused: they may fit in parts
        ([{"pad": "x" * 600_000}], [413]),  # one refused alone: too large for this server
    ],
    ids=["signal-of-many", "event-alone"],
)
async def test_a_batch_held_in_part_and_refused_too_large_in_part_is_207_with_each_ones_answer(
    last: list[dict[str, Any]], answers: list[int]
) -> None:
    """The second signal refused as too large (a server payload limit below the bridge's) made the
    whole request 413: the 500 events Temporal held were answered refused, and a client sending
    them again in smaller requests, without ids, started them twice."""
    cfg = make_config(max_body_bytes=4 * 1024 * 1024)
    snap = Snapshot.compile(cfg)
    error = RPCError("Blob data size exceeds limit.", RPCStatusCode.INVALID_ARGUMENT, b"")
    temporal = FakeTemporal(errors={1: error})
    client = DispatcherClient(cast(Client, temporal), cfg, Metrics(), retry_after=3.0)
    first = [{"name": "order.created", "payload": {"orderId": str(i)}} for i in range(MAX_SIGNAL_EVENTS)]
    body = first + [{"name": "order.created", "payload": {"orderId": "z", **p}} for p in last]
    async with in_loop_client(create_app(Pipeline(snap.routes, client), snap)) as http:
        resp = await http.post(URL, json=body, headers=AUTH)
        metrics = (await http.get("/metrics", headers=AUTH)).text
    await client.close()
    assert resp.status_code == 207, resp.text
    answer = resp.json()
    assert (answer["status"], answer["accepted"], answer["rejected"]) == ("partial", MAX_SIGNAL_EVENTS, len(last))
    assert [r["status"] for r in answer["results"]] == [202] * MAX_SIGNAL_EVENTS + answers
    assert {r["event_id"] for r in answer["results"][:MAX_SIGNAL_EVENTS]} == set(temporal.sent()[0])
    too_large = answers.count(413)
    assert (
        f'signal_bridge_events_rejected_total{{adapter="http",reason="too_large"}} {too_large}.0' in metrics
        or not too_large
    )
    assert f'signal_bridge_events_accepted_total{{adapter="http"}} {MAX_SIGNAL_EVENTS}.0' in metrics


async def test_a_request_temporal_refuses_as_too_large_is_413_and_counted() -> None:
    """A signal over the server's own payload limit (one below the bridge's) was answered 413 but
    counted nowhere: no rejected metric and no log line told the operator."""
    sink = FakeSink(max_events=1)
    async with AsyncTestClient(make_app(sink)) as c:
        refused = await c.post(URL, json=[order(), order()], headers=AUTH)
        text = (await c.get("/metrics", headers=AUTH)).text
    assert refused.status_code == 413 and refused.json()["error"] == "too_large"
    assert 'signal_bridge_events_rejected_total{adapter="http",reason="too_large"} 2.0' in text


@pytest.mark.parametrize(("sent", "event_id"), [("café".encode(), "café"), (b"k-1", "k-1")])
async def test_an_idempotency_key_is_read_as_the_utf8_its_sender_wrote(sent: bytes, event_id: str) -> None:
    """Read as Latin-1, ``café`` was the id ``cafÃ©``: a look-up of /api/v1/events/caf%C3%A9 found
    nothing."""
    sink = FakeSink()
    async with AsyncTestClient(make_app(sink)) as c:
        resp = await c.post(URL, json=order(), headers={**AUTH, "Idempotency-Key": sent})  # type: ignore[dict-item]
    assert resp.status_code == 202 and resp.json()["event_id"] == event_id
    assert [e.id for e in sink.events] == [event_id]


def test_a_header_value_that_is_not_utf8_is_kept_as_latin1() -> None:
    assert as_utf8("caf\xe9") == "caf\xe9"  # the byte 0xE9 alone: no UTF-8
    assert as_utf8("caf\xc3\xa9") == "café"
    assert as_utf8(None) is None and as_utf8("k-1") == "k-1"


async def test_a_batch_whose_first_signal_is_refused_alone_answers_the_unsent_rest_503_not_413() -> None:
    """Nothing was held, and the whole request was answered 413 (which clients do not retry),
    the event of the signal never sent after the refused one included."""
    cfg = make_config(max_body_bytes=4 * 1024 * 1024)
    snap = Snapshot.compile(cfg)
    error = RPCError("Blob data size exceeds limit.", RPCStatusCode.INVALID_ARGUMENT, b"")
    temporal = FakeTemporal(errors={0: error})
    client = DispatcherClient(cast(Client, temporal), cfg, Metrics(), retry_after=3.0)
    body = [
        {"name": "order.created", "payload": {"orderId": "big", "pad": "x" * 600_000}},
        {"name": "order.created", "payload": {"orderId": "mid", "pad": "y" * 450_000}},
    ]
    async with in_loop_client(create_app(Pipeline(snap.routes, client), snap)) as http:
        resp = await http.post(URL, json=body, headers=AUTH)
    await client.close()
    assert [len(signal) for signal in temporal.sent()] == [1], "the second signal was not sent"
    assert resp.status_code == 207, resp.text
    assert [(r["status"], r["error"]) for r in resp.json()["results"]] == [(413, "too_large"), (503, "unavailable")]
