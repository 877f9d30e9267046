"""The seed's end-to-end flow over the HTTP adapter, against a real Temporal dev server."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from temporalio.client import Client, WorkflowFailureError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

from bridge.config import read_config
from tests.helpers import (
    HTTP_SCOPE,
    TOKEN,
    assert_eventually,
    config,
    dispatcher_stats,
    post_ticks,
    result_of,
    run_id,
    runner,
    unique,
)
from tests.integration.user_workflows import UserProcessOrder

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
    wid = run_id(project, "process-order", "k-1")
    result = await result_of(temporal_client, wid)
    assert result["tasks"]["process-order"] == "Processing order 123"
    desc = await temporal_client.get_workflow_handle(wid).describe()
    memo = await desc.memo()
    assert memo["event_name"] == "order.created" and memo["event_id"] == "k-1"


async def _absent(client: Client, wid: str) -> bool:
    try:
        await client.get_workflow_handle(wid).describe()
    except RPCError as exc:
        return exc.status == RPCStatusCode.NOT_FOUND
    return False


async def test_fan_out_and_filter(bridge_factory, temporal_client, temporal_address):
    project = unique("fan")
    cfg = config(
        project,
        temporal_address,
        [
            runner("first", "order.created"),
            runner("second", "order.created", template="second {{ .trigger.n }}"),
            runner("big-only", "order.created", filter="payload.n > 100"),
        ],
    )
    bridge = await bridge_factory(cfg)
    assert (await _post(bridge, {"name": "order.created", "payload": {"n": 7}}, key="e1")).status_code == 202
    assert (await result_of(temporal_client, run_id(project, "first", "e1")))["tasks"]["render"] == "got 7"
    assert (await result_of(temporal_client, run_id(project, "second", "e1")))["tasks"]["render"] == "second 7"
    stats = await assert_eventually(lambda: dispatcher_stats(temporal_client, project), what="stats readable")
    assert stats["started"] == 2
    assert await _absent(temporal_client, run_id(project, "big-only", "e1"))

    assert (await _post(bridge, {"name": "order.created", "payload": {"n": 500}}, key="e2")).status_code == 202
    result = await result_of(temporal_client, run_id(project, "big-only", "e2"))
    assert result["tasks"]["render"] == "got 500"


async def test_same_idempotency_key_starts_once(bridge_factory, temporal_client, temporal_address):
    project = unique("idem")
    bridge = await bridge_factory(config(project, temporal_address, [runner("a", "x"), runner("b", "x")]))
    for _ in range(3):
        resp = await _post(bridge, {"name": "x", "payload": {"n": 1}}, key="same-key")
        assert resp.status_code == 202 and resp.json()["event_id"] == "same-key"
    # The body id is the key when no header is given: same event again.
    assert (await _post(bridge, {"name": "x", "id": "same-key", "payload": {"n": 1}})).status_code == 202
    await result_of(temporal_client, run_id(project, "a", "same-key"))
    await result_of(temporal_client, run_id(project, "b", "same-key"))

    async def all_processed() -> dict[str, Any]:
        stats = await dispatcher_stats(temporal_client, project)
        return stats if stats["received"] == 4 and stats["backlog"] == 0 else {}

    stats = await assert_eventually(all_processed)
    assert stats["started"] == 2
    assert stats["duplicates"] == 3
    query = f'TaskQueue="{project}" AND WorkflowType="SignalBridgeTasks"'
    await assert_eventually(lambda: _count_is(temporal_client, query, 2))


async def _count_is(client: Client, query: str, n: int) -> bool:
    return (await client.count_workflows(query)).count == n


async def test_unknown_event_and_schema_violation_get_422(bridge_factory, temporal_client, temporal_address):
    project = unique("rej")
    wf = runner("typed", "order.created")
    wf["triggers"][0]["schema"] = {"type": "object", "required": ["orderId"]}
    bridge = await bridge_factory(config(project, temporal_address, [wf]))

    resp = await _post(bridge, {"name": "order.typo", "payload": {"orderId": "1"}}, key="u1")
    assert resp.status_code == 422
    assert resp.json()["error"] == "unroutable"

    resp = await _post(bridge, {"name": "order.created", "payload": {"n": 1}}, key="s1")
    assert resp.status_code == 422
    body = resp.json()
    assert body["error"] == "schema_invalid"
    assert body["workflow"] == "typed" and body["schema_path"] == "required"

    # A good event afterwards is a barrier: once it ran, the dispatcher saw everything sent.
    assert (await _post(bridge, {"name": "order.created", "payload": {"orderId": "9"}}, key="g1")).status_code == 202
    await result_of(temporal_client, run_id(project, "typed", "g1"))
    stats = await dispatcher_stats(temporal_client, project)
    assert stats["received"] == 1 and stats["started"] == 1
    assert await _absent(temporal_client, run_id(project, "typed", "s1"))


async def test_user_workflow_type_on_own_task_queue(bridge_factory, temporal_client, temporal_address):
    project = unique("user")
    queue = unique("user-q")
    cfg = config(
        project,
        temporal_address,
        [
            {
                "id": "process-order",
                "workflow_type": "UserProcessOrder",
                "task_queue": queue,
                "input": {"order": "{{ .trigger.orderId }}", "kind": "{{ .event.name }}"},
                "triggers": [{"type": "signal", "name": "order.created"}],
            }
        ],
    )
    bridge = await bridge_factory(cfg)
    async with Worker(temporal_client, task_queue=queue, workflows=[UserProcessOrder]):
        resp = await _post(bridge, {"name": "order.created", "payload": {"orderId": "A-7"}}, key="u-7")
        assert resp.status_code == 202
        got = await result_of(temporal_client, run_id(project, "process-order", "u-7"))
    assert got["workflow_id"] == "process-order"
    assert got["exec_id"]
    assert got["trigger"] == {"orderId": "A-7"}
    assert got["input"] == {"order": "A-7", "kind": "order.created"}
    assert got["event"]["id"] == "u-7" and got["event"]["name"] == "order.created"
    assert got["event"]["source"] == HTTP_SCOPE  # the scope the adapter set: http:{token name}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("start_mode", ["child", "activity"])
async def test_continue_as_new_loses_and_doubles_nothing(bridge_factory, temporal_client, temporal_address, start_mode):
    """2,000 events through a dispatcher that must continue-as-new several times."""
    project = unique("can")
    idle_queue = unique("no-worker")  # children start (that is what we count) but never run
    target = unique("t")  # run ids are namespace-wide: another test's "t" + "ev-0" would collide
    n = 2000
    cfg = config(
        project,
        temporal_address,
        [{"id": target, "workflow_type": "Noop", "task_queue": idle_queue, "triggers": [{"name": "tick"}]}],
        dispatcher={
            "history_events_threshold": 600,
            "children_per_run": 400,
            "batch_size": 100,
            "start_mode": start_mode,
        },
    )
    bridge = await bridge_factory(cfg)
    async with httpx.AsyncClient(timeout=60) as http:
        codes = await post_ticks(http, f"http://127.0.0.1:{bridge.http_port}/api/v1/events", range(n), 32)
    assert codes.count(202) == n

    async def done() -> dict[str, Any]:
        stats = await dispatcher_stats(temporal_client, project)
        return stats if stats["started"] + stats["duplicates"] >= n else {}

    stats = await assert_eventually(done, timeout=780, interval=1.0)
    assert stats["started"] == n and stats["duplicates"] == 0 and stats["failed"] == 0
    assert stats["run"] >= 3, stats
    await assert_eventually(
        lambda: _count_is(temporal_client, f'TaskQueue="{idle_queue}"', n), timeout=60, interval=1.0
    )
    for i in range(0, n, 97):
        assert not await _absent(temporal_client, run_id(project, target, f"ev-{i}"))


def _write_config(tmp_path: Path, project: str, temporal_address: str, *workflows: dict[str, Any]) -> Path:
    """The file a reloading bridge reads; each write gets a new mtime, even within one clock tick."""
    path = tmp_path / "bridge.yaml"
    data = {
        "project": project,
        "temporal": {"address": temporal_address},
        "http": {"port": 0, "auth": {"tokens": [TOKEN]}},
        "workflows": list(workflows),
    }
    stamp = path.stat().st_mtime + 1 if path.exists() else None
    path.write_text(yaml.safe_dump(data))
    if stamp is not None:
        os.utime(path, (stamp, stamp))
    return path


async def test_reload_picks_up_new_triggers(bridge_factory, temporal_client, temporal_address, tmp_path):
    """A new trigger in the file takes effect at the adapter and in the dispatcher after a reload."""
    project = unique("reload")
    path = _write_config(tmp_path, project, temporal_address, runner("w", "first"))
    bridge = await bridge_factory(config(project, temporal_address, [runner("w", "first")]), config_path=path)
    assert (await _post(bridge, {"name": "second", "payload": {"n": 1}}, key="r0")).status_code == 422

    _write_config(tmp_path, project, temporal_address, runner("w", "first", "second"))
    await bridge.reload()
    assert (await _post(bridge, {"name": "second", "payload": {"n": 2}}, key="r1")).status_code == 202
    got = await result_of(temporal_client, run_id(project, "w", "r1"))
    assert got["tasks"]["render"] == "got 2"


async def test_file_watcher_applies_a_changed_config(bridge_factory, temporal_client, temporal_address, tmp_path):
    """Without SIGHUP or a reload call: the watcher sees the new mtime, swaps the snapshot, and
    tells the dispatcher, which starts the new trigger's workflow."""
    project = unique("watch")
    path = _write_config(tmp_path, project, temporal_address, runner("w", "first"))
    bridge = await bridge_factory(config(project, temporal_address, [runner("w", "first")]), config_path=path)
    assert (await _post(bridge, {"name": "second", "payload": {"n": 1}}, key="w0")).status_code == 422

    _write_config(tmp_path, project, temporal_address, runner("w", "first", "second"))

    async def routable() -> bool:
        return bridge.source.current.routes.is_routable("second")

    await assert_eventually(routable, timeout=15, what="the watcher reloaded the file")
    assert (await _post(bridge, {"name": "second", "payload": {"n": 3}}, key="w1")).status_code == 202
    got = await result_of(temporal_client, run_id(project, "w", "w1"))
    assert got["tasks"]["render"] == "got 3"


class _Hook:
    """A loopback HTTP endpoint for http tasks: answers 500 under /fail, else 200; records requests."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, str], bytes]] = []
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        target = head[0].split(" ")[1]
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:] if line)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.got.append((target, headers, body))
        status = 500 if target.startswith("/fail") else 200
        writer.write(b'HTTP/1.1 %d X\r\nContent-Length: 11\r\n\r\n{"ok":true}' % status)
        await writer.drain()
        writer.close()


def _readable(history: Any) -> str:
    """A history as JSON, with every payload's data decoded (the JSON form holds it in base64)."""
    text: str = history.to_json()
    return text + "".join(base64.b64decode(m).decode(errors="replace") for m in _DATA.findall(text))


_DATA = re.compile(r'"data": "([A-Za-z0-9+/=]+)"')


async def test_secrets_from_the_environment_never_reach_history(
    bridge_factory, temporal_client, temporal_address, tmp_path, monkeypatch, caplog
):
    """${HOOK_SECRET} in an http task's URL, header and body: the call carries the value; no
    event of any run's history does (the runner's holds the reference), nor does the failure of a
    call, nor the log; and a payload's own ``${HOOK_SECRET}`` is sent as text."""
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("HOOK_SECRET", secret)
    hook = _Hook()
    listener = await asyncio.start_server(hook.handle, "127.0.0.1", 0)
    hook.port = listener.sockets[0].getsockname()[1]
    project = unique("secret")
    base = f"http://127.0.0.1:{hook.port}"

    def task(path: str, **extra: Any) -> dict[str, Any]:
        config = {
            "url": f"{base}/{path}?key=${{HOOK_SECRET}}",
            "headers": {"X-Secret": "${HOOK_SECRET}"},
            "body": {"note": "{{ .trigger.note }}", "sig": "sha=${HOOK_SECRET}"},
            **extra,
        }
        return {"id": "call", "type": "http", "config": config}

    data = {
        "project": project,
        "temporal": {"address": temporal_address},
        "http": {"port": 0, "auth": {"tokens": [TOKEN]}},
        "runner": {"allow_hosts": [f"127.0.0.1:{hook.port}"]},
        "workflows": [
            {"id": "notify", "triggers": [{"name": "order.created"}], "tasks": [task("ok/{{ .trigger.orderId }}")]},
            {"id": "failing", "triggers": [{"name": "order.created"}], "tasks": [task("fail", max_attempts=1)]},
        ],
    }
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(data))
    async with listener:
        bridge = await bridge_factory(read_config(path))
        body = {"name": "order.created", "payload": {"orderId": "o-1", "note": "${HOOK_SECRET}"}}
        assert (await _post(bridge, body, key="s-1")).status_code == 202
        ok = await result_of(temporal_client, run_id(project, "notify", "s-1"))
        with pytest.raises(WorkflowFailureError):
            await result_of(temporal_client, run_id(project, "failing", "s-1"))

    assert ok["tasks"]["call"] == {"status": 200, "body": {"ok": True}}
    [sent] = [g for g in hook.got if g[0].startswith("/ok")]
    assert sent[0] == f"/ok/o-1?key={secret}" and sent[1]["x-secret"] == secret
    assert json.loads(sent[2]) == {"note": "${HOOK_SECRET}", "sig": f"sha={secret}"}
    for wid in (run_id(project, "notify", "s-1"), run_id(project, "failing", "s-1"), f"dispatcher-{project}"):
        history = _readable(await temporal_client.get_workflow_handle(wid).fetch_history())
        assert secret not in history, wid
        if wid.startswith(("notify", "failing")):
            assert "${HOOK_SECRET}" in history  # the task list the runner loaded, as written
    failing = _readable(await temporal_client.get_workflow_handle(run_id(project, "failing", "s-1")).fetch_history())
    assert f"POST {base}/fail?***: answered 500" in failing
    assert secret not in caplog.text
