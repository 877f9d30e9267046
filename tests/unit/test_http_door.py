"""The HTTP door against an in-memory sink: status codes, ids, auth, limits, health, metrics."""

from __future__ import annotations

import asyncio
import json
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
from bridge.routing import RouteTable
from bridge.settings import Settings

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
    return create_app(Pipeline(RouteTable.from_config(cfg), sink), cfg.http, **kw)


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
    assert 'signal_bridge_events_accepted_total{door="http"} 1.0' in text
    for reason in ("unroutable", "malformed", "unauthorized"):
        assert f'signal_bridge_events_rejected_total{{door="http",reason="{reason}"}} 1.0' in text


async def test_too_large_is_counted_as_rejected(client: AsyncTestClient[Litestar]) -> None:
    await client.post(URL, content=big_body(), headers=AUTH)
    text = (await client.get("/metrics")).text
    assert 'signal_bridge_events_rejected_total{door="http",reason="too_large"} 1.0' in text


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
