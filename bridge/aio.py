"""Waiting with a time limit without losing a cancellation.

On Python 3.11 ``asyncio.wait_for`` returns the awaited result when its task is cancelled just as
that result arrives (python/cpython#86296, fixed in 3.12 by rewriting ``wait_for`` on
``asyncio.timeout``). A loop around it then carries on with the cancellation lost, and whoever
cancelled it and waits for it to end (a shutdown) waits forever: the dispatcher client's
``close()`` hung so, cancelling a watcher whose event had just been set. ``asyncio.timeout``
tells its own cancellation from others and raises the others, so the waits in loops use it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable


def how_it_ended(task: asyncio.Task[object]) -> str:
    """How a task that is done ended, to follow a sentence: "", " (cancelled)" or ": {exc!r}"."""
    if task.cancelled():
        return " (cancelled)"
    exc = task.exception()
    return f": {exc!r}" if exc is not None else ""


async def within(seconds: float, awaitable: Awaitable[object]) -> bool:
    """Await ``awaitable`` for at most ``seconds``: True when it finished, False when the time ran
    out first (it is cancelled then). A cancellation of the caller is raised, whenever it comes."""
    try:
        async with asyncio.timeout(seconds):
            await awaitable
    except TimeoutError:
        return False
    return True
