"""Temporal for the tests: the project's own embedded dev server, or a container."""

from __future__ import annotations

import os
from pathlib import Path

from bridge.errors import BridgeError
from bridge.runtime.embedded import EmbeddedTemporal, check_ready, free_port, temporal_binary
from dispatcher import search
from tests.services import containers
from tests.services.process import LocalService, ServiceUnavailable, install_sigterm_cleanup, run_async


class LocalTemporal(LocalService):
    """The `EmbeddedTemporal` that `make run` starts, headless, on a free port, with its SQLite file
    in `workdir`: a restart keeps the port and the workflow state."""

    name = "temporal"
    start_timeout = 60.0

    def __init__(self, workdir: str | os.PathLike[str] | None = None, port: int | None = None) -> None:
        try:
            temporal_binary()
        except BridgeError as exc:
            raise ServiceUnavailable(str(exc)) from None
        super().__init__(workdir)
        # Not the 7233 a developer's `make run` would take: the tests may run beside it.
        self.server = EmbeddedTemporal(self.workdir, port=port or free_port(), ui=False)

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def log_path(self) -> Path:
        return self.server.log_path

    @property
    def running(self) -> bool:
        return self.server.running

    def start(self) -> LocalTemporal:
        install_sigterm_cleanup()
        try:
            run_async(lambda: self.server.start(self.start_timeout))
        except BridgeError as exc:
            raise ServiceUnavailable(f"temporal: {exc}") from None
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.stop(timeout)

    def log_tail(self) -> str:
        return f"--- end of {self.server.log_path} ---\n{self.server.log_tail()}"


def from_container() -> str:
    from testcontainers.core.container import DockerContainer

    container = containers.start(
        DockerContainer("temporalio/temporal:latest")
        .with_command(" ".join(["server start-dev --ip 0.0.0.0 --headless", *search.dev_server_flags()]))
        .with_exposed_ports(7233)
    )
    address = f"{container.get_container_host_ip()}:{container.get_exposed_port(7233)}"
    containers.wait_probe("temporal container", lambda: check_ready(address), 90)
    return address


def from_local() -> str:
    return LocalTemporal().start().address
