"""What every locally started server shares: the lifecycle, process groups and cleanup at exit."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

LOG_TAIL_LINES = 40


class ServiceUnavailable(RuntimeError):
    """A server the tests need could not be provided (reason in the message)."""


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code.

    A fresh loop in a worker thread keeps this usable from inside a running event loop
    (async fixtures) as well as from plain sync code.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def cache_dir() -> Path:
    return Path(os.environ.get("SIGNAL_BRIDGE_CACHE") or Path.home() / ".cache" / "signal-bridge")


class LocalService:
    """A server this process starts, with its data and log in `workdir`.

    `stop()` keeps the data so `restart()` brings the same server back on the same ports, which is
    what outage tests need; `close()` also removes the temp dir. Every instance is closed at exit.
    """

    name = "service"
    start_timeout = 90.0

    def __init__(self, workdir: str | os.PathLike[str] | None = None) -> None:
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"signal-bridge-{self.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        track(self.name, self.close)

    @property
    def running(self) -> bool:
        raise NotImplementedError

    def start(self) -> LocalService:
        """Start the server and block until it answers its protocol; no-op when running."""
        raise NotImplementedError

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server; its data stays for restart()."""
        raise NotImplementedError

    def log_tail(self) -> str:
        raise NotImplementedError

    def restart(self) -> LocalService:
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalProcess(LocalService):
    """A server run as a child process in its own process group, ready once its probe passes."""

    port = 0  # the client-facing port, set by subclasses

    def __init__(self, workdir: str | os.PathLike[str] | None = None) -> None:
        super().__init__(workdir)
        self.log_path = self.workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # Subclasses fill these in.
    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _prepare(self) -> None:
        """Create config and data before a (re)start; must be idempotent."""

    async def _probe(self) -> None:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> LocalProcess:
        if self.running:
            return self
        install_sigterm_cleanup()
        self._prepare()
        began = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"==== starting {self.name}: {' '.join(self._command())}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self._command(),
                cwd=self.workdir,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready(began + self.start_timeout)
        logger.info("%s ready in %.1fs (log: %s)", self.name, time.monotonic() - began, self.log_path)
        return self

    def _wait_ready(self, deadline: float) -> None:
        last_error: BaseException | None = None
        while True:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                self.stop()  # reaps what the group leader left behind (e.g. RabbitMQ's epmd)
                raise ServiceUnavailable(f"{self.name} exited with code {code} during start-up\n{self.log_tail()}")
            # Client libraries log refused connections at ERROR; only speak the protocol once the
            # port accepts, so a normal start-up does not fill the test output with them.
            if port_open(self.port):
                try:
                    run_async(self._probe)
                    return
                except Exception as exc:  # any failure just means "not ready yet"
                    last_error = exc
            else:
                last_error = ConnectionRefusedError(f"127.0.0.1:{self.port} not accepting yet")
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceUnavailable(
                    f"{self.name} did not answer within {self.start_timeout:.0f}s "
                    f"(last error: {last_error!r})\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the whole process group (SIGTERM, then SIGKILL); data stays for restart()."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        began = time.monotonic()
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s ignored SIGTERM for %.0fs; killing it", self.name, timeout)
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        # Grandchildren (e.g. the Erlang VM behind the rabbitmq-server script) may outlive the
        # group leader by a moment; make sure none keeps the ports or data files.
        signal_group(proc.pid, signal.SIGKILL)
        logger.info("%s stopped in %.1fs", self.name, time.monotonic() - began)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return f"(no log at {self.log_path})"
        return f"--- last {lines} lines of {self.log_path} ---\n" + "\n".join(text[-lines:])


def signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------------------------------------
# Cleanup: local servers and containers alike are stopped at exit, last started first.


_cleanups: list[tuple[str, Callable[[], object]]] = []
_cleanups_lock = threading.RLock()  # shutdown_all may run from a signal handler


def track(name: str, stop: Callable[[], object]) -> None:
    with _cleanups_lock:
        _cleanups.append((name, stop))


def shutdown_all() -> None:
    """Stop every server this process started and remove their temp dirs.

    At exit a log handler may still hold a stream its owner closed (pytest's capture, after the
    session): each line was then a "Logging error" traceback at the end of every CI run."""
    with _cleanups_lock:
        cleanups = list(reversed(_cleanups))
        _cleanups.clear()
    raising, logging.raiseExceptions = logging.raiseExceptions, False
    try:
        for name, stop in cleanups:
            try:
                stop()
            except Exception:
                logger.exception("failed to stop %s", name)
    finally:
        logging.raiseExceptions = raising


atexit.register(shutdown_all)

_sigterm_installed = False


def install_sigterm_cleanup() -> None:
    """Make SIGTERM (e.g. a CI timeout) stop our servers before the interpreter dies.

    Python's default SIGTERM action skips atexit, which would leave the JVM and Erlang VM running.
    Only replaces the default handler, and only from the main thread where that is allowed.
    Installed at import and re-tried on each start, whichever first runs in the main thread.
    """
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    _sigterm_installed = True
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def on_sigterm(signum: int, frame: object) -> None:
        shutdown_all()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


# At import, because the first server may well be started from a worker thread.
install_sigterm_cleanup()
