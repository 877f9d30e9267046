"""What the HTTP adapter's unit tests share: a config, an app over the shared in-memory sink,
clients and request bodies."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from litestar import Litestar

from adapters.http import create_app
from bridge.config import BridgeConfig, parse_config
from bridge.pipeline import Pipeline
from bridge.snapshot import Snapshot
from tests.fakes import FakeSink

TOKEN = "t0k-3n"
OTHER_NAMED = {"name": "token-2", "token": "other-token"}  # a second client's token
AUTH = {"Authorization": f"Bearer {TOKEN}"}
URL = "/api/v1/events"
MAX_BODY = 2048
SCHEMA = {"type": "object", "required": ["orderId"], "properties": {"orderId": {"type": "string"}}}
GH_SECRET = "It's a Secret to Everybody"  # GitHub's documented test secret
ST_SECRET = "whsec_test_secret"
SW_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
HOOKS = "/api/v1/hooks"
SLOW = {"rate": 0.001, "burst": 2}  # two at once, then one every 1000 s: no test waits for that


def make_config(tokens: list[Any] | None = None, **http: Any) -> BridgeConfig:
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


def in_loop_client(app: Litestar, address: str = "127.0.0.1") -> httpx.AsyncClient:
    """A client that runs the app in this event loop. AsyncTestClient runs it on a portal thread
    and blocks the loop while a request is open, so it can neither stream a chunked body nor let
    a test look at the request while the sink holds it. ``address``: the client's, as the app sees it."""
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


def order(**payload: Any) -> dict[str, Any]:
    return {"name": "order.created", "payload": {"orderId": "A1", **payload}}


def big_body() -> bytes:
    return json.dumps(order(pad="x" * MAX_BODY)).encode()


async def chunks(body: bytes, size: int = 500) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


def hook_config(webhooks: list[dict[str, Any]] | None = None, **http: Any) -> BridgeConfig:
    default_hooks = [
        {
            "slug": "github",
            "verify": {"kind": "github", "secrets": ["the-rotated-secret", GH_SECRET]},
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
            "http": {"max_body_bytes": MAX_BODY, "auth": {"tokens": [TOKEN, OTHER_NAMED]}, **http},
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
