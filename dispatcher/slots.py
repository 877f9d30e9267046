"""How many starts one worker process has waiting on Temporal at once.

Each target start and signal is a write on the Temporal server, and so is the signal that hands
an adapter's events to the dispatcher. A server that is the bottleneck (one dev server on
SQLite, or a small cluster) serves them in turn: with hundreds of starts queued there, an HTTP
``202`` or a broker acknowledgement waits behind all of them, and a burst is answered at the
pace of the starts. So:

- a process has at most ``dispatcher.starts_in_flight`` starts in flight,
- within that, a window that follows the starts' own latency (:class:`StartWindow`, the idea of
  TCP Vegas): it grows while a round of starts answers within ``dispatcher.start_latency_tolerance``
  times the fastest recent start, and shrinks in proportion when they take longer. A server that
  works in parallel (a cluster) answers as fast with more in flight, so the window opens up to the
  limit; a serial one (a dev server on SQLite) answers each start later for every start queued
  ahead of it, so the window stays at the few that keep it busy, and
- while the adapters in the same process hand events over slowly (a signal slower than
  HANDOVER_TOLERANCE times the fastest recent one, or than ``dispatcher.handover_target_ms`` when
  it is set), with events piling up behind the signals that clients wait for (HTTP ``202``s; a
  Kafka or RabbitMQ publisher has its ack from the broker), its starts give way: each such signal
  halves the share of the window they may use (down to one start), any other gives a sixteenth
  back (the additive-increase, multiplicative-decrease of TCP's congestion control), and a quarter
  of a second without any signal gives it all back. The adapters of other processes (``ingress``)
  tell their share in their signals, and a worker's starts give way to them too
  (:mod:`dispatcher.told`).

The window and the share are for the clients that wait on the hand-over. While none has for
AWAITED_HOLD seconds (a Kafka or RabbitMQ load: the broker acknowledged its publishers already),
the starts go without them, up to ``batch_size`` in flight: on one serial dev server that took
Kafka and RabbitMQ loads from 0.65 to 0.83 of the direct-start ceiling to 1.07 to 1.16
(docs/benchmarks.md, "Starts run free while nobody waits").

Events that were handed over are held by Temporal and start right after, at the full rate. A
half load never holds its starts back: its signals carry a few events each, fast or slow, and
holding its starts to one at a time would leave them slower than the events arrive. The
measurements behind the defaults are in docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import time
from collections.abc import AsyncIterator, Callable

from bridge.aio import within

RECHECK = 0.02
"""Seconds between looks at the share while a start waits only because of it (nothing announces
that the hand-over got faster)."""
FLOOR = 1.0 / 64
"""The smallest share: at least one start is in flight whenever any waits."""
STEP = 1.0 / 16
"""The share a fast signal gives back."""
PRESSURE = 16
"""Events a client waits for in one signal from which a slow signal counts: a burst piles requests
up behind each signal (64 clients waiting: up to 64 in the next), a steady half load hands over a
few at a time. A broker's events wait for nobody: a Kafka poll of hundreds of records is no burst."""
HANDOVER_TOLERANCE = 2.0
"""Without ``dispatcher.handover_target_ms``, a signal slower than this many times the fastest
signal of the last BASE_PERIOD or two is slow. A serial server (a dev server on SQLite) answers a
burst's signals two to three times later with a few starts queued ahead of each, and as fast as
when idle with one: the burst then takes its 202s about twice as fast (docs/benchmarks.md). A
server that works in parallel answers a full signal about as fast as an idle one however many
starts it has in flight, so a steady high load keeps its starts."""
QUIET = 0.25
"""Seconds without a signal after which the adapters count as quiet and the share is whole again.
Not at once: between two signals of a burst nothing is on the way for a moment, and every start
waiting would go then."""


AWAITED_HOLD = 1.0
"""Seconds after the last event a client waits for was given to the hand-over during which the
start window holds (:meth:`Handover.awaited`). Past it no client waits on this process's signals,
and up to ``max(starts_in_flight, batch_size)`` starts go at once: the window exists only so that
a ``202`` is not queued behind them. The first request after such a time may find that many
queued ahead of its signal: about a second and a half on one dev server, milliseconds on a cluster
that starts in parallel."""


class Handover:
    """How fast this process hands events to the dispatcher, as its starts should see it.

    The dispatcher client owns one: it reports every signal's time and events (:meth:`sent`) and
    whether one is on the way (``receiving``); :meth:`share` is the part of the starts' window
    they may use now."""

    def __init__(self, target: Callable[[], float | None], receiving: Callable[[], bool]) -> None:
        """``target``: seconds per signal, read at each report (it follows reloads); None for
        HANDOVER_TOLERANCE times the fastest recent signal."""
        self._target = target
        self._receiving = receiving
        self._share = 1.0
        self._last = -QUIET  # time.monotonic() of the last report
        self._awaited = -math.inf  # time.monotonic() of the last report of events clients wait for
        self._fastest = Fastest()

    def sent(self, seconds: float, events: int) -> None:
        """A signal that carried ``events`` that clients wait for took ``seconds``: slow and full
        (PRESSURE such events or more) halves the share; anything else gives a STEP back. After
        QUIET s with nothing handed over before it (the sender sends at once whatever queued), it
        counts from a whole share."""
        now = time.monotonic()
        if now - seconds - self._last > QUIET:
            self._share = 1.0
        self._last = now
        if events:
            self._awaited = now
        self._fastest.add(now, seconds)
        target = self._target()
        if target is None:
            target = HANDOVER_TOLERANCE * self._fastest.base
        if seconds > target and events >= PRESSURE:
            self._share = max(FLOOR, self._share / 2)
        else:
            self._share = min(1.0, self._share + STEP)

    def waiting(self) -> None:
        """An event a client waits for was given to the hand-over: the window holds from now, not
        from when its signal is answered."""
        self._awaited = time.monotonic()

    def awaited(self) -> bool:
        """Whether clients waited on this process's signals in the last AWAITED_HOLD seconds."""
        return time.monotonic() - self._awaited <= AWAITED_HOLD

    def share(self) -> float:
        """1.0 once the adapters are quiet (nothing on the way, no signal for QUIET s): a quiet
        adapter holds nothing back. Reading it changes nothing (the metrics read it too)."""
        if not self._receiving() and time.monotonic() - self._last > QUIET:
            return 1.0
        return self._share


INITIAL = 4
"""The window after a second without starts, and its smallest size: a burst that follows a quiet
time begins with a few starts, not ``starts_in_flight`` of them queued ahead of the signals it
sends; and load that is not the starts' own (the dispatcher's tasks, the targets' workers, other
processes) slows them down without closing the window below what keeps a serial server busy."""
IDLE = 1.0
"""Seconds without a start in flight after which the window begins again at INITIAL."""
ROUND = 4
"""Starts in the smallest round: the window is judged on a round's median, not on one start."""
BASE_PERIOD = 10.0
"""The fastest start is remembered for one to two periods, so a server that got slower for good
(or a new network path) sets a new baseline."""


class Fastest:
    """The fastest of the latencies told in the last one or two BASE_PERIODs: what a call takes
    when nothing is queued ahead of it, with a server that got slower for good (or a new network
    path) setting a new one."""

    def __init__(self, now: float = -math.inf) -> None:
        self._epoch = (now, math.inf, math.inf)  # (began, fastest before, fastest since)

    @property
    def base(self) -> float:
        """inf before the first."""
        return min(self._epoch[1], self._epoch[2])

    def add(self, now: float, seconds: float) -> None:
        began, before, since = self._epoch
        if now - began > BASE_PERIOD:
            self._epoch = (now, since, seconds)
        else:
            self._epoch = (began, before, min(since, seconds))


class StartWindow:
    """How many starts may be in flight, from how long they take (delay-based, as TCP Vegas).

    Each round (the starts of one window, at least ROUND) is judged on its median latency against
    the fastest start of the last BASE_PERIOD or two. Within ``tolerance()`` times that, and with
    the window used to the full, the window doubles (from the start, until the first slow round)
    or grows by one start; beyond it, the window is scaled down in proportion (to INITIAL at least,
    or ``limit()`` if smaller). One slow round cuts once: starts that began before a cut do not
    count toward the next."""

    def __init__(
        self,
        limit: Callable[[], int],
        tolerance: Callable[[], float | None],
        clock: Callable[[], float] = time.monotonic,
        engaged: Callable[[], bool] = lambda: True,
        open_limit: Callable[[], int] | None = None,
    ) -> None:
        """``limit``: the most it may grow to; ``tolerance``: read at each round (it follows
        reloads), None for no window (always ``limit()``); ``engaged``: whether the window holds
        now (a client waits behind the starts), else it is ``open_limit()`` (default ``limit()``)
        and begins again at INITIAL once it holds again."""
        self._limit = limit
        self._open_limit = open_limit or limit
        self._tolerance = tolerance
        self._engaged = engaged
        self._was_engaged = True
        self.now = clock
        self._size = float(INITIAL)
        self._growing = True  # doubling per round until the first slow one
        self._full = False  # the window was used to the full during this round
        self._round: list[float] = []
        self._cut = -math.inf  # clock of the last cut
        self._last = -math.inf  # clock of the last start's end
        self._fastest = Fastest(clock())

    def size(self) -> int:
        if not self.holds():
            return self._open_limit()
        if self._tolerance() is None:
            return self._limit()
        return max(1, min(self._limit(), int(self._size)))

    def holds(self) -> bool:
        """Whether the window holds now (a client waits behind the starts); begins it again at
        INITIAL when clients wait again."""
        engaged = self._engaged()
        if engaged and not self._was_engaged:  # clients wait again: begin small, not at the limit
            self._size = float(INITIAL)
            self._growing = True
            self._round.clear()
            self._cut = self.now()
        self._was_engaged = engaged
        return engaged

    @property
    def base(self) -> float:
        """The fastest start of the last one or two BASE_PERIODs (inf before the first)."""
        return self._fastest.base

    def wake(self, in_flight: int) -> None:
        """Told before each start: after IDLE s with none in flight, begin again at INITIAL."""
        if in_flight == 0 and self.now() - self._last > IDLE:
            self._size = float(INITIAL)
            self._growing = True
            self._round.clear()
        if in_flight + 1 >= self.size():
            self._full = True

    def finished(self, began: float) -> None:
        """Told after each start (``began``: its clock before the call), whatever its answer."""
        now = self.now()
        self._last = now
        seconds = now - began
        self._fastest.add(now, seconds)
        tolerance = self._tolerance()
        if tolerance is None or not self.holds() or began < self._cut:
            return  # no window; or it was in flight before the last cut, which counted it already
        self._round.append(seconds)
        if len(self._round) < max(ROUND, self.size()):
            return
        median = statistics.median(self._round)
        self._round.clear()
        limit = tolerance * self.base
        if median > limit:
            self._size = max(float(INITIAL), self._size * limit / median)
            self._growing = False
            self._cut = now
        elif self._full:
            self._size = min(float(self._limit()), self._size * 2 if self._growing else self._size + 1)
        self._full = False


class Timing:
    """What one slot's holder tells the window (:meth:`StartSlots.slot`): from when its call to
    Temporal went out, or nothing when it made none."""

    def __init__(self, window: StartWindow) -> None:
        self._window = window
        self.began: float | None = window.now()

    def restart(self) -> None:
        """The call goes out now: what came before it in the slot (a search of earlier runs) is
        no start's latency, and counted so it made the window smaller."""
        self.began = self._window.now()

    def unsent(self) -> None:
        """Nothing was sent: nothing to tell the window."""
        self.began = None


class StartSlots:
    """A semaphore whose size is read at each acquire: the start window's size times the
    hand-over's share, at least one. A smaller size makes new starts wait; none in flight is
    interrupted. A fixed limit is a window without a tolerance."""

    def __init__(self, window: StartWindow, share: Callable[[], float] | None = None) -> None:
        """``share``: the part of the window the starts may use now (:meth:`Handover.share`, or
        the smallest of it and the shares other processes told, :mod:`dispatcher.told`)."""
        self.window = window
        self._share = share
        self._used = 0
        self._turn = asyncio.Lock()  # the starts waiting for a slot queue here, first come first served
        self._freed = asyncio.Condition()

    @property
    def used(self) -> int:
        return self._used

    def size(self) -> int:
        """The number of starts that may be in flight now: the window, times the hand-over's share
        while the window holds (no client waits: the share holds nothing back either)."""
        size = self.window.size()
        if self._share is None or not self.window.holds():
            return size
        return max(1, int(size * self._share()))

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[Timing]:
        """Hold one slot for the body, and tell the window how long its call took (:class:`Timing`,
        from the slot's start unless the body says otherwise). Only the first start
        in line watches for one to free up; when it waits only because of the hand-over (which
        nothing announces), it looks again every RECHECK s."""
        async with self._turn, self._freed:
            self.window.wake(self._used)
            while self._used >= self.size():
                # Looked at again every RECHECK s: nothing announces that the hand-over got faster,
                # or that the window opened (no client waits any more).
                await within(RECHECK, self._freed.wait())
            self._used += 1
        timing = Timing(self.window)
        try:
            yield timing
        finally:
            if timing.began is not None:
                self.window.finished(timing.began)
            # Given back before waiting for the lock: a second cancellation while it waits (an
            # activity cancelled again, gather cancelling its starts again) would lose the slot for
            # good. A waiter not notified then looks again within RECHECK s.
            self._used -= 1
            async with self._freed:
                self._freed.notify()
