"""The dispatcher's limits against the real dev server: no payload stalls it (events near the 1 MiB
limit with filters that would take seconds each, read back from its own history), and no backlog
makes it drop what it took (more events than a run can start within its history's bounds)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import httpx
import pytest
from temporalio.api.enums.v1 import EventType, WorkflowTaskFailedCause
from temporalio.client import Client

import dispatcher.client
from bridge.errors import Overloaded
from bridge.event import MAX_SIGNAL_BYTES, EventSignal
from bridge.metrics import Metrics
from bridge.snapshot import Snapshot
from dispatcher import workflow as dispatcher_workflow
from dispatcher.client import DispatcherClient
from dispatcher.contract import dispatcher_id
from dispatcher.worker import build_worker
from tests.helpers import TOKEN, assert_eventually, config, count_workflows, dispatcher_stats, unique

pytestmark = pytest.mark.temporal

WFT_STARTED = EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED
WFT_ENDED = {
    EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED,
    EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED,
    EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT,
}


SERVER_REFUSED = {
    WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_FORCE_CLOSE_COMMAND,
    WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_UNHANDLED_COMMAND,
}


def big_payload(n: int) -> dict[str, Any]:
    """About 880 KB of JSON (110,000 integers): 2^63 at the end, which CEL holds only as a uint."""
    return {"kind": "big", "n": n, "items": [*range(1_000_000, 1_110_000), 2**63]}


async def workflow_task_durations(client: Client, workflow_id: str) -> list[timedelta]:
    """WorkflowTaskStarted → its end, for every run of the workflow (continue-as-new included).

    A workflow task may end failed only as the server refuses a completion, whatever the worker
    does, and the next task replays and goes on: FORCE_CLOSE_COMMAND, while more than 2 MiB of
    signals wait for it (three of these events); UNHANDLED_COMMAND, when the task continued as new
    and a signal came in while it was being completed (seen once in a full integration run here, the
    next event sent as the run rotated). Any other failure or a timeout is a defect.
    """
    durations: list[timedelta] = []
    async for execution in client.list_workflows(f'WorkflowId="{workflow_id}"'):
        history = await client.get_workflow_handle(workflow_id, run_id=execution.run_id).fetch_history()
        started = None
        for event in history.events:
            if event.event_type == WFT_STARTED:
                started = event.event_time.ToDatetime()
            elif event.event_type in WFT_ENDED and started is not None:
                if event.event_type != EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
                    cause = event.workflow_task_failed_event_attributes.cause
                    assert cause in SERVER_REFUSED, event
                durations.append(event.event_time.ToDatetime() - started)
                started = None
    return durations


async def test_events_near_the_size_limit_with_costly_filters_fail_no_workflow_task(
    bridge_factory: Any, temporal_client: Client, temporal_address: str
) -> None:
    project = unique("limits")
    idle = unique("no-worker")  # targets start (that is what is checked) but never run

    def target(wid: str, expr: str) -> dict[str, Any]:
        return {"id": wid, "workflow_type": "Noop", "task_queue": idle, "triggers": [{"name": "big", "filter": expr}]}

    cfg = config(
        project,
        temporal_address,
        [
            target(unique("walk"), "payload.items.exists(i, i == -1)"),  # seconds each, unbounded
            target(unique("whole"), "size(payload) > 0"),  # converts all 110,001 integers
            target(unique("cheap"), 'payload.kind == "big" && payload.n >= 0'),  # converts two values
        ],
    )
    bridge = await bridge_factory(cfg)
    n = 6
    async with httpx.AsyncClient(timeout=60) as http:
        for i in range(n):
            body = json.dumps({"name": "big", "payload": big_payload(i)}, separators=(",", ":"))
            assert MAX_SIGNAL_BYTES * 0.8 < len(body) < MAX_SIGNAL_BYTES

            async def sent(i: int = i, body: str = body) -> httpx.Response | None:
                resp = await http.post(
                    f"http://127.0.0.1:{bridge.http_port}/api/v1/events",
                    content=body,
                    headers={
                        "Authorization": f"Bearer {TOKEN}",
                        "Idempotency-Key": f"big-{i}",
                        "Content-Type": "application/json",
                    },
                )
                # As a client would: a dispatcher that has not looked at its routes yet, or is busy
                # with these events' filters, may answer that it can take no more for now.
                return None if resp.status_code == 503 and resp.json()["error"] == "overloaded" else resp

            resp = await assert_eventually(sent, timeout=60, interval=0.5, what=f"event {i} taken")
            assert resp.status_code == 202, resp.text

    async def all_dispatched() -> dict[str, Any]:
        stats = await dispatcher_stats(temporal_client, project)
        return stats if stats["received"] == n and stats["started"] + stats["failed"] >= n else {}

    stats = await assert_eventually(all_dispatched, timeout=120, interval=0.5)
    assert (stats["started"], stats["filter_limited"], stats["failed"], stats["unroutable"]) == (n, 2 * n, 0, 0)

    async def all_started() -> bool:
        return await count_workflows(temporal_client, f'TaskQueue="{idle}"') == n

    await assert_eventually(all_started, timeout=30, what="every target run exists")

    # Every task ended completed (or force-closed by the server for the signals waiting on it): a
    # task past the SDK's 2 s deadlock detector, or timed out, fails workflow_task_durations. How
    # long they took is reported, not asserted (a timing is the benchmark's to measure).
    durations = await workflow_task_durations(temporal_client, dispatcher_id(project, 0, 1))
    print(f"dispatcher workflow tasks: {len(durations)}, longest {max(durations).total_seconds():.3f} s")


async def test_a_backlog_past_what_a_run_can_start_is_refused_as_overloaded_and_none_is_dropped(
    temporal_client: Client, temporal_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events arriving far faster than their targets start: a run that reached its history bounds
    with more queued than it can carry would count the rest failed, after their 202s. The client
    refuses them instead (``overloaded``) once the run's ``accept_bytes`` is spent, and every event
    it took starts. The bounds are shrunk so that a few thousand events reach them; the worker runs
    in this process, with the shrunk bounds."""
    monkeypatch.setattr(dispatcher_workflow, "DRAIN_HISTORY_BYTES", 1024 * 1024)
    monkeypatch.setattr(dispatcher_workflow, "FULL_MARGIN", 320 * 1024)  # as in production, 30% of the bound
    monkeypatch.setattr(dispatcher_workflow, "DRAIN_SOFT_BYTES", 256 * 1024)
    monkeypatch.setattr(dispatcher_workflow, "CARRY_LIMIT_BYTES", 16 * 1024)
    monkeypatch.setattr(dispatcher_workflow, "MAX_CARRY_BYTES", 64 * 1024)
    monkeypatch.setattr(dispatcher.client, "WATCH_EVERY", 0.05)
    # The client judges a run that has not answered yet by the same bounds.
    monkeypatch.setattr(dispatcher.client, "DRAIN_HISTORY_BYTES", dispatcher_workflow.DRAIN_HISTORY_BYTES)
    monkeypatch.setattr(dispatcher.client, "FULL_MARGIN", dispatcher_workflow.FULL_MARGIN)
    project = unique("room")
    idle = unique("no-worker")  # targets start (that is what is checked) but never run
    entry = {"id": unique("w"), "workflow_type": "Noop", "task_queue": idle, "triggers": [{"name": "order.created"}]}
    cfg = config(project, temporal_address, [entry], dispatcher={"starts_in_flight": 2})
    accepted = refused = 0
    async with build_worker(temporal_client, Snapshot.compile(cfg), cfg.task_queue):
        client = DispatcherClient(temporal_client, cfg, Metrics())
        for i in range(60):
            events = [
                EventSignal(id=f"e{i}-{k}", name="order.created", payload={"i": i}, source="http:t") for k in range(100)
            ]
            try:
                await client.submit(events)
                accepted += len(events)
            except Overloaded:
                refused += len(events)
        async with asyncio.timeout(60):  # a close() that hangs fails here, not at pytest's timeout
            await client.close()
        assert refused and accepted, (accepted, refused)

        async def all_started() -> dict[str, Any]:
            stats = await dispatcher_stats(temporal_client, project)
            taken = stats["started"] + stats["failed"]
            assert stats["backlog"] == 0 and stats["received"] >= accepted and taken >= accepted, stats
            return stats

        stats = await assert_eventually(all_started, timeout=240, interval=1.0, what="every event taken started")
    print(f"accepted {accepted}, refused {refused}, dispatcher runs {stats['run']}")
    assert (stats["started"], stats["failed"], stats["received"]) == (accepted, 0, accepted), stats
