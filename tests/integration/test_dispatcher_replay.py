"""The dispatcher's own histories replay on its code, however often it is queried meanwhile.

A dispatcher whose workflow task is lost (a worker restart, a cache eviction, a task Temporal
refused) replays its history. If the replay decides differently from the run that wrote it, every
later task fails with a nondeterminism error and the dispatcher starts nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import httpx
import pytest
from temporalio.client import Client
from temporalio.worker import Replayer
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from dispatcher.contract import DISPATCHER_WORKFLOW, STATS_QUERY, dispatcher_id
from dispatcher.worker import PASSTHROUGH
from dispatcher.workflow import DispatcherWorkflow
from tests.helpers import TOKEN, assert_eventually, config, dispatcher_stats, post_ticks, unique

pytestmark = pytest.mark.temporal


async def _query_all_the_time(client: Client, workflow_id: str) -> int:
    """Ask the stats query over and over, as operators' tools and the bridge's clients may."""
    handle = client.get_workflow_handle(workflow_id)
    asked = 0
    while True:
        with contextlib.suppress(Exception):
            await handle.query(STATS_QUERY, rpc_timeout=None)
            asked += 1
        await asyncio.sleep(0.002)


async def _replay_failures(client: Client, workflow_id: str) -> list[str]:
    sandbox = SandboxedWorkflowRunner(restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH))
    replayer = Replayer(workflows=[DispatcherWorkflow], workflow_runner=sandbox)
    failures = []
    async for run in client.list_workflows(f'WorkflowId="{workflow_id}"'):
        history = await client.get_workflow_handle(workflow_id, run_id=run.run_id).fetch_history()
        result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        if result.replay_failure is not None:
            failures.append(f"{run.run_id}: {result.replay_failure}")
    return failures


@pytest.mark.timeout(600)
async def test_histories_written_under_queries_replay(bridge_factory, temporal_client, temporal_address):
    """Events at a trickle, so that batches are small and the queue often empty, while the stats
    query is asked every few milliseconds; then every run of the dispatcher replays. A local
    activity's result that Temporal delivered with the next workflow task (it answered a query
    meanwhile) made a replay decide otherwise, and the dispatcher stalled on a nondeterminism error."""
    project = unique("replay")
    target = unique("t")
    n = 600
    cfg = config(
        project,
        temporal_address,
        [
            {
                "id": target,
                "workflow_type": "Noop",
                "task_queue": unique("no-worker"),
                "triggers": [{"name": "tick", "filter": "payload.i >= 0"}],
            }
        ],
        dispatcher={"history_events_threshold": 1500, "batch_size": 20},
    )
    bridge = await bridge_factory(cfg)
    workflow_id = dispatcher_id(project, 0, 1)
    url = f"http://127.0.0.1:{bridge.http_port}/api/v1/events"
    async with httpx.AsyncClient(timeout=60) as http:
        first = await http.post(
            url, json={"name": "tick", "payload": {"i": 0}}, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert first.status_code == 202
        queries = [asyncio.create_task(_query_all_the_time(temporal_client, workflow_id)) for _ in range(3)]
        try:
            codes = await post_ticks(http, url, range(1, n), 3)
            assert codes.count(202) == n - 1

            async def done() -> dict[str, Any]:
                stats = await dispatcher_stats(temporal_client, project)
                return stats if stats["started"] >= n else {}

            stats = await assert_eventually(done, timeout=300, interval=1.0)
        finally:
            for task in queries:
                task.cancel()
            await asyncio.gather(*queries, return_exceptions=True)
    assert stats["started"] == n and stats["duplicates"] == 0 and stats["failed"] == 0, stats
    assert await _replay_failures(temporal_client, workflow_id) == []


@pytest.mark.timeout(300)
async def test_a_dispatcher_whose_workflow_tasks_keep_failing_is_reported(
    bridge_factory, temporal_client, temporal_address, caplog
):
    """A dispatcher whose every workflow task fails (here: an input it cannot decode, as a
    nondeterminism error would) starts nothing while its events arrive: the bridge logs an ERROR
    naming it and shows it in ``signal_bridge_dispatcher_tasks_failing``."""
    caplog.set_level(logging.ERROR, logger="dispatcher.client")
    project = unique("failing")
    cfg = config(
        project,
        temporal_address,
        [{"id": "t", "workflow_type": "Noop", "task_queue": unique("no-worker"), "triggers": [{"name": "tick"}]}],
    )
    workflow_id = dispatcher_id(project, 0, 1)
    await temporal_client.start_workflow(
        DISPATCHER_WORKFLOW, "no DispatcherInput", id=workflow_id, task_queue=cfg.task_queue
    )
    bridge = await bridge_factory(cfg)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bridge.http_port}", timeout=30) as http:

        async def reported() -> bool:
            resp = await http.post("/api/v1/events", json={"name": "tick", "payload": {}}, headers=auth)
            assert resp.status_code == 202  # taken: it waits in the run's history
            text = (await http.get("/metrics", headers=auth)).text
            assert f'signal_bridge_dispatcher_tasks_failing{{dispatcher="{workflow_id}"}} 1.0' in text
            return True

        await assert_eventually(reported, timeout=120, interval=2.0, what="the failing tasks shown")
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and r.name == "dispatcher.client"]
    assert any("fails its workflow tasks" in e and workflow_id in e for e in errors), errors
    await temporal_client.get_workflow_handle(workflow_id).terminate("test over")
