"""Webhooks and CloudEvents batches end to end: the bridge's own HTTP port, a real Temporal.

Target runs are found by listing the project's task queue, not by recomputing their run ids:
what a test asserts is how many runs start, whatever the id scheme."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from tests.helpers import TOKEN, assert_eventually, config, dispatcher_stats, result_of, runner, unique, workflow_ids

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


async def _settled(client: Client, project: str, received: int) -> dict[str, Any]:
    """The dispatcher's counters once it has taken ``received`` events and has none queued."""

    async def check() -> dict[str, Any]:
        stats = await dispatcher_stats(client, project)
        return stats if stats["received"] == received and stats["backlog"] == 0 else {}

    return await assert_eventually(check, what=f"dispatcher {project} processed {received} events")


def _runs(project: str) -> str:
    return f'TaskQueue="{project}" AND WorkflowType="SignalBridgeTasks"'


async def _count(client: Client, project: str) -> int:
    return (await client.count_workflows(_runs(project))).count


async def _only_run(client: Client, project: str) -> str:
    """The id of the one target run of ``project``, once it is listed."""

    async def listed() -> list[str]:
        return await workflow_ids(client, _runs(project))

    [wid] = await assert_eventually(listed, what=f"a target run of {project} listed")
    return wid


def _github_config(project: str, temporal_address: str) -> Any:
    return config(
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


def push() -> dict[str, Any]:
    """A push body of its own (GitHub's carry the head commit): the body names the delivery, and a
    dev server keeps the runs of earlier tests and sessions."""
    return {"ref": "refs/heads/main", "repository": {"full_name": "octo/repo"}, "after": uuid.uuid4().hex}


async def test_signed_github_delivery_starts_once_even_when_redelivered(
    bridge_factory, temporal_client, temporal_address
):
    """The provider's redelivery reaches another process of the bridge (which has not seen it: a
    process answers a repeat of what it accepted itself as it did, without Temporal); the
    dispatcher takes it for the event it has already started."""
    project = unique("gh")
    bridge = await bridge_factory(_github_config(project, temporal_address))
    other_process = await bridge_factory(_github_config(project, temporal_address), role="ingress", insecure=True)
    body, headers = github_delivery(push(), "push", str(uuid.uuid4()))

    async with hooks_client(bridge) as http:
        first = await http.post("/api/v1/hooks/github", content=body, headers=headers)
        assert first.status_code == 202, first.text
        result = await result_of(temporal_client, await _only_run(temporal_client, project))
        assert result["tasks"]["render"] == "pushed refs/heads/main to octo/repo"

        forged = await http.post(
            "/api/v1/hooks/github", content=body, headers={**headers, "X-Hub-Signature-256": "sha256=00"}
        )
        assert forged.status_code == 401
        ping_body, ping_headers = github_delivery({"zen": "Speak like a human."}, "ping", str(uuid.uuid4()))
        ping = await http.post("/api/v1/hooks/github", content=ping_body, headers=ping_headers)
        assert (ping.status_code, ping.json()["status"]) == (200, "ignored")
    async with hooks_client(other_process) as http:
        again = await http.post("/api/v1/hooks/github", content=body, headers=headers)
        assert again.status_code == 202, again.text
        assert again.json()["results"] == first.json()["results"]

    stats = await _settled(temporal_client, project, received=2)
    assert (stats["started"], stats["duplicates"]) == (1, 1)
    await assert_eventually(lambda: _count_is(temporal_client, project, 1), what="exactly one target run")


async def test_a_replayed_github_delivery_with_new_guids_starts_nothing_new(
    bridge_factory, temporal_client, temporal_address
):
    """A captured delivery (body and signature) resent under fresh X-GitHub-Delivery GUIDs, which
    GitHub does not sign: the same delivery, answered as when it was accepted, without a signal."""
    project = unique("ghr")
    bridge = await bridge_factory(_github_config(project, temporal_address))
    body, captured = github_delivery(push(), "push", str(uuid.uuid4()))

    async with hooks_client(bridge) as http:
        answers = []
        for guid in (captured["X-GitHub-Delivery"], str(uuid.uuid4()), str(uuid.uuid4())):
            resp = await http.post(
                "/api/v1/hooks/github", content=body, headers={**captured, "X-GitHub-Delivery": guid}
            )
            assert resp.status_code == 202, resp.text
            answers.append(resp.json())
    assert answers[0]["results"] == answers[1]["results"] == answers[2]["results"]
    assert answers[0]["delivery_id"].startswith("sha256:")

    assert answers[0] == answers[1] == answers[2]
    stats = await _settled(temporal_client, project, received=1)
    assert (stats["started"], stats["duplicates"]) == (1, 0)
    result = await result_of(temporal_client, await _only_run(temporal_client, project))
    assert result["tasks"]["render"] == "pushed refs/heads/main to octo/repo"
    await assert_eventually(lambda: _count_is(temporal_client, project, 1), what="exactly one target run")


async def test_a_token_holder_cannot_pre_empt_a_signed_delivery(bridge_factory, temporal_client, temporal_address):
    """A CloudEvent sent with a bearer token, claiming the webhook's source and the genuine
    delivery's event id, runs in its own scope (http:token-1): the signed delivery that follows
    still starts its run."""
    project = unique("forge")
    cfg = _github_config(project, temporal_address)
    bridge = await bridge_factory(cfg)
    body, headers = github_delivery(push(), "push", str(uuid.uuid4()))
    genuine_id = f"sha256:{hashlib.sha256(body).hexdigest()}:github.push"
    forged = {
        "specversion": "1.0",
        "type": "github.push",
        "source": "webhook:github",
        "id": genuine_id,
        "data": {"ref": "refs/heads/forged", "repo": "evil/repo"},
    }
    async with hooks_client(bridge) as http:
        resp = await http.post(
            "/api/v1/events",
            json=forged,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/cloudevents+json"},
        )
        assert resp.status_code == 202, resp.text
        assert (await http.post("/api/v1/hooks/github", content=body, headers=headers)).status_code == 202

    await _settled(temporal_client, project, received=2)
    await assert_eventually(lambda: _count_is(temporal_client, project, 2), what="two target runs")
    results = [await result_of(temporal_client, wid) for wid in await workflow_ids(temporal_client, _runs(project))]
    assert sorted(r["tasks"]["render"] for r in results) == [
        "pushed refs/heads/forged to evil/repo",
        "pushed refs/heads/main to octo/repo",
    ]


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
        results = resp.json()["results"]
        assert [r["status"] for r in results] == [202, 202, 202]
        # Each event id is made of its CloudEvent's source and id (docs/cloudevents.md).
        assert [r["event_id"].endswith(f"o-{n}") for n, r in zip((1, 2, 3), results, strict=True)] == [True] * 3

        async def three_runs() -> list[str]:
            ids = await workflow_ids(temporal_client, _runs(project))
            return ids if len(ids) == 3 else []

        runs = await assert_eventually(three_runs, what="three target runs listed")
        rendered = {(await result_of(temporal_client, wid))["tasks"]["render"] for wid in runs}
        assert rendered == {"order 1", "order 2", "order 3"}

        # The same batch again (a client retry): every event is a duplicate.
        assert (await http.post(url, content=body, headers=headers)).status_code == 202

    stats = await _settled(temporal_client, project, received=6)
    assert (stats["started"], stats["duplicates"]) == (3, 3)
    await assert_eventually(lambda: _count_is(temporal_client, project, 3), what="exactly three target runs")
