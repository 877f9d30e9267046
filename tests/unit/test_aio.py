"""bridge.aio.within: a timed wait that never loses its caller's cancellation."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable

import pytest

from bridge.aio import within


async def test_it_says_whether_the_awaitable_finished_in_time() -> None:
    event = asyncio.Event()
    assert await within(0.01, event.wait()) is False
    event.set()
    assert await within(0.01, event.wait()) is True


async def test_the_awaitable_is_cancelled_when_the_time_runs_out() -> None:
    began = asyncio.get_running_loop().create_future()
    ended: list[str] = []

    async def slow() -> None:
        began.set_result(None)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise

    assert await within(0.01, slow()) is False
    assert began.done() and ended == ["cancelled"]


def _loop_on(wait: Callable[[asyncio.Event], Awaitable[object]]) -> Callable[[asyncio.Event], Awaitable[None]]:
    async def loop(event: asyncio.Event) -> None:
        while True:  # as the watchers do: each wake-up is cleared and waited for again
            await wait(event)
            event.clear()

    return loop


async def _cancel_as_the_event_is_set(loop: Callable[[asyncio.Event], Awaitable[None]], turns: int) -> bool:
    """Whether ``loop`` ended cancelled when cancelled ``turns`` turns of the event loop after its
    event was set (one of them is the moment the wait's result arrived)."""
    event = asyncio.Event()
    task = asyncio.create_task(loop(event))
    await asyncio.sleep(0.01)  # it waits
    event.set()
    for _ in range(turns):
        await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=0.5)
    if not done:
        task.cancel()  # once more, to end the test's task
        await asyncio.wait({task}, timeout=0.5)
        return False
    return task.cancelled()


@pytest.mark.parametrize("turns", range(6))
async def test_a_cancellation_that_meets_the_event_is_raised_not_lost(turns: int) -> None:
    loop = _loop_on(lambda event: within(10, event.wait()))
    assert await _cancel_as_the_event_is_set(loop, turns)


async def test_the_race_it_avoids_is_real_on_this_python_with_wait_for() -> None:
    """The same loop on ``asyncio.wait_for`` loses the cancellation at one of those moments on
    3.11 (python/cpython#86296): what the test above guards against."""
    loop = _loop_on(lambda event: asyncio.wait_for(event.wait(), 10))
    outcomes = [await _cancel_as_the_event_is_set(loop, turns) for turns in range(6)]
    if sys.version_info >= (3, 12):
        assert all(outcomes), outcomes
    else:
        assert not all(outcomes), outcomes
