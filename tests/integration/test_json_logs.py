"""JSON logs parse line by line: ``signal-bridge serve`` on the example config with an embedded
Temporal and ``SIGNAL_BRIDGE_LOG_FORMAT=json``, every line it writes is one JSON object."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.runtime.embedded import free_port
from tests.helpers import assert_eventually

pytestmark = pytest.mark.temporal
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "shop.yaml"
CLI = [sys.executable, "-m", "bridge.runtime.cli"]
TOKEN = "dev-token"  # examples/shop.yaml: ${BRIDGE_TOKEN:-dev-token}


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BRIDGE_TOKEN", "SIGNAL_BRIDGE_TEMPORAL_ADDRESS")}
    return {**env, "SIGNAL_BRIDGE_DATA_DIR": str(tmp_path / "data"), "SIGNAL_BRIDGE_LOG_FORMAT": "json"}


def _parse(text: str) -> list[dict[str, Any]]:
    """Each line on its own; a line that is not one JSON object fails with the line in the message."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            pytest.fail(f"line {n} is not JSON ({exc}): {line[:500]!r}")
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= record.keys(), line
        datetime.fromisoformat(record["time"])
        out.append(record)
    return out


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def _stop_servers_using(data_dir: Path) -> None:
    """SIGTERM any embedded Temporal server left running on ``data_dir`` (found by its command line).

    A bridge whose HTTP port is taken exits without stopping its embedded server (uvicorn's
    SystemExit passes by Bridge.stop); this test must not leave one behind either way.
    """
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc_dir / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"start-dev" in args and any(str(data_dir).encode() in a for a in args):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc_dir.name), signal.SIGTERM)


def _check_serve_logs(stderr: str, stdout: str) -> None:
    records = _parse(stderr)
    assert stdout == ""  # nothing beside the log (the SDK core's own lines went to stdout)
    messages = [r["message"] for r in records]
    [embedded] = [r for r in records if r["logger"] == "bridge.runtime.embedded"]
    server_log = embedded["message"].split("server_log=")[1]
    assert Path(server_log).exists() and "Temporal" in Path(server_log).read_text()  # its own output: there
    [routes] = [r for r in records if r["message"].startswith("routes loaded")]
    assert routes["logger"] == "temporalio.workflow" and routes["workflow_id"] == "dispatcher-shop" and routes["run_id"]
    assert not [m for m in messages if "'attempt'" in m or "'namespace'" in m]
    assert any(r["logger"] == "bridge.pipeline" and "reason=unroutable" in r["message"] for r in records)
    assert any("signal-bridge stopped" in m for m in messages)


async def test_serve_writes_one_json_object_per_line(tmp_path: Path) -> None:
    port = free_port()
    stderr, stdout = tmp_path / "stderr", tmp_path / "stdout"
    with open(stderr, "wb") as err, open(stdout, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *CLI, "serve", "--config", str(EXAMPLE), "--http-port", str(port),
            stdout=out, stderr=err, env=_env(tmp_path),
        )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

            async def ready() -> bool:
                if proc.returncode is not None:
                    pytest.fail(f"serve exited with {proc.returncode}: {stderr.read_text()[-3000:]}")
                try:
                    return (await http.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await assert_eventually(ready, timeout=90, what=lambda: f"serve ready; {stderr.read_text()[-3000:]}")
            auth = {"Authorization": f"Bearer {TOKEN}"}
            sent = await http.post(
                "/api/v1/events",
                json={"name": "order.created", "payload": {"orderId": "1", "amount": 500}},
                headers=auth,
            )
            assert sent.status_code == 202, sent.text
            refused = await http.post("/api/v1/events", json={"name": "no.such\nevent", "payload": {}}, headers=auth)
            assert refused.status_code == 422, refused.text
        await assert_eventually(
            lambda: "routes loaded" in stderr.read_text(), timeout=30, what="the dispatcher's first line"
        )
        await _stop(proc)
        assert proc.returncode == 0, stderr.read_text()[-3000:]
    finally:
        await _stop(proc)
        _stop_servers_using(tmp_path / "data")

    _check_serve_logs(stderr.read_text(), stdout.read_text())


async def test_a_port_in_use_is_reported_in_json_too(tmp_path: Path) -> None:
    """uvicorn's own lines (here: it cannot bind) go through the bridge's handler, not uvicorn's."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            *CLI, "serve", "--config", str(EXAMPLE), "--http-port", str(port),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(tmp_path),
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 90)
        finally:
            await _stop(proc)
            _stop_servers_using(tmp_path / "data")
    assert proc.returncode != 0
    assert out == b""
    records = _parse(err.decode())
    assert any(r["logger"] == "uvicorn.error" and "address already in use" in r["message"] for r in records), records
