"""The process's life: a part of it that ends without being asked to ends the process, with an
error, so that a supervisor restarts it (a worker gone stalls every event that reaches Temporal;
an HTTP server or embedded Temporal server gone answers 503 for ever)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from temporalio.service import RPCError, RPCStatusCode

from bridge.errors import BridgeError, Unavailable
from bridge.runtime import embedded
from bridge.runtime.app import Bridge, run_until_signalled
from bridge.snapshot import load
from tests.helpers import REQUIRE

CONFIG = {
    "project": "life",
    "temporal": {"address": "127.0.0.1:1"},
    "http": {"auth": {"tokens": ["a-token-long-enough-for-the-check-0001"]}},
    "workflows": [{"id": "w", "workflow_type": "W", "triggers": [{"name": "a"}]}],
}


@pytest.fixture
def bridge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Bridge:
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    made = Bridge(load(path), config_path=path, watch=False)
    made.stopped = 0  # type: ignore[attr-defined]

    async def stop() -> None:
        made.stopped += 1  # type: ignore[attr-defined]

    monkeypatch.setattr(made, "stop", stop)
    monkeypatch.setattr(gc, "freeze", lambda: None)
    return made


async def run(bridge: Bridge, start: Any) -> None:
    bridge.start = start  # type: ignore[method-assign]
    await asyncio.wait_for(run_until_signalled(bridge), timeout=10)


async def test_a_worker_that_dies_stops_the_process_with_an_error(bridge: Bridge) -> None:
    async def start() -> None:
        async def worker() -> None:
            raise RuntimeError("Namespace default is not found")

        bridge._worker_task = asyncio.create_task(worker())

    with pytest.raises(BridgeError, match=r"the worker stopped: RuntimeError.*not found"):
        await run(bridge, start)
    assert bridge.stopped == 1  # type: ignore[attr-defined]


async def test_an_http_server_that_ends_stops_the_process(bridge: Bridge) -> None:
    async def start() -> None:
        bridge._http_task = asyncio.create_task(asyncio.sleep(0))

    with pytest.raises(BridgeError, match="the HTTP server stopped"):
        await run(bridge, start)


async def test_an_embedded_server_that_exits_stops_the_process(bridge: Bridge) -> None:
    class Gone:
        returncode = -9

        def poll(self) -> int:
            return self.returncode

    class Embedded:
        process = Gone()
        running = False
        ui_url = None

    async def start() -> None:
        bridge.embedded = Embedded()  # type: ignore[assignment]

    with pytest.raises(BridgeError, match="embedded Temporal server exited with -9"):
        await run(bridge, start)


async def test_a_queue_adapter_whose_loop_ended_stops_the_process(bridge: Bridge) -> None:
    class Consumer:
        name = "kafka:orders"

        def ended(self) -> str | None:
            return "its loop ended: KafkaError('fatal')"

    async def start() -> None:
        bridge.adapters.append(Consumer())  # type: ignore[arg-type]

    with pytest.raises(BridgeError, match=r"the kafka:orders adapter stopped consuming: its loop ended"):
        await run(bridge, start)


async def test_a_stop_asked_for_is_no_error(bridge: Bridge) -> None:
    async def start() -> None:
        bridge._worker_task = asyncio.create_task(asyncio.sleep(3600))
        asyncio.get_running_loop().call_later(0.1, os.kill, os.getpid(), signal.SIGTERM)

    await run(bridge, start)  # returns: no error
    assert bridge.stopped == 1  # type: ignore[attr-defined]
    assert bridge._worker_task is not None
    bridge._worker_task.cancel()


CHILD = """
import asyncio, os, signal, sys
import bridge.runtime.embedded as embedded
embedded.temporal_binary = lambda: sys.argv[1]
async def answers(*args, **kwargs):
    return None
embedded.check_ready = answers
async def main():
    server = embedded.EmbeddedTemporal(sys.argv[2], ui=False)
    await server.start()
    pid = server.process.pid
    while b"sleep" not in open(f"/proc/{pid}/cmdline", "rb").read():  # setpriv has set the signal and exec'd
        await asyncio.sleep(0.01)
    print(pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
asyncio.run(main())
"""


@pytest.mark.skipif(  # never skipped where services are required (CI): util-linux is essential on Debian
    not REQUIRE and (not sys.platform.startswith("linux") or not embedded._setpriv()), reason="setpriv --pdeathsig"
)
def test_an_embedded_server_ends_with_a_bridge_that_was_killed(tmp_path: Path) -> None:
    """A bridge killed outright cannot stop its embedded server; the server must not outlive it
    (it would keep the ports, and the next start would run a second server on its database)."""
    fake = tmp_path / "temporal"
    fake.write_text("#!/bin/sh\nexec sleep 120\n")
    fake.chmod(0o755)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(fake), str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    server = int(done.stdout.split()[0])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(server):
        time.sleep(0.05)
    try:
        assert not _alive(server), "the embedded server outlived the bridge"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie whose parent has not reaped it yet is gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return False


def test_a_setpriv_without_pdeathsig_starts_the_server_plainly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = tmp_path / "setpriv"
    old.write_text("#!/bin/sh\necho \"setpriv: unrecognized option '--pdeathsig'\" >&2\nexit 1\n")
    old.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    embedded._setpriv.cache_clear()
    try:
        assert embedded.with_parent(["temporal", "server"]) == ["temporal", "server"]
    finally:
        embedded._setpriv.cache_clear()


def test_an_unexpected_error_is_reported_and_exits_1(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    """Not a traceback out of main(): entry() must still leave by os._exit (sdk-python#300)."""
    from bridge.runtime import cli

    def fails(args: Any, role: str) -> int:
        raise ConnectionRefusedError("the broker at 127.0.0.1:5672 refused")

    monkeypatch.setattr(cli, "_serve", fails)
    assert cli.main(["serve", "--config", "x.yaml"]) == 1
    assert "the broker at 127.0.0.1:5672 refused" in capsys.readouterr().err


async def test_each_queue_adapter_says_when_its_loop_ended_unasked() -> None:
    from adapters import kafka
    from bridge.pipeline import Pipeline
    from bridge.routing import RouteTable
    from tests.fakes import FakeSink
    from tests.unit.test_amqp_parse import make_adapter
    from tests.unit.test_kafka_parse import kafka_config

    cfg = kafka_config()
    adapters = [
        kafka.build(cfg.kafka[0], Pipeline(RouteTable.from_config(cfg), FakeSink()), cfg),
        make_adapter(FakeSink()),
    ]

    async def fails() -> None:
        raise RuntimeError("fatal")

    for adapter in adapters:
        assert adapter.ended() is None, "not started"
        adapter._task = asyncio.create_task(fails())
        await asyncio.wait({adapter._task})
        assert adapter.ended() == "its loop ended: RuntimeError('fatal')"
        adapter._stopping.set()
        assert adapter.ended() is None, "a loop that ends in a stop ended as asked"


async def test_a_failed_look_up_tells_the_client_its_status_and_the_log_the_rest(
    bridge: Bridge, caplog: pytest.LogCaptureFixture
) -> None:
    """The look-up's 503 quoted Temporal's error to any token holder: hosts, TLS setup."""

    class Refusing:
        namespace = "default"

        def list_workflows(self, *args: Any, **kwargs: Any) -> Any:
            raise RPCError(
                "dns error: failed to lookup address temporal.internal.example", RPCStatusCode.UNAVAILABLE, b""
            )

    bridge.client = Refusing()  # type: ignore[assignment]
    with pytest.raises(Unavailable) as caught:
        await bridge.look_up("order-1", "http:token-1")
    assert "temporal.internal" not in str(caught.value) and "UNAVAILABLE" in str(caught.value)
    assert any("temporal.internal" in r.getMessage() for r in caplog.records)
