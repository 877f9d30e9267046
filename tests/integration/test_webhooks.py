"""Webhooks and CloudEvents batches end to end: the bridge's own HTTP port, a real Temporal."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from bridge.event import event_digest, target_workflow_id
from tests.helpers import TOKEN, assert_eventually, config, result_of, runner, unique

pytestmark = pytest.mark.temporal

SECRET = "It's a Secret to Everybody"


def hooks_client(bridge: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{bridge.http_port}", timeout=30)


def github_delivery(body: dict[str, Any], event: str, delivery: str) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(body).encode()
    return raw, {
        "Content-Type": "application/json",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery,
        "X-Hub-Signature-256": "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest(),
    }


async def _stats(client: Client, project: str) -> dict[str, Any]:
    return await client.get_workflow_handle(f"dispatcher-{project}").query("stats")


async def _settled(client: Client, project: str, received: int) -> dict[str, Any]:
    """The dispatcher's counters once it has taken ``received`` events and has none queued."""

    async def check() -> dict[str, Any]:
        stats = await _stats(client, project)
        return stats if stats["received"] == received and stats["backlog"] == 0 else {}

    return await assert_eventually(check, what=f"dispatcher {project} processed {received} events")


async def _count(client: Client, project: str) -> int:
    query = f'TaskQueue="{project}" AND WorkflowType="SignalBridgeTasks"'
    return (await client.count_workflows(query)).count


async def test_signed_github_delivery_starts_once_even_when_redelivered(
    bridge_factory, temporal_client, temporal_address
):
    project = unique("gh")
    cfg = config(
        project,
        temporal_address,
        [runner("on-push", "github.push", template="pushed {{ .trigger.ref }} to {{ .trigger.repo }}")],
        webhooks=[
            {
                "slug": "github",
                "verify": {"kind": "github", "secret": SECRET},
                "events": [
                    {
                        "name": "github.push",
                        "filter": 'metadata.headers["x-github-event"] == "push"',
                        "input": {"ref": "{{ .payload.ref }}", "repo": "{{ .payload.repository.full_name }}"},
                    }
                ],
            }
        ],
    )
    bridge = await bridge_factory(cfg)
    delivery = str(uuid.uuid4())
    body, headers = github_delivery(
        {"ref": "refs/heads/main", "repository": {"full_name": "octo/repo"}}, "push", delivery
    )

    async with hooks_client(bridge) as http:
        first = await http.post("/api/v1/hooks/github", content=body, headers=headers)
        assert first.status_code == 202, first.text
        wid = target_workflow_id("on-push", event_digest("webhook:github", f"{delivery}:github.push"))
        result = await result_of(temporal_client, wid)
        assert result["tasks"]["render"] == "pushed refs/heads/main to octo/repo"

        forged = await http.post(
            "/api/v1/hooks/github", content=body, headers={**headers, "X-Hub-Signature-256": "sha256=00"}
        )
        assert forged.status_code == 401
        ping_body, ping_headers = github_delivery({"zen": "Speak like a human."}, "ping", str(uuid.uuid4()))
        ping = await http.post("/api/v1/hooks/github", content=ping_body, headers=ping_headers)
        assert (ping.status_code, ping.json()["status"]) == (200, "ignored")
        again = await http.post("/api/v1/hooks/github", content=body, headers=headers)
        assert again.status_code == 202, again.text
        assert again.json()["results"] == first.json()["results"]

    stats = await _settled(temporal_client, project, received=2)
    assert (stats["started"], stats["duplicates"]) == (1, 1)
    await assert_eventually(lambda: _count_is(temporal_client, project, 1), what="exactly one target run")


async def _count_is(client: Client, project: str, n: int) -> bool:
    return await _count(client, project) == n


async def test_cloudevents_batch_starts_one_run_per_event(bridge_factory, temporal_client, temporal_address):
    from cloudevents.core.formats.json import JSONFormat
    from cloudevents.core.v1.event import CloudEvent

    project = unique("ceb")
    cfg = config(project, temporal_address, [runner("ce", "order.created", template="order {{ .trigger.n }}")])
    bridge = await bridge_factory(cfg)
    events = [CloudEvent({"id": f"o-{n}", "source": "/shop", "type": "order.created"}, {"n": n}) for n in (1, 2, 3)]
    body = b"[" + b",".join(JSONFormat().write(e) for e in events) + b"]"
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/cloudevents-batch+json"}
    url = f"http://127.0.0.1:{bridge.http_port}/api/v1/events"

    async with httpx.AsyncClient(timeout=30) as http:
        resp = await http.post(url, content=body, headers=headers)
        assert resp.status_code == 202, resp.text
        assert [(r["status"], r["event_id"]) for r in resp.json()["results"]] == [
            (202, "o-1"),
            (202, "o-2"),
            (202, "o-3"),
        ]
        for n in (1, 2, 3):
            wid = target_workflow_id("ce", event_digest("/shop", f"o-{n}"))
            assert (await result_of(temporal_client, wid))["tasks"]["render"] == f"order {n}"

        # The same batch again (a client retry): every event is a duplicate.
        assert (await http.post(url, content=body, headers=headers)).status_code == 202

    stats = await _settled(temporal_client, project, received=6)
    assert (stats["started"], stats["duplicates"]) == (3, 3)
    await assert_eventually(lambda: _count_is(temporal_client, project, 3), what="exactly three target runs")
