"""The HTTP door against an in-memory sink: status codes, ids, auth, limits, health, metrics."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from adapters.http import create_app
from bridge.config import BridgeConfig, parse_config
from bridge.errors import Unavailable
from bridge.event import EventSignal
from bridge.pipeline import Pipeline
from bridge.runtime.settings import Settings
from bridge.snapshot import Snapshot

TOKEN = "t0k-3n"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
URL = "/api/v1/events"
MAX_BODY = 2048
SCHEMA = {"type": "object", "required": ["orderId"], "properties": {"orderId": {"type": "string"}}}


class FakeSink:
    """Records what the pipeline submits; raises Unavailable when told to."""

    def __init__(self) -> None:
        self.events: list[EventSignal] = []
        self.unavailable: Unavailable | None = None
        self.entered = asyncio.Event()
        self.release: asyncio.Event | None = None

    async def submit(self, events: Sequence[EventSignal]) -> None:
        self.entered.set()
        if self.release is not None:
            await self.release.wait()
        if self.unavailable is not None:
            raise self.unavailable
        self.events.extend(events)


def make_config(tokens: list[str] | None = None, **http: Any) -> BridgeConfig:
    return parse_config(
        {
            "project": "shop",
            "http": {"max_body_bytes": MAX_BODY, "auth": {"tokens": [TOKEN] if tokens is None else tokens}, **http},
            "workflows": [
                {
                    "id": "process-order",
                    "workflow_type": "ProcessOrder",
                    "triggers": [{"name": "order.created", "schema": SCHEMA}],
                },
                {"id": "audit", "workflow_type": "Audit", "triggers": [{"name": "order.*"}]},
            ],
        },
        origin="test",
    )


def make_app(sink: FakeSink, cfg: BridgeConfig | None = None, **kw: Any) -> Litestar:
    cfg = cfg or make_config()
    snap = Snapshot.compile(cfg)
    return create_app(Pipeline(snap.routes, sink), snap, **kw)


@pytest.fixture
def sink() -> FakeSink:
    return FakeSink()


@pytest.fixture
async def client(sink: FakeSink) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(make_app(sink)) as c:
        yield c


def in_loop_client(app: Litestar) -> httpx.AsyncClient:
    """A client that runs the app in this event loop. AsyncTestClient runs it on a portal thread
    and blocks the loop while a request is open, so it can neither stream a chunked body nor let
    a test look at the request while the sink holds it."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def order(**payload: Any) -> dict[str, Any]:
    return {"name": "order.created", "payload": {"orderId": "A1", **payload}}


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
    assert (event.id, event.name, event.source) == ("evt-1", "order.created", "http")
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


def big_body() -> bytes:
    return json.dumps(order(pad="x" * MAX_BODY)).encode()


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


async def chunks(body: bytes, size: int = 500) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


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


async def test_sink_unavailable_is_503_with_retry_after(sink: FakeSink) -> None:
    sink.unavailable = Unavailable("temporal down", retry_after=12)
    async with AsyncTestClient(make_app(sink, make_config(retry_after_seconds=3))) as c:
        resp = await c.post(URL, json={**order(), "id": "evt-503"}, headers=AUTH)
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "12"
    assert resp.json()["error"] == "unavailable"
    assert resp.json()["event_id"] == "evt-503"


async def test_retry_after_is_at_least_the_configured_value(sink: FakeSink) -> None:
    sink.unavailable = Unavailable("temporal down", retry_after=1)
    async with AsyncTestClient(make_app(sink, make_config(retry_after_seconds=7))) as c:
        resp = await c.post(URL, json=order(), headers=AUTH)
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "7"


# --- event ids -----------------------------------------------------------------------------


async def test_idempotency_key_wins_over_body_id(sink: FakeSink, client: AsyncTestClient[Litestar]) -> None:
    resp = await client.post(URL, json={**order(), "id": "body-id"}, headers={**AUTH, "Idempotency-Key": "hdr"})
    assert resp.json()["event_id"] == "hdr"
    assert sink.events[0].id == "hdr"


async def test_body_id_wins_over_generated(sink: FakeSink, client: AsyncTestClient[Litestar]) -> None:
    resp = await client.post(URL, json={**order(), "id": 123}, headers=AUTH)
    assert resp.json()["event_id"] == "123"
    assert sink.events[0].id == "123"


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
    assert (event.id, event.name, event.source) == ("ce-1", "order.created", "/shop")
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
    assert (event.id, event.name, event.source) == ("ce-2", "order.created", "/shop")
    assert event.payload == {"orderId": "A2"}


# --- health, metrics, schema ---------------------------------------------------------------


async def test_healthz(client: AsyncTestClient[Litestar]) -> None:
    resp = await client.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("checks", "status"),
    [({"temporal": True, "worker": True}, 200), ({"temporal": False, "worker": True}, 503)],
)
async def test_readyz_follows_ready_callable(sink: FakeSink, checks: dict[str, bool], status: int) -> None:
    async def ready() -> dict[str, bool]:
        return checks

    async with AsyncTestClient(make_app(sink, ready=ready)) as c:
        resp = await c.get("/readyz")
    assert resp.status_code == status
    assert resp.json()["checks"] == checks


async def test_metrics_count_accepted_and_rejected_by_reason(client: AsyncTestClient[Litestar]) -> None:
    await client.post(URL, json=order(), headers=AUTH)
    await client.post(URL, json={"name": "nobody.listens", "payload": {}}, headers=AUTH)
    await client.post(URL, content=b"{", headers=AUTH)
    await client.post(URL, json=order())
    text = (await client.get("/metrics")).text
    assert 'signal_bridge_events_accepted_total{adapter="http"} 1.0' in text
    for reason in ("unroutable", "malformed", "unauthorized"):
        assert f'signal_bridge_events_rejected_total{{adapter="http",reason="{reason}"}} 1.0' in text


async def test_too_large_is_counted_as_rejected(client: AsyncTestClient[Litestar]) -> None:
    await client.post(URL, content=big_body(), headers=AUTH)
    text = (await client.get("/metrics")).text
    assert 'signal_bridge_events_rejected_total{adapter="http",reason="too_large"} 1.0' in text


async def test_openapi_lists_the_events_endpoint(client: AsyncTestClient[Litestar]) -> None:
    resp = await client.get("/schema/openapi.json")
    assert resp.status_code == 200
    assert "post" in resp.json()["paths"]["/api/v1/events"]


# --- settings from the environment ---------------------------------------------------------


def test_settings_from_env_override_config() -> None:
    env = {
        "SIGNAL_BRIDGE_HTTP_HOST": "0.0.0.0",
        "SIGNAL_BRIDGE_HTTP_PORT": "9090",
        "SIGNAL_BRIDGE_TEMPORAL_ADDRESS": "temporal:7233",
        "SIGNAL_BRIDGE_TEMPORAL_NAMESPACE": "prod",
        "SIGNAL_BRIDGE_INSECURE": "true",
    }
    settings = Settings.from_env(env)
    assert settings.insecure is True
    cfg = settings.apply(make_config())
    assert (cfg.http.host, cfg.http.port) == ("0.0.0.0", 9090)
    assert (cfg.temporal.address, cfg.temporal.namespace) == ("temporal:7233", "prod")


def test_settings_absent_keep_config() -> None:
    settings = Settings.from_env({})
    assert settings.insecure is False
    cfg = settings.apply(make_config(port=8181, host="10.0.0.1"))
    assert (cfg.http.host, cfg.http.port) == ("10.0.0.1", 8181)
    assert cfg.temporal.address is None


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
        ("b-1", "order.created", "http"),
        ("b-2", "order.shipped", "http"),
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
    async with AsyncTestClient(make_app(sink)) as c:
        resp = await c.post(URL, json=[{**order(), "id": "x1"}, {**order(), "id": "x2"}], headers=AUTH)
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "9"
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
    assert resp.json()["event_id"] == "ce-42"
    [event] = sink.events
    assert (event.id, event.name, event.source) == ("ce-42", "order.created", "/shop floor/1")
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
        (0, 202, "1"),
        (1, 202, "1"),
        (2, 202, "2"),
    ]
    assert [(e.source, e.id, e.name) for e in sink.events] == [
        ("/a", "1", "order.created"),
        ("/b", "1", "order.created"),
        ("/a", "2", "order.shipped"),
    ]
    assert len({e.digest for e in sink.events}) == 3  # same id, other source: another event
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
    assert [e.id for e in sink.events] == ["g"]


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


# --- webhooks: POST /api/v1/hooks/{slug} ---------------------------------------------------

GH_SECRET = "It's a Secret to Everybody"  # GitHub's documented test secret
GH_VECTOR_BODY = b"Hello, World!"
GH_VECTOR_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
ST_SECRET = "whsec_test_secret"
SW_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
HOOKS = "/api/v1/hooks"
UNAUTHORIZED = {"error": "unauthorized", "message": "the delivery's signature did not verify"}


def hook_config(webhooks: list[dict[str, Any]] | None = None, **http: Any) -> BridgeConfig:
    default_hooks = [
        {
            "slug": "github",
            "verify": {"kind": "github", "secrets": ["the-new-secret", GH_SECRET]},
            "events": [
                {"name": "github.push", "filter": 'metadata.headers["x-github-event"] == "push"'},
                {"name": "github.main", "filter": 'payload.ref == "refs/heads/main"'},
            ],
        },
        {
            "slug": "stripe",
            "verify": {"kind": "stripe", "secret": ST_SECRET},
            "events": [
                {
                    "name": "stripe.payment",
                    "filter": 'payload.type == "payment_intent.succeeded"',
                    "input": {"amount": "{{ .payload.data.object.amount }}", "event": "{{ .payload.id }}"},
                }
            ],
        },
        {"slug": "sw", "verify": {"kind": "standard-webhooks", "secret": SW_SECRET}, "events": [{"name": "sw.event"}]},
        {"slug": "open", "verify": {"kind": "none"}, "events": [{"name": "open.event"}]},
        {"slug": "typo", "verify": {"kind": "none"}, "events": [{"name": "nobody.listens"}]},
        {"slug": "typed", "verify": {"kind": "none"}, "events": [{"name": "order.created"}]},
    ]
    return parse_config(
        {
            "project": "shop",
            "http": {"max_body_bytes": MAX_BODY, "auth": {"tokens": [TOKEN, "other-token"]}, **http},
            "webhooks": default_hooks if webhooks is None else webhooks,
            "workflows": [
                {
                    "id": "process-order",
                    "workflow_type": "ProcessOrder",
                    "triggers": [{"name": "order.created", "schema": SCHEMA}],
                },
                {
                    "id": "hooks",
                    "workflow_type": "Hooks",
                    "triggers": [{"name": n} for n in ("github.*", "stripe.*", "sw.*", "open.*")],
                },
            ],
        },
        origin="test",
    )


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


PUSH = {"ref": "refs/heads/main", "repository": {"full_name": "octo/repo"}}
PAYMENT = {"id": "evt_1", "type": "payment_intent.succeeded", "data": {"object": {"amount": 2000}}}


async def test_signed_github_delivery_is_accepted(sink: FakeSink, hooks: AsyncTestClient[Litestar]) -> None:
    body, headers = github_delivery(PUSH)
    resp = await hooks.post(f"{HOOKS}/github", content=body, headers={**headers, "Authorization": "Bearer x"})
    assert resp.status_code == 202, resp.text
    answer = resp.json()
    assert (answer["status"], answer["delivery_id"]) == ("accepted", "d-1")
    assert [(r["event_id"], r["name"], r["status"]) for r in answer["results"]] == [
        ("d-1:github.push", "github.push", 202),
        ("d-1:github.main", "github.main", 202),
    ]
    push, main = sink.events
    assert (main.name, main.payload) == ("github.main", PUSH)
    assert (push.source, push.payload) == ("webhook:github", PUSH)
    assert push.metadata["headers"]["x-github-event"] == "push"
    assert push.metadata["headers"]["user-agent"] == "GitHub-Hookshot/abc"
    assert push.metadata["webhook"] == {"slug": "github", "delivery_id": "d-1"}
    dumped = json.dumps(push.metadata)
    assert "x-hub-signature-256" not in dumped and "authorization" not in dumped


async def test_github_redelivery_carries_the_same_event_ids(sink: FakeSink, hooks: AsyncTestClient[Litestar]) -> None:
    body, headers = github_delivery(PUSH, delivery="same")
    for _ in range(2):
        assert (await hooks.post(f"{HOOKS}/github", content=body, headers=headers)).status_code == 202
    assert [e.id for e in sink.events] == ["same:github.push", "same:github.main"] * 2
    assert sink.events[0].digest == sink.events[2].digest  # so each target's run id is the same too


async def test_rotated_github_secret_is_accepted(sink: FakeSink, hooks: AsyncTestClient[Litestar]) -> None:
    body, headers = github_delivery(PUSH, secret="the-new-secret")
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
    for _ in range(2):
        assert (await hooks.post(f"{HOOKS}/open", content=body)).status_code == 202
    expected = "sha256:" + hashlib.sha256(body).hexdigest() + ":open.event"
    assert [e.id for e in sink.events] == [expected, expected]


async def test_no_matching_entry_is_200_ignored(sink: FakeSink, hooks: AsyncTestClient[Litestar]) -> None:
    body, headers = github_delivery({"zen": "Design for failure."}, event="ping", delivery="p-1")
    resp = await hooks.post(f"{HOOKS}/github", content=body, headers=headers)
    assert resp.status_code == 200
    assert resp.json()["status"] == "ignored" and resp.json()["delivery_id"] == "p-1"
    assert sink.entered.is_set() is False
    text = (await hooks.get("/metrics")).text
    assert 'signal_bridge_events_dropped_total{adapter="webhook",reason="no_match"} 1.0' in text


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
    sink.unavailable = Unavailable("temporal down", retry_after=8)
    async with AsyncTestClient(make_app(sink, hook_config())) as c:
        body, headers = github_delivery(PUSH, delivery="d-503")
        resp = await c.post(f"{HOOKS}/github", content=body, headers=headers)
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "8"
    assert resp.json()["delivery_id"] == "d-503"


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
    text = (await hooks.get("/metrics")).text
    assert 'signal_bridge_events_rejected_total{adapter="webhook",reason="unauthorized"} 1.0' in text
    assert 'signal_bridge_events_rejected_total{adapter="webhook",reason="not_found"} 1.0' in text
    assert 'signal_bridge_events_accepted_total{adapter="webhook"} 2.0' in text


async def test_openapi_lists_the_hooks_endpoint(hooks: AsyncTestClient[Litestar]) -> None:
    paths = (await hooks.get("/schema/openapi.json")).json()["paths"]
    assert "post" in paths["/api/v1/hooks/{slug}"]


# --- rate limits ---------------------------------------------------------------------------

SLOW = {"rate": 0.001, "burst": 2}  # two at once, then one every 1000 s: no test waits for that


async def test_per_token_rate_limit_is_429_with_retry_after(sink: FakeSink) -> None:
    async with AsyncTestClient(make_app(sink, hook_config(rate_limit={"per_token": SLOW}))) as c:
        codes = [(await c.post(URL, json=order(), headers=AUTH)).status_code for _ in range(2)]
        refused = await c.post(URL, json=order(), headers=AUTH)
        other = await c.post(URL, json=order(), headers={"Authorization": "Bearer other-token"})
        text = (await c.get("/metrics")).text
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


async def test_per_webhook_rate_limit_is_429_and_forgeries_do_not_spend_it(sink: FakeSink) -> None:
    async with AsyncTestClient(make_app(sink, hook_config(rate_limit={"per_webhook": SLOW}))) as c:
        forged_body, forged = github_delivery(PUSH, secret="forged")
        for _ in range(5):
            assert (await c.post(f"{HOOKS}/github", content=forged_body, headers=forged)).status_code == 401
        codes = []
        for i in range(3):
            body, headers = github_delivery(PUSH, delivery=f"d-{i}")
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
        one = [(await c.post(f"{HOOKS}/one", content=b"{}")).status_code for _ in range(2)]
        many = [(await c.post(f"{HOOKS}/many", content=b"{}")).status_code for _ in range(5)]
    assert one == [202, 429]
    assert many == [202] * 5


async def test_no_rate_limit_by_default(sink: FakeSink) -> None:
    async with AsyncTestClient(make_app(sink, hook_config())) as c:
        codes = {(await c.post(URL, json=order(), headers=AUTH)).status_code for _ in range(30)}
        codes |= {(await c.post(f"{HOOKS}/open", content=b"{}")).status_code for _ in range(30)}
    assert codes == {202}


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
