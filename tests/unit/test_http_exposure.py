"""What the HTTP adapter shows to whom, and what it logs.

Public: /healthz and a bare /readyz (status only). The readiness checks, /metrics and /schema
need the events API's bearer token; insecure mode without tokens leaves them open and says so.
Logs: nothing per accepted event at INFO, one line per batch with counts per reason, and sender
values escaped and cut."""

from __future__ import annotations

import logging

import pytest
from litestar import Litestar, get
from litestar.testing import AsyncTestClient

from adapters.http import check_guarded, create_app
from adapters.http.state import NEEDS_TOKEN, needs_token
from bridge.pipeline import Pipeline
from bridge.snapshot import Snapshot
from tests.fakes import FakeSink
from tests.unit.http_support import AUTH, OTHER_NAMED, TOKEN, URL, make_app, make_config, order

SCHEMA_PATHS = ["/schema", "/schema/openapi.json", "/schema/openapi.yaml", "/schema/swagger", "/schema/no-such-page"]
WRONG = {"Authorization": "Bearer not-a-token"}


async def not_ready() -> dict[str, bool]:
    return {"temporal": False, "worker": True}


async def ready() -> dict[str, bool]:
    return {"temporal": True, "worker": True}


# --- who sees what ---------------------------------------------------------------------------


async def test_healthz_is_public() -> None:
    async with AsyncTestClient(make_app(FakeSink())) as c:
        resp = await c.get("/healthz")
    assert (resp.status_code, resp.json()) == (200, {"status": "ok"})


@pytest.mark.parametrize(("probe", "status", "word"), [(ready, 200, "ready"), (not_ready, 503, "not ready")])
async def test_readyz_shows_its_checks_only_to_a_token_holder(probe: object, status: int, word: str) -> None:
    async with AsyncTestClient(make_app(FakeSink(), ready=probe)) as c:
        bare, wrong, full = [await c.get("/readyz", headers=h) for h in ({}, WRONG, AUTH)]
    assert bare.status_code == wrong.status_code == full.status_code == status
    assert bare.json() == wrong.json() == {"status": word}
    assert full.json() == {"status": word, "checks": await probe()}  # type: ignore[operator]


@pytest.mark.parametrize("path", ["/metrics", *SCHEMA_PATHS])
async def test_metrics_and_schema_need_the_bearer_token(path: str) -> None:
    async with AsyncTestClient(make_app(FakeSink())) as c:
        refused = [await c.get(path, headers=h) for h in ({}, WRONG, {"Authorization": f"Basic {TOKEN}"})]
        allowed = await c.get(path, headers=AUTH)
        text = (await c.get("/metrics", headers=AUTH)).text
    for resp in refused:
        assert resp.status_code == 401
        assert resp.json() == {"error": "unauthorized", "message": "a valid bearer token is required"}
    assert allowed.status_code != 401
    assert 'signal_bridge_events_rejected_total{adapter="http",reason="unauthorized"} 3.0' in text


async def test_with_the_token_metrics_and_the_document_are_served() -> None:
    async with AsyncTestClient(make_app(FakeSink())) as c:
        metrics = await c.get("/metrics", headers=AUTH)
        doc = await c.get("/schema/openapi.json", headers=AUTH)
    assert metrics.status_code == 200 and "signal_bridge_events_received_total" in metrics.text
    assert doc.status_code == 200 and "/api/v1/events" in doc.json()["paths"]


async def test_insecure_mode_without_tokens_leaves_them_open_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="adapters.http"):
        app = make_app(FakeSink(), make_config(tokens=[]), insecure=True, ready=ready)
    assert any("insecure mode" in r.getMessage() and "/metrics" in r.getMessage() for r in caplog.records)
    async with AsyncTestClient(app) as c:
        assert (await c.get("/metrics")).status_code == 200
        assert (await c.get("/schema/openapi.json")).status_code == 200
        assert (await c.get("/readyz")).json()["checks"] == await ready()


async def test_insecure_mode_keeps_configured_tokens_in_force(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="adapters.http"):
        app = make_app(FakeSink(), insecure=True, ready=ready)
    assert not any("insecure mode" in r.getMessage() for r in caplog.records)
    async with AsyncTestClient(app) as c:
        assert (await c.get("/metrics")).status_code == 401
        assert (await c.get("/schema/openapi.json")).status_code == 401
        assert "checks" not in (await c.get("/readyz")).json()
        assert (await c.get("/metrics", headers=AUTH)).status_code == 200


async def test_a_token_removed_by_a_reload_no_longer_reads_metrics() -> None:
    current = Snapshot.compile(make_config(tokens=[TOKEN, OTHER_NAMED]))
    other = {"Authorization": "Bearer other-token"}
    async with AsyncTestClient(create_app(Pipeline(current.routes, FakeSink()), lambda: current)) as c:
        assert (await c.get("/metrics", headers=other)).status_code == 200
        current = Snapshot.compile(make_config())
        assert (await c.get("/metrics", headers=other)).status_code == 401
        assert (await c.get("/schema/openapi.json", headers=other)).status_code == 401


# --- logs --------------------------------------------------------------------------------------


async def test_a_batch_of_refused_items_is_logged_as_one_line_with_counts(caplog: pytest.LogCaptureFixture) -> None:
    batch = [{"payload": {}}] * 30 + [{"name": "order.created", "payload": [1]}] * 20 + [order()]
    async with AsyncTestClient(make_app(FakeSink(), make_config(max_body_bytes=64 * 1024))) as c:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            resp = await c.post(URL, json=batch, headers=AUTH)
        text = (await c.get("/metrics", headers=AUTH)).text
    assert resp.status_code == 207
    ours = [r for r in caplog.records if r.name.startswith(("adapters", "bridge"))]
    [line] = ours
    assert line.levelno == logging.WARNING
    assert line.getMessage() == "batch adapter=http token=token-1 accepted=1 rejected=50 malformed=20 no_name=30"
    assert 'signal_bridge_events_rejected_total{adapter="http",reason="no_name"} 30.0' in text
    assert 'signal_bridge_events_rejected_total{adapter="http",reason="malformed"} 20.0' in text


async def test_logged_names_and_ids_are_escaped_and_cut(caplog: pytest.LogCaptureFixture) -> None:
    sink = FakeSink()
    cfg = make_config(max_body_bytes=64 * 1024)
    event = {"name": "order.shipped\nINFO forged line", "id": "i" * 4000, "payload": {}}
    async with AsyncTestClient(make_app(sink, cfg)) as c:
        with caplog.at_level(logging.DEBUG, logger="adapters.http"):
            assert (await c.post(URL, json=event, headers=AUTH)).status_code == 202
    [line] = [r.getMessage() for r in caplog.records if r.name.startswith("adapters.http")]
    assert "\n" not in line and "order.shipped\\nINFO forged line" in line
    assert len(line) < 600 and "…(+3800)" in line


async def test_an_accepted_event_and_a_batch_log_nothing_per_event_at_info(caplog: pytest.LogCaptureFixture) -> None:
    async with AsyncTestClient(make_app(FakeSink(), make_config(max_body_bytes=64 * 1024))) as c:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert (await c.post(URL, json=order(), headers=AUTH)).status_code == 202
            one = [r for r in caplog.records if r.name.startswith(("adapters", "bridge", "dispatcher"))]
            assert (await c.post(URL, json=[order()] * 20, headers=AUTH)).status_code == 202
    assert one == []  # a single event: nothing (its line is at DEBUG)
    [line] = [r for r in caplog.records if r.name.startswith(("adapters", "bridge", "dispatcher"))]
    assert line.getMessage() == "batch adapter=http token=token-1 accepted=20 rejected=0"  # a batch: one line


# --- the guard -----------------------------------------------------------------------------------


def test_every_handler_that_needs_a_token_has_the_guard() -> None:
    app = make_app(FakeSink())
    needing = [h for r in app.routes for h in getattr(r, "route_handlers", ()) if h.opt.get(NEEDS_TOKEN)]
    assert {r.path for r in app.routes if any(h in needing for h in getattr(r, "route_handlers", ()))} >= {
        "/metrics",
        "/schema/openapi.json",
    }
    assert all(needs_token in h.resolve_guards() for h in needing)


def test_an_app_with_an_unguarded_handler_that_needs_a_token_is_refused() -> None:
    @get("/secret", opt={NEEDS_TOKEN: True}, sync_to_thread=False)
    def secret() -> str:
        return "x"

    with pytest.raises(RuntimeError, match="/secret needs a bearer token"):
        check_guarded(Litestar([secret]))


async def test_a_workers_app_serves_its_probes_and_metrics_and_takes_no_events() -> None:
    sink = FakeSink()
    async with AsyncTestClient(make_app(sink, ready=ready, ops_only=True)) as c:
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/readyz", headers=AUTH)).json() == {"status": "ready", "checks": await ready()}
        assert (await c.get("/metrics")).status_code == 401
        assert (await c.get("/metrics", headers=AUTH)).status_code == 200
        posted = await c.post(URL, json=order(), headers=AUTH)
        looked = await c.get(f"{URL}/e-1", headers=AUTH)
    assert posted.status_code in (404, 405) and looked.status_code == 404
    assert not sink.events
