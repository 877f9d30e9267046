"""A connection that does not send a request's head in time is closed (bridge.runtime.http_protocol)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn

from bridge.runtime import http_protocol
from bridge.runtime.http_protocol import HeadTimeoutProtocol
from tests.helpers import assert_eventually


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] != "/early":  # answers before the body has come, as a 408 or 413 does
        while (await receive()).get("more_body"):
            pass
    await send({"type": "http.response.start", "status": 202, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
async def port(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[int]:
    monkeypatch.setattr(http_protocol, "HEAD_TIMEOUT", 0.3)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_config=None, lifespan="off", http=HeadTimeoutProtocol, limit_concurrency=4
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    await assert_eventually(lambda: server.started, timeout=10, interval=0.01, what="uvicorn started")
    yield server.servers[0].sockets[0].getsockname()[1]
    server.should_exit = True
    await asyncio.wait_for(task, 5)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before it closed the connection (raises TimeoutError if it did not)."""
    return await asyncio.wait_for(reader.read(), seconds)


REQUEST = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}"


async def test_a_connection_that_sends_nothing_or_half_a_head_is_closed(port: int) -> None:
    """Without the deadline each was held for good, and max_concurrent_requests of them left every
    other request a 503."""
    silent = await asyncio.open_connection("127.0.0.1", port)
    half = await asyncio.open_connection("127.0.0.1", port)
    half[1].write(b"POST /x HTTP/1.1\r\nHost: t\r\n")
    assert await closed_within(silent[0], 3) == b""
    assert await closed_within(half[0], 3) == b""
    for _, writer in (silent, half):
        writer.close()


async def test_requests_in_time_are_answered_and_the_next_head_is_awaited_again(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(2):  # keep-alive: a second request on the same connection, each within the deadline
        writer.write(REQUEST)
        answer = await asyncio.wait_for(reader.readuntil(b"ok"), 3)
        assert answer.startswith(b"HTTP/1.1 202")
        await asyncio.sleep(0.1)
    writer.write(b"POST /x HTTP/1.1\r\n")  # then a head that stops half-way
    assert (await closed_within(reader, 3)) == b""
    writer.close()


async def test_a_body_still_trickling_after_its_answer_does_not_hold_the_connection(port: int) -> None:
    """The handler answers (here at once, as a 408 or 413 would) while the body has not all come;
    bytes trickled after it kept the connection, since any byte reset uvicorn's keep-alive wait."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /early HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n{")

    async def trickle() -> None:
        for _ in range(100):
            writer.write(b" ")
            await asyncio.sleep(0.05)

    trickling = asyncio.create_task(trickle())
    sent = await closed_within(reader, 3)  # a byte every 50 ms, for 5 s: closed long before
    assert sent.startswith(b"HTTP/1.1 202") and sent.endswith(b"ok")
    trickling.cancel()
    writer.close()
