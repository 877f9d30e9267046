"""The operational endpoints (/healthz, /readyz, /metrics), the OpenAPI document's paths, and the
HTTP settings read from the environment. Who may read them: test_http_exposure.py."""

from __future__ import annotations

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from bridge.runtime.settings import Settings
from tests.fakes import FakeSink
from tests.unit.http_support import (
    AUTH,
    URL,
    big_body,
    make_app,
    make_config,
    order,
)

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
        resp = await c.get("/readyz", headers=AUTH)
        bare = await c.get("/readyz")
    assert resp.status_code == bare.status_code == status
    assert resp.json()["checks"] == checks
    assert bare.json() == {"status": resp.json()["status"]}


async def test_metrics_count_accepted_and_rejected_by_reason(client: AsyncTestClient[Litestar]) -> None:
    await client.post(URL, json=order(), headers=AUTH)
    await client.post(URL, json={"name": "nobody.listens", "payload": {}}, headers=AUTH)
    await client.post(URL, content=b"{", headers=AUTH)
    await client.post(URL, json=order())
    text = (await client.get("/metrics", headers=AUTH)).text
    assert 'signal_bridge_events_accepted_total{adapter="http"} 1.0' in text
    for reason in ("unroutable", "malformed", "unauthorized"):
        assert f'signal_bridge_events_rejected_total{{adapter="http",reason="{reason}"}} 1.0' in text


async def test_too_large_is_counted_as_rejected(client: AsyncTestClient[Litestar]) -> None:
    await client.post(URL, content=big_body(), headers=AUTH)
    text = (await client.get("/metrics", headers=AUTH)).text
    assert 'signal_bridge_events_rejected_total{adapter="http",reason="too_large"} 1.0' in text


async def test_openapi_lists_the_events_endpoint(client: AsyncTestClient[Litestar]) -> None:
    resp = await client.get("/schema/openapi.json", headers=AUTH)
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
