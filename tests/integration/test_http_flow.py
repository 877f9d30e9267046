"""The seed's end-to-end flow over the HTTP door, against a real Temporal dev server."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from temporalio.client import Client

from bridge.event import event_digest, target_workflow_id
from tests.helpers import TOKEN, assert_eventually, config, result_of, runner, unique

pytestmark = pytest.mark.temporal


async def _post(bridge: Any, body: Any, key: str | None = None, token: str = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    if key:
        headers["Idempotency-Key"] = key
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.post(f"http://127.0.0.1:{bridge.http_port}/api/v1/events", json=body, headers=headers)


async def test_event_starts_target_that_sees_payload(bridge_factory, temporal_client, temporal_address):
    project = unique("seed")
    cfg = config(
        project,
        temporal_address,
        [
            {
                "id": "process-order",
                "triggers": [{"type": "signal", "name": "order.created"}],
                "tasks": [{"id": "process-order", "config": {"template": "Processing order {{ .trigger.orderId }}"}}],
            }
        ],
    )
    bridge = await bridge_factory(cfg)
    resp = await _post(bridge, {"name": "order.created", "payload": {"orderId": "123"}}, key="k-1")
    assert resp.status_code == 202, resp.text
    assert resp.json()["event_id"] == "k-1"
    wid = target_workflow_id("process-order", event_digest("http", "k-1"))
    result = await result_of(temporal_client, wid)
    assert result["tasks"]["process-order"] == "Processing order 123"
    desc = await temporal_client.get_workflow_handle(wid).describe()
    memo = await desc.memo()
    assert memo["event_name"] == "order.created" and memo["event_id"] == "k-1"
