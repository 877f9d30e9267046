"""In-memory stand-ins shared by the unit tests: one sink for every adapter's tests."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from bridge.errors import EventRejected, Unavailable
from bridge.event import EventSignal


class FakeSink:
    """Holds what the pipeline submits, like Temporal would; can be told to fail.

    ``outages``: the next N submissions raise Unavailable. ``bugs``: the next N raise RuntimeError
    (an unexpected failure). ``max_events``: a submission larger than this is ``too_large``, as a
    signal over the size limit is. ``release``: when set, submissions wait for it (to hold one in
    flight). ``unavailable``: while set, every submission raises it.
    """

    def __init__(
        self, *, outages: int = 0, bugs: int = 0, max_events: int | None = None, retry_after: float = 0.01
    ) -> None:
        self.outages = outages
        self.bugs = bugs
        self.max_events = max_events
        self.retry_after = retry_after
        self.unavailable: Unavailable | None = None
        self.release: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.calls: list[list[str]] = []
        self.events: list[EventSignal] = []

    @property
    def held(self) -> list[EventSignal]:
        return self.events

    async def submit(self, events: Sequence[EventSignal]) -> None:
        self.calls.append([e.id for e in events])
        self.entered.set()
        if self.release is not None:
            await self.release.wait()
        if self.unavailable is not None:
            raise self.unavailable
        if self.bugs:
            self.bugs -= 1
            raise RuntimeError("a bug")
        if self.outages:
            self.outages -= 1
            raise Unavailable("Temporal is down", self.retry_after)
        if self.max_events is not None and len(events) > self.max_events:
            raise EventRejected("too_large", "too many bytes for one signal")
        self.events.extend(events)
