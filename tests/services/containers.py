"""Servers in containers, used only when a Docker engine answers."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

from tests.services.process import ServiceUnavailable, run_async, track


def docker_available() -> bool:
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


def start(container: Any) -> Any:
    """Start a testcontainers container and stop it at exit."""
    container.start()
    track("container", container.stop)
    return container


def wait_probe(what: str, probe: Callable[[], Coroutine[Any, Any, None]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            run_async(probe)
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"{what} did not answer within {timeout:.0f}s: {exc!r}") from exc
            time.sleep(1)
