"""The HTTP adapter under failure: Temporal stopped, and the bridge itself SIGKILLed mid-stream."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from temporalio.client import Client

from bridge.runtime.embedded import free_port
from tests import services
from tests.helpers import TOKEN, assert_eventually, config, result_of, run_id, runner, unique

pytestmark = pytest.mark.temporal


async def _post(http: httpx.AsyncClient, port: int, name: str, key: str, payload: Any = None) -> httpx.Response:
    return await http.post(
        f"http://127.0.0.1:{port}/api/v1/events",
        json={"name": name, "payload": payload or {}},
        headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": key},
    )


async def test_temporal_down_gives_503_then_recovers(bridge_factory, tmp_path):
    temporal = services.LocalTemporal(tmp_path / "temporal")
    await asyncio.to_thread(temporal.start)
    try:
        client = await Client.connect(temporal.address)
        project = unique("down")
        cfg = config(project, temporal.address, [runner("w", "ping")], http={"retry_after_seconds": 2})
        bridge = await bridge_factory(cfg, client=client)
        async with httpx.AsyncClient(timeout=30) as http:
            assert (await _post(http, bridge.http_port, "ping", "before", {"n": 1})).status_code == 202
            await result_of(client, run_id(project, "w", "before"))

            stopped = await _stop_under_load(http, bridge.http_port, temporal)
            refused, answers = stopped.refused, stopped.answers
            assert {a.status for a in answers} == {503} and len(answers) >= 40
            assert {a.retry_after for a in [*refused, *answers]} == {"2"}  # http.retry_after_seconds
            slowest, after = max(a.seconds for a in refused), max(a.seconds for a in answers)
            print(f"Temporal stopped: 503s within {slowest:.2f} s; once known down within {after:.3f} s")
            # Behaviour, not speed (printed above): no caller waits out the 10 s RPC timeout, and once
            # Temporal is known down nobody queues behind a doomed call.
            assert slowest < 6 and after < 3
            resp = await _post(http, bridge.http_port, "ping", "during", {"n": 2})
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"] == "unavailable"
            ready = await http.get(f"http://127.0.0.1:{bridge.http_port}/readyz", headers=AUTH)
            assert ready.status_code == 503 and ready.json()["checks"]["temporal"] is False

            await asyncio.to_thread(temporal.start)

            async def accepted() -> bool:
                return (await _post(http, bridge.http_port, "ping", "during", {"n": 2})).status_code == 202

            await assert_eventually(accepted, timeout=60, interval=0.5, what="the adapter accepts after the restart")
            got = await result_of(client, run_id(project, "w", "during"))
            assert got["tasks"]["render"] == "got 2"
            for a in stopped.accepted:  # accepted while it went down: each one ran
                await result_of(client, run_id(project, "w", a))
    finally:
        await asyncio.to_thread(temporal.close)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class _Answer:
    status: int
    seconds: float
    retry_after: str | None


@dataclass
class _Outage:
    refused: list[_Answer] = field(default_factory=list)  # every 503, in flight while it stopped too
    answers: list[_Answer] = field(default_factory=list)  # to requests sent once it had stopped
    accepted: list[str] = field(default_factory=list)  # keys accepted


async def _stop_under_load(http: httpx.AsyncClient, port: int, temporal: services.LocalTemporal) -> _Outage:
    """Eight clients post events without pause; Temporal stops under them. Every request is timed
    until its answer."""
    outage = _Outage()
    down = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def client(k: int) -> None:
        for i in range(10_000):
            sent_after_stop = down.is_set()
            began = loop.time()
            resp = await _post(http, port, "ping", f"load-{k}-{i}", {"n": i})
            answer = _Answer(resp.status_code, loop.time() - began, resp.headers.get("retry-after"))
            if resp.status_code == 202:
                outage.accepted.append(f"load-{k}-{i}")
            else:
                outage.refused.append(answer)
            if sent_after_stop:
                outage.answers.append(answer)
                if len(outage.answers) >= 40:
                    return

    async def stop() -> None:
        await assert_eventually(lambda: len(outage.accepted) >= 20, timeout=30, interval=0.05)
        await asyncio.to_thread(temporal.stop)
        down.set()

    await asyncio.gather(stop(), *(client(k) for k in range(8)))
    return outage


def _serve(cfg_path: Path, data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SIGNAL_BRIDGE_DATA_DIR": str(data_dir)}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "bridge.runtime.cli", "serve", "--config", str(cfg_path)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip


async def test_sigkill_mid_stream_runs_every_event_once(temporal_client, temporal_address, tmp_path):
    """Clients retry what was not acknowledged; the bridge dies hard and comes back."""
    n, kill_after = 300, 100
    project = unique("kill")
    idle_queue = unique("no-worker")
    target = unique("t")  # run ids are namespace-wide: another test's "t" + "ev-0" would collide
    port = free_port()
    cfg = {
        "project": project,
        "temporal": {"address": temporal_address},
        "http": {"port": port, "auth": {"tokens": [TOKEN]}},
        "workflows": [
            {"id": target, "workflow_type": "Noop", "task_queue": idle_queue, "triggers": [{"name": "tick"}]}
        ],
    }
    cfg_path = tmp_path / "bridge.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "bridge.log"
    proc = _serve(cfg_path, tmp_path, log)
    accepted = 0
    killed = asyncio.Event()
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            await assert_eventually(lambda: _healthy(http, port), timeout=60, what="bridge up")

            async def send(i: int) -> None:
                nonlocal accepted
                while True:
                    try:
                        resp = await _post(http, port, "tick", f"ev-{i}", {"i": i})
                        if resp.status_code == 202:
                            accepted += 1
                            return
                        assert resp.status_code == 503, resp.text
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.2)

            async def killer() -> None:
                nonlocal proc
                await assert_eventually(lambda: accepted >= kill_after, timeout=120, interval=0.01)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed.set()
                proc = _serve(cfg_path, tmp_path, log)

            sem = asyncio.Semaphore(8)

            async def limited(i: int) -> None:
                async with sem:
                    await send(i)

            await asyncio.gather(killer(), *(limited(i) for i in range(n)))
        assert killed.is_set() and accepted == n

        query = f'TaskQueue="{idle_queue}"'
        await assert_eventually(lambda: _count(temporal_client, query, n), timeout=120, interval=1.0, what=f"{n} runs")
        missing = [
            i for i in range(n)
            if not await _exists(temporal_client, run_id(project, target, f"ev-{i}"))
        ]  # fmt: skip
        assert not missing
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert "Traceback" not in log.read_text().split("signal-bridge started")[-1]


async def _healthy(http: httpx.AsyncClient, port: int) -> bool:
    try:
        return (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
    except httpx.TransportError:
        return False


async def _count(client: Client, query: str, n: int) -> bool:
    count = (await client.count_workflows(query)).count
    assert count <= n, f"{count} runs for {n} events"
    return count == n


async def _exists(client: Client, wid: str) -> bool:
    try:
        await client.get_workflow_handle(wid).describe()
    except Exception:
        return False
    return True
