"""Looking events up: an HTTP event by GET /api/v1/events/{id}, a webhook delivery and a Kafka
record by `signal-bridge events`, against a real Temporal server; and the dispatchers' stats as
metrics. Targets run on a task queue no worker polls: a run that started is all a look-up needs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bridge.routing import RouteTable
from bridge.runtime import app as runtime_app
from bridge.runtime.lookup import Lookup
from tests.helpers import HTTP_SCOPE, TOKEN, assert_eventually, config, run_id, unique
from tests.integration.test_kafka import create_topic, envelope, kafka_child, kafka_entry, produce

pytestmark = pytest.mark.temporal

OTHER_TOKEN = "another-token-for-lookups"


async def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``signal-bridge ARGS`` in a subprocess, off the event loop."""
    command = [sys.executable, "-m", "bridge.runtime.cli", *args]
    return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60)


def idle(wid: str, *names: str, queue: str) -> dict[str, Any]:
    return {"id": wid, "workflow_type": "Idle", "task_queue": queue, "triggers": [{"name": n} for n in names]}


async def test_an_http_event_is_looked_up_by_its_token_only(bridge_factory, temporal_address, monkeypatch):
    monkeypatch.setattr(runtime_app, "STATS_INTERVAL", 0.5)
    project, queue = unique("look"), f"idle-{uuid.uuid4().hex[:8]}"
    cfg = config(
        project,
        temporal_address,
        [idle("ship", "order.created", queue=queue), idle("audit", "order.*", queue=queue)],
        http={"port": 0, "auth": {"tokens": [TOKEN, {"name": "other", "token": OTHER_TOKEN}]}},
    )
    bridge = await bridge_factory(cfg, client=None)  # it connects itself: the embedded UI is unknown here
    base = f"http://127.0.0.1:{bridge.http_port}"
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        sent = await http.post(
            "/api/v1/events",
            json={"name": "order.created", "payload": {"orderId": 7}},
            headers={**auth, "Idempotency-Key": "order-7"},
        )
        assert sent.status_code == 202, sent.text

        async def both_runs() -> dict[str, Any]:
            resp = await http.get("/api/v1/events/order-7", headers=auth)
            assert resp.status_code == 200, resp.text
            body: dict[str, Any] = resp.json()
            assert len(body["runs"]) == 2, body
            return body

        body = await assert_eventually(both_runs, timeout=60, what="both runs of order-7")
        assert body["source"] == HTTP_SCOPE and body["event_id"] == "order-7"
        runs = {r["workflow_entry"]: r for r in body["runs"]}
        assert set(runs) == {"ship", "audit"}
        assert runs["ship"]["workflow_id"] == run_id(project, "ship", "order-7")
        assert all(r["status"] == "running" and r["start_time"] and r["run_id"] for r in runs.values())
        assert all(r["event_name"] == "order.created" and r["source"] == HTTP_SCOPE for r in runs.values())

        # Another token's events are another source: the same id names nothing of its own.
        other = await http.get("/api/v1/events/order-7", headers={"Authorization": f"Bearer {OTHER_TOKEN}"})
        assert other.status_code == 404 and other.json()["error"] == "not_found"
        unknown = await http.get("/api/v1/events/never-sent", headers=auth)
        assert unknown.status_code == 404
        assert (await http.get("/api/v1/events/order-7")).status_code == 401

        async def exported() -> bool:
            text = (await http.get("/metrics", headers=auth)).text
            wanted = f'signal_bridge_dispatcher_events{{dispatcher="dispatcher-{project}",outcome="started"}} 2.0'
            assert wanted in text, [line for line in text.splitlines() if "dispatcher_events" in line]
            return True

        await assert_eventually(exported, timeout=30, what="the dispatcher's stats as metrics")


async def test_an_event_whose_id_and_name_are_too_long_for_an_attribute_starts_and_is_found(
    bridge_factory, temporal_address, temporal_client
):
    """Temporal refuses a start whose attribute value is over 2 KiB as the SDK encodes it (each
    "é" takes six bytes): the bridge cuts such values (``dispatcher.search.fit``), so the runs start,
    and the look-up by attributes alone (no source) finds them, whole from the memo."""
    project, queue = unique("look-long"), f"idle-{uuid.uuid4().hex[:8]}"
    cfg = config(
        project, temporal_address, [idle("ship", "order.*", queue=queue), idle("audit", "order.*", queue=queue)]
    )
    bridge = await bridge_factory(cfg)
    event_id, name = "é" * 600, "order." + "x" * 3000
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bridge.http_port}", timeout=30) as http:
        sent = await http.post(
            "/api/v1/events",
            json={"name": name, "id": event_id, "payload": {}},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert sent.status_code == 202, sent.text
    finder = Lookup(temporal_client, project, RouteTable.from_config(bridge.config))

    async def both() -> list[Any]:
        runs = await finder.event(event_id)
        return runs if len(runs) == 2 else []

    runs = await assert_eventually(both, timeout=60, what="both runs of the long event")
    assert sorted(r.workflow_entry for r in runs) == ["audit", "ship"]
    assert all((r.event_id, r.event_name, r.source) == (event_id, name, HTTP_SCOPE) for r in runs)
    assert len(await finder.events(name=name)) == 2
    assert len(await finder.events(name=name[:2000] + "*")) == 2


async def test_a_webhook_delivery_and_a_kafka_record_are_looked_up_by_source(
    bridge_factory, temporal_client, temporal_address, kafka_bootstrap, tmp_path: Path
):
    project, queue = unique("look"), f"idle-{uuid.uuid4().hex[:8]}"
    topic = await create_topic(kafka_bootstrap)
    data = {
        "project": project,
        "temporal": {"address": temporal_address},
        "http": {"port": 0, "auth": {"tokens": [TOKEN]}},
        "webhooks": [
            {"slug": "shop", "verify": {"kind": "none"}, "id_from": "field:id", "events": [{"name": "shop.paid"}]}
        ],
        "kafka": [kafka_entry(kafka_bootstrap, topic)],
        "workflows": [idle("paid", "shop.paid", queue=queue), idle("ship", "order.created", queue=queue)],
    }
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(data))
    bridge = await bridge_factory(
        config(project, temporal_address, data["workflows"], **{k: data[k] for k in ("webhooks", "kafka")})
    )
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bridge.http_port}", timeout=30) as http:
        hook = await http.post("/api/v1/hooks/shop", json={"id": "pay-1", "amount": 5})
    assert hook.status_code == 202, hook.text
    [(partition, offset)] = await produce(kafka_bootstrap, topic, [envelope("order.created", {"n": 1})])
    record_id = f"kafka:{topic}:{partition}:{offset}"
    finder = Lookup(temporal_client, project, RouteTable.from_config(bridge.config))

    async def found(event_id: str, source: str) -> list[Any]:
        runs = await finder.event(event_id, source)
        assert runs, (event_id, source)
        return runs

    [paid] = await assert_eventually(lambda: found("pay-1:shop.paid", "webhook:shop"), timeout=60, what="webhook")
    assert paid.workflow_entry == "paid" and paid.source == "webhook:shop" and paid.event_id == "pay-1:shop.paid"
    [shipped] = await assert_eventually(lambda: found(record_id, f"kafka:{topic}"), timeout=90, what="kafka record")
    assert shipped.workflow_id == kafka_child(project, "ship", topic, partition, offset)

    # The same from the command line: by id for every source, and a list by name prefix and age.
    shown = await cli("events", "show", record_id, "--config", str(path), "--json")
    assert shown.returncode == 0, shown.stderr
    assert [json.loads(line)["workflow_id"] for line in shown.stdout.splitlines()] == [shipped.workflow_id]
    listed = await cli("events", "list", "--config", str(path), "--name", "shop.*", "--since", "1h", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(line)["workflow_id"] for line in listed.stdout.splitlines()] == [paid.workflow_id]
    missing = await cli("events", "show", "nope", "--config", str(path))
    assert missing.returncode == 1 and "no runs found" in missing.stdout
