"""How many starts one worker process has waiting on Temporal at once.

Each target start and signal is a write on the Temporal server, and so is the signal that hands
an adapter's events to the dispatcher. A server that is the bottleneck (one dev server on
SQLite, or a small cluster) serves them in turn: with hundreds of starts queued there, an HTTP
``202`` or a broker acknowledgement waits behind all of them, and a burst is answered at the
pace of the starts. So:

- a process has at most ``dispatcher.starts_in_flight`` starts in flight, and
- while the adapters in the same process hand events over slower than
  ``dispatcher.handover_target_ms`` per signal, its starts give way: each slow signal halves the
  share of ``starts_in_flight`` they may use (down to one start), each fast one gives a sixteenth
  back (the additive-increase, multiplicative-decrease of TCP's congestion control), and a quarter
  of a second without any signal gives it all back.

Events that were handed over are held by Temporal and start right after, at the full rate; a
half load, whose signals are fast, never holds a start back. The measurements behind the
defaults are in docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

RECHECK = 0.02
"""Seconds between looks at the share while a start waits only because of it (nothing announces
that the hand-over got faster)."""
FLOOR = 1.0 / 64
"""The smallest share: at least one start is in flight whenever any waits."""
STEP = 1.0 / 16
"""The share a fast signal gives back."""
QUIET = 0.25
"""Seconds without a signal after which the adapters count as quiet and the share is whole again.
Not at once: between two signals of a burst nothing is on the way for a moment, and every start
waiting would go then."""


class Handover:
    """How fast this process hands events to the dispatcher, as its starts should see it.

    The dispatcher client reports every signal's time (:meth:`sent`) and whether one is on the
    way (``receiving``); :meth:`share` is the part of the starts' limit they may use now."""

    def __init__(self, target: Callable[[], float], receiving: Callable[[], bool]) -> None:
        """``target``: seconds per signal, read at each report (it follows reloads)."""
        self._target = target
        self._receiving = receiving
        self._share = 1.0
        self._last = -QUIET  # time.monotonic() of the last report

    def sent(self, seconds: float) -> None:
        self._last = time.monotonic()
        if seconds > self._target():
            self._share = max(FLOOR, self._share / 2)
        else:
            self._share = min(1.0, self._share + STEP)

    def share(self) -> float:
        """1.0 once the adapters are quiet (nothing on the way, no signal for QUIET s): a quiet
        adapter holds nothing back."""
        if not self._receiving() and time.monotonic() - self._last > QUIET:
            self._share = 1.0
        return self._share


class StartSlots:
    """A semaphore whose size is read at each acquire: ``limit()`` times the hand-over's share,
    at least one. A smaller size makes new starts wait; none in flight is interrupted."""

    def __init__(self, limit: Callable[[], int], handover: Handover | None = None) -> None:
        self._limit = limit
        self._handover = handover
        self._used = 0
        self._turn = asyncio.Lock()  # the starts waiting for a slot queue here, first come first served
        self._freed = asyncio.Condition()

    @property
    def used(self) -> int:
        return self._used

    def size(self) -> int:
        """The number of starts that may be in flight now."""
        limit = self._limit()
        if self._handover is None:
            return limit
        return max(1, int(limit * self._handover.share()))

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the body. Only the first start in line watches for one to free up;
        when it waits only because of the hand-over, it looks again every RECHECK s."""
        async with self._turn, self._freed:
            while self._used >= self.size():
                if self._used >= self._limit():
                    await self._freed.wait()
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._freed.wait(), RECHECK)
            self._used += 1
        try:
            yield
        finally:
            async with self._freed:
                self._used -= 1
                self._freed.notify()
