"""The processes a bench run starts, and the guarantee that it stops every one of them.

Every subprocess (the bridge's ``serve``, ``ingress`` and ``worker`` processes, the bare endpoint,
wrk) runs in its own session with its output in a log file, and is registered in :data:`PROCS`;
``__main__`` stops them all in a ``finally`` (also on Ctrl-C and SIGTERM), and an ``atexit`` hook
does it once more should anything escape that.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.report import process_peak_rss_mib
from bridge.runtime.embedded import free_port

TOKEN = "bench-token"
TOKEN_NAME = "bench"  # the events' source is http:bench


class Proc:
    """One subprocess in its own session; :meth:`stop` signals its whole process group."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        with open(log_path, "wb") as out:
            self.popen = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        PROCS.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def peak_rss_mib(self) -> float | None:
        return process_peak_rss_mib(self.pid) if self.alive else None

    def output(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def exited(self) -> str:
        """Why it is gone: the exit code and the last line it wrote, then its output's tail."""
        tail = self.output()
        last = next((ln.strip() for ln in reversed(tail.splitlines()) if ln.strip()), "no output")
        return f"{self.name} exited ({self.popen.returncode}): {last}\n{tail}"

    async def wait(self, timeout: float) -> int | None:
        """The exit code once the process ends, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.popen.poll()
            if code is not None:
                return code
            await asyncio.sleep(0.1)
        return None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the group, SIGKILL after ``timeout`` seconds; no-op when already stopped."""
        if self in PROCS:
            PROCS.remove(self)
        if self.popen.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


PROCS: list[Proc] = []


def stop_all() -> None:
    """Stop every process still registered, newest first (callers stop ingress before workers)."""
    for proc in reversed(list(PROCS)):
        proc.stop(timeout=5.0)


atexit.register(stop_all)


def signal_bridge_command() -> list[str]:
    """``signal-bridge``, the console script beside this interpreter (else ``python -m``)."""
    beside = Path(sys.executable).parent / "signal-bridge"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("signal-bridge")
    return [found] if found else [sys.executable, "-m", "bridge.runtime.cli"]


def child_env(data_dir: Path) -> dict[str, str]:
    """The environment without any ``SIGNAL_BRIDGE_*`` override (the config file says it all)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNAL_BRIDGE_")}
    env["SIGNAL_BRIDGE_DATA_DIR"] = str(data_dir)
    env["SIGNAL_BRIDGE_LOG_LEVEL"] = "WARNING"
    return env


async def wait_http(url: str, procs: list[Proc], timeout: float = 60.0, method: str = "GET") -> None:
    """Until ``url`` answers 2xx; raise early when one of ``procs`` exits, with its output."""
    deadline = time.monotonic() + timeout
    last = ""
    async with httpx.AsyncClient(timeout=5) as h:
        while time.monotonic() < deadline:
            for proc in procs:
                if not proc.alive:
                    raise RuntimeError(proc.exited())
            try:
                resp = await h.request(method, url, json={"name": "ping"} if method == "POST" else None)
                if resp.is_success:
                    return
                last = f"{resp.status_code} {resp.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            await asyncio.sleep(0.2)
    outputs = "\n".join(f"--- {p.name}:\n{p.output()}" for p in procs)
    raise RuntimeError(f"{url} did not answer in {timeout:.0f}s (last: {last})\n{outputs}")


def bridge_config(
    *,
    project: str,
    address: str,
    mode: str | None,
    targets: dict[str, str],
    shards: int = 1,
    kafka: list[dict[str, Any]] | None = None,
    amqp: list[dict[str, Any]] | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A config as a user writes it. ``targets``: event name → task queue of its target workflow
    (a queue no worker polls). ``mode`` None leaves ``start_mode`` out: the default. ``settings``:
    more ``dispatcher`` settings (the bench's ``--dispatcher``)."""
    dispatcher: dict[str, Any] = {"shards": shards, **(settings or {})}
    if mode is not None:
        dispatcher["start_mode"] = mode
    config: dict[str, Any] = {
        "project": project,
        "temporal": {"address": address},
        "dispatcher": dispatcher,
        "http": {"host": "127.0.0.1", "auth": {"tokens": [{"name": TOKEN_NAME, "token": TOKEN}]}},
        "workflows": [
            {"id": name, "workflow_type": "Noop", "task_queue": queue, "triggers": [{"name": name}]}
            for name, queue in targets.items()
        ],
    }
    if kafka:
        config["kafka"] = kafka
    if amqp:
        config["amqp"] = amqp
    return config


class Bridge:
    """One bridge deployment from one generated config file: either one ``serve``, or
    n ``ingress`` plus m ``worker`` (the scale-out). Events go to :attr:`ports`."""

    def __init__(self, workdir: Path, config: dict[str, Any], *, ingress: int = 0, workers: int = 0) -> None:
        self.project = str(config["project"])
        self.shards = int(config.get("dispatcher", {}).get("shards", 1))
        self.dir = workdir / self.project
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "bridge.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.ingress = ingress
        self.workers = workers
        self.procs: list[Proc] = []
        self.ports: list[int] = []

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}/api/v1/events" for port in self.ports]

    def _spawn(self, role: str, index: int, port: int | None) -> Proc:
        cmd = [*signal_bridge_command(), role, "--config", str(self.config_path)]
        if port is not None:
            cmd += ["--http-port", str(port)]
        name = f"{role}-{index}"
        return Proc(name, cmd, self.dir / f"{name}.log", child_env(self.dir / f"data-{name}"))

    async def start(self, timeout: float = 90.0) -> None:
        """Start the processes and wait for every HTTP port's ``/readyz`` (workers have none:
        the caller's warm-up events show they run)."""
        if not self.ingress and not self.workers:
            self.ports = [free_port()]
            self.procs.append(self._spawn("serve", 1, self.ports[0]))
        else:
            for i in range(self.workers):
                self.procs.append(self._spawn("worker", i + 1, None))
            for i in range(self.ingress):
                port = free_port()
                self.ports.append(port)
                self.procs.append(self._spawn("ingress", i + 1, port))
        for port in self.ports:
            await wait_http(f"http://127.0.0.1:{port}/readyz", self.procs, timeout)

    def check_alive(self) -> None:
        for proc in self.procs:
            if not proc.alive:
                raise RuntimeError(proc.exited())

    def peak_rss_mib(self) -> dict[str, float | None]:
        return {proc.name: proc.peak_rss_mib() for proc in self.procs}

    def stop(self) -> None:
        """Ingress first, then workers (the order a user stops them in)."""
        for proc in sorted(self.procs, key=lambda p: p.name.startswith("worker")):
            proc.stop()


class Bare:
    """``python -m bench.bare`` on a free port; with ``temporal``, the durable endpoint, which
    answers once each request's events are signaled to the workflow ``workflow_id`` there."""

    def __init__(self, workdir: Path, temporal: str | None = None, workflow_id: str = "") -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "bench.bare", "--port", str(self.port)]
        if temporal:
            cmd += ["--temporal", temporal, "--workflow-id", workflow_id]
        self.proc = Proc("bare", cmd, workdir / f"bare-{self.port}.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1/events"

    async def start(self) -> None:
        await wait_http(self.url, [self.proc], method="POST")

    def stop(self) -> None:
        self.proc.stop()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
