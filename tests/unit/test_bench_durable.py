"""The burst's durable bare endpoint (``bench.bare.Durable``) with a fake Temporal client: a
request is answered only once the signal carrying its events returned, one signal at a time goes
per workflow, and it carries every request that waited for it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bench.bare import Durable


class _Client:
    """``start_workflow`` waits until the test lets each call return (or fail)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Any]]] = []
        self.released: list[asyncio.Future[None]] = []

    async def start_workflow(self, *_: Any, id: str, start_signal_args: list[Any], **__: Any) -> None:
        self.calls.append((id, start_signal_args[0]))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.released.append(done)
        await done


def _durable(shards: int = 1) -> tuple[Durable, _Client]:
    durable = Durable("127.0.0.1:1", "wf", shards)
    client = _Client()
    durable.client = client  # type: ignore[assignment]
    return durable, client


async def _turn() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_request_waits_for_the_signal_carrying_it_and_later_ones_share_the_next() -> None:
    durable, client = _durable()
    first = asyncio.create_task(durable.put(["a"]))
    await _turn()
    second = asyncio.create_task(durable.put(["b", "c"]))
    third = asyncio.create_task(durable.put(["d"]))
    await _turn()
    assert client.calls == [("wf-0", ["a"])]  # one signal in flight
    assert not first.done()
    client.released[0].set_result(None)
    await _turn()
    assert first.done() and not second.done() and not third.done()
    assert client.calls[1] == ("wf-0", ["b", "c", "d"])
    client.released[1].set_result(None)
    await asyncio.gather(second, third)
    assert len(client.calls) == 2


async def test_a_failed_signal_fails_every_request_it_carried() -> None:
    durable, client = _durable()
    first = asyncio.create_task(durable.put(["a"]))
    await _turn()
    client.released[0].set_exception(RuntimeError("unavailable"))
    with pytest.raises(RuntimeError, match="unavailable"):
        await first
    later = asyncio.create_task(durable.put(["b"]))  # the next request gets a sender of its own
    await _turn()
    assert client.calls[1] == ("wf-0", ["b"])
    client.released[1].set_result(None)
    await later


async def test_shards_take_requests_in_turn_each_with_its_own_signal_in_flight() -> None:
    durable, client = _durable(shards=2)
    puts = [asyncio.create_task(durable.put([n])) for n in "ab"]
    await _turn()
    puts.append(asyncio.create_task(durable.put(["c"])))
    await _turn()
    assert client.calls == [("wf-0", ["a"]), ("wf-1", ["b"])]
    for released in client.released[:2]:
        released.set_result(None)
    await _turn()
    assert client.calls[2] == ("wf-0", ["c"])
    client.released[2].set_result(None)
    await asyncio.gather(*puts)
