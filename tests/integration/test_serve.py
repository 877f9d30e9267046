"""`signal-bridge serve` as an operator runs it: embedded Temporal, tokens, clean shutdown, `send`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from bridge.runtime.embedded import free_port
from tests.helpers import TOKEN, assert_eventually, unique

pytestmark = pytest.mark.temporal
CLI = [sys.executable, "-m", "bridge.runtime.cli"]


def _write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


async def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode()


async def test_refuses_to_start_without_a_token(tmp_path, temporal_address):
    cfg = _write(tmp_path, {"project": "p", "temporal": {"address": temporal_address}, "workflows": []})
    code, out = await _run(*CLI, "serve", "--config", str(cfg))
    assert code == 1
    assert "no bearer token" in out and "--insecure" in out


async def test_embedded_temporal_serves_and_shuts_down_cleanly(tmp_path):
    """No temporal.address: the dev server is started, used, and stopped on SIGTERM."""
    port = free_port()
    cfg = _write(
        tmp_path,
        {
            "project": unique("emb"),
            "temporal": {"ui": False},
            "http": {"port": port, "auth": {"tokens": [TOKEN]}},
            "workflows": [
                {
                    "id": "w",
                    "triggers": [{"name": "hello"}],
                    "tasks": [{"id": "t", "config": {"template": "hi {{ .trigger.who }}"}}],
                }
            ],
        },
    )
    data = tmp_path / "data"
    proc = await asyncio.create_subprocess_exec(
        *CLI, "serve", "--config", str(cfg),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "SIGNAL_BRIDGE_DATA_DIR": str(data)},
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(timeout=10) as http:

            async def ready() -> bool:
                try:
                    return (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await assert_eventually(ready, timeout=90, what="serve ready")
            assert (data / "temporal.db").exists()
            code, out = await _run(
                *CLI, "send", "hello", "--payload", '{"who": "ops"}', "--url", f"http://127.0.0.1:{port}",
                "--token", TOKEN, "--id", "first",
            )  # fmt: skip
            assert code == 0, out
            assert out.startswith("202 ") and '"event_id":"first"' in out
            code, out = await _run(*CLI, "send", "hello", "--url", f"http://127.0.0.1:{port}", "--token", "wrong")
            assert code == 1 and out.startswith("401 ")
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, out.decode()[-3000:]
        assert b"signal-bridge stopped" in out
        assert not await _temporal_running(str(data / "temporal.db"))
        with contextlib.closing(sqlite3.connect(data / "temporal.db")) as db:  # what the server wrote
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        if proc.returncode is None:  # a failed assertion: stop it as an operator would
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _temporal_running(db: str) -> bool:
    _, out = await _run("ps", "-eo", "args")
    return any(db in line for line in out.splitlines())
