"""Fixtures: real services (see tests/services/) and an in-process bridge per test.

A test that needs a service the machine cannot provide is skipped with the reason, unless
``SIGNAL_BRIDGE_REQUIRE_SERVICES=1`` (CI): then it fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from temporalio.client import Client

from bridge.config import BridgeConfig
from bridge.runtime.app import Bridge
from tests import services

REQUIRE = os.environ.get("SIGNAL_BRIDGE_REQUIRE_SERVICES") == "1"


def _provide(get: Callable[[], str]) -> str:
    try:
        return get()
    except services.ServiceUnavailable as exc:
        if REQUIRE:
            pytest.fail(f"service required but unavailable: {exc}", pytrace=False)
        pytest.skip(f"service unavailable: {exc}")


@pytest.fixture(scope="session")
def temporal_address() -> str:
    return _provide(services.temporal_address)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    return _provide(services.kafka_bootstrap)


@pytest.fixture(scope="session")
def amqp_url() -> str:
    return _provide(services.amqp_url)


def _wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise services.ServiceUnavailable("wrk is not installed (scripts/install-services.sh installs it)")
    return path


@pytest.fixture(scope="session")
def wrk() -> str:
    """wrk's path: the bench's HTTP load generator."""
    return _provide(_wrk)


@pytest.fixture(scope="session")
async def temporal_client(temporal_address: str) -> Client:
    return await Client.connect(temporal_address)


@pytest.fixture
async def bridge_factory(temporal_client: Client) -> AsyncIterator[Callable[..., Any]]:
    """Start :class:`Bridge` instances in this process (HTTP on a free port); all stopped after."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(config: BridgeConfig, **kwargs: Any) -> Bridge:
            kwargs.setdefault("client", temporal_client)
            bridge = Bridge(config, **kwargs)
            stack.push_async_callback(bridge.stop)
            await bridge.start()
            return bridge

        yield start
