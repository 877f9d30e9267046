"""RabbitMQ for the tests: a private node of Debian's rabbitmq-server, or a container."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from bridge.runtime.embedded import free_port
from tests.services import containers
from tests.services.process import LocalProcess, ServiceUnavailable, port_open, signal_group


async def probe(url: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(url, timeout=5)
    await connection.close()


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
        self.port = port or free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
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
            if port_open(self.epmd_port):
                return
            time.sleep(0.1)
        raise ServiceUnavailable(f"epmd did not start on port {self.epmd_port}")

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)
        epmd, self._epmd_proc = self._epmd_proc, None
        if epmd is not None:
            signal_group(epmd.pid, signal.SIGKILL)
            epmd.wait()

    async def _probe(self) -> None:
        await probe(self.url)


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


def from_container() -> str:
    from testcontainers.core.container import DockerContainer

    container = containers.start(DockerContainer("rabbitmq:3.13-alpine").with_exposed_ports(5672))
    url = f"amqp://guest:guest@{container.get_container_host_ip()}:{container.get_exposed_port(5672)}/"
    containers.wait_probe("rabbitmq container", lambda: probe(url), 90)
    return url


def from_local() -> str:
    return LocalRabbitMQ().start().url
