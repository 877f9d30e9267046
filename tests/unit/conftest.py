"""Fixtures the HTTP adapter's unit tests share: an in-memory sink and a client of the app over it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.fakes import FakeSink
from tests.unit.http_support import make_app


@pytest.fixture
def sink() -> FakeSink:
    return FakeSink()


@pytest.fixture
async def client(sink: FakeSink) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(make_app(sink)) as c:
        yield c
