"""`StartSlots` and `Handover`: a process's starts in flight, fewer while its adapters hand events over slowly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from dispatcher.slots import (
    AWAITED_HOLD,
    BASE_PERIOD,
    FLOOR,
    HANDOVER_TOLERANCE,
    IDLE,
    INITIAL,
    PRESSURE,
    QUIET,
    ROUND,
    STEP,
    Fastest,
    Handover,
    StartSlots,
    StartWindow,
)
from tests.helpers import assert_eventually


def fixed(limit: Callable[[], int]) -> StartWindow:
    """A window without a tolerance: always ``limit()`` (``start_latency_tolerance: null``)."""
    return StartWindow(limit, lambda: None)


class Starts:
    """Starts that hold their slot until released, recording how many were in flight at once."""

    def __init__(self, slots: StartSlots) -> None:
        self.slots = slots
        self.release = asyncio.Event()
        self.order: list[int] = []
        self.peak = 0

    async def start(self, i: int) -> None:
        async with self.slots.slot():
            self.order.append(i)
            self.peak = max(self.peak, self.slots.used)
            await self.release.wait()

    def launch(self, n: int) -> list[asyncio.Task[None]]:
        return [asyncio.create_task(self.start(i)) for i in range(n)]


async def test_no_more_than_the_limit_are_in_flight_and_they_go_in_order() -> None:
    starts = Starts(StartSlots(fixed(lambda: 3)))
    tasks = starts.launch(10)
    await assert_eventually(lambda: len(starts.order) == 3, timeout=5, interval=0.01)
    await asyncio.sleep(0.1)
    assert starts.slots.used == 3 and len(starts.order) == 3
    starts.release.set()
    await asyncio.gather(*tasks)
    assert starts.order == list(range(10)) and starts.peak == 3 and starts.slots.used == 0


def test_slow_signals_halve_the_share_and_fast_ones_give_a_step_back() -> None:
    receiving = True
    handover = Handover(lambda: 0.05, lambda: receiving)
    handover.sent(0.2, PRESSURE)
    handover.sent(0.2, PRESSURE)
    assert handover.share() == 0.25
    handover.sent(0.01, PRESSURE)
    assert handover.share() == 0.25 + STEP
    for _ in range(20):
        handover.sent(1.0, PRESSURE)
    assert handover.share() == FLOOR  # never nothing: one start stays in flight
    receiving = False
    assert handover.share() == FLOOR  # a gap between two signals of a burst holds on
    time.sleep(QUIET + 0.05)
    assert handover.share() == 1.0  # quiet for a while: nothing held back
    receiving = True
    for _ in range(40):
        handover.sent(0.001, PRESSURE)
    assert handover.share() == 1.0


def test_without_a_target_a_signal_is_slow_at_twice_the_fastest_recent_one() -> None:
    """dispatcher.handover_target_ms unset: the first signals set the base; a full signal more than
    HANDOVER_TOLERANCE times slower than it halves the share, one within it gives a step back, and
    a slow signal of a few events (a steady load) holds nothing back."""
    handover = Handover(lambda: None, lambda: True)
    handover.sent(0.010, 1)  # idle: the fastest
    assert handover.share() == 1.0
    handover.sent(0.019, PRESSURE)  # within twice the fastest
    assert handover.share() == 1.0
    handover.sent(0.0105 * HANDOVER_TOLERANCE, PRESSURE)  # just past twice the fastest
    assert handover.share() == 0.5
    handover.sent(0.5, PRESSURE - 1)
    assert handover.share() == 0.5 + STEP


def test_the_fastest_is_forgotten_after_one_or_two_periods() -> None:
    """A server that got slower for good sets a new base: what was fastest counts for the period it
    was seen in and the next one, not longer."""
    fastest = Fastest(0.0)
    fastest.add(1.0, 0.010)
    fastest.add(5.0, 0.050)
    assert fastest.base == 0.010
    fastest.add(1.0 + BASE_PERIOD + 0.5, 0.040)  # a new period: the last one's fastest still counts
    assert fastest.base == 0.010
    fastest.add(1.0 + 2 * BASE_PERIOD + 1.0, 0.045)  # and another: now only what came since
    assert fastest.base == 0.040


async def test_while_the_hand_over_is_slow_only_its_share_goes_then_the_rest() -> None:
    receiving = True
    handover = Handover(lambda: 0.05, lambda: receiving)
    for _ in range(3):
        handover.sent(0.5, PRESSURE)  # an eighth of 16
    starts = Starts(StartSlots(fixed(lambda: 16), handover.share))
    tasks = starts.launch(6)
    await assert_eventually(lambda: len(starts.order) == 2, timeout=5, interval=0.01)
    await asyncio.sleep(0.2)  # ten looks at the share: still two
    assert len(starts.order) == 2
    receiving = False  # nothing announces it: the first start in line sees it once quiet for QUIET s
    await assert_eventually(lambda: len(starts.order) == 6, timeout=5, interval=0.01, what="the rest went")
    starts.release.set()
    await asyncio.gather(*tasks)
    assert starts.peak == 6 and starts.order == list(range(6))


async def test_starts_in_flight_stay_when_the_hand_over_slows_down() -> None:
    """A smaller size holds new starts back; it interrupts none."""
    handover = Handover(lambda: 0.05, lambda: True)
    starts = Starts(StartSlots(fixed(lambda: 4), handover.share))
    first = starts.launch(4)
    await assert_eventually(lambda: starts.slots.used == 4, timeout=5, interval=0.01)
    for _ in range(10):
        handover.sent(1.0, PRESSURE)
    later = asyncio.create_task(starts.start(99))
    await asyncio.sleep(0.1)
    assert starts.slots.used == 4 and 99 not in starts.order
    starts.release.set()
    await asyncio.gather(*first, later)
    assert starts.order[-1] == 99 and starts.slots.used == 0


async def test_a_new_limit_is_read_at_the_next_start() -> None:
    """dispatcher.starts_in_flight follows a reload: once a slot frees, the line fills to the new size."""
    limit = 1
    starts = Starts(StartSlots(fixed(lambda: limit)))
    first = asyncio.Event()

    async def first_start() -> None:
        async with starts.slots.slot():
            starts.order.append(0)
            await first.wait()

    head = asyncio.create_task(first_start())
    await assert_eventually(lambda: starts.slots.used == 1, timeout=5, interval=0.01)
    rest = [asyncio.create_task(starts.start(i)) for i in range(1, 5)]
    await asyncio.sleep(0.1)
    assert starts.order == [0]
    limit = 3
    first.set()
    await assert_eventually(lambda: starts.slots.used == 3, timeout=5, interval=0.01, what="three in flight")
    assert starts.order == [0, 1, 2, 3]
    starts.release.set()
    await asyncio.gather(head, *rest)
    assert starts.order == list(range(5)) and starts.peak == 3


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def full_round(window: StartWindow, clock: Clock, seconds: float) -> None:
    """One round of starts that fill the window, each taking ``seconds``."""
    size = window.size()
    began = clock.t
    for used in range(max(ROUND, size)):
        window.wake(min(used, size - 1))
    clock.t += seconds
    for _ in range(max(ROUND, size)):
        window.finished(began)


def test_the_window_opens_while_starts_answer_as_fast_as_ever() -> None:
    """A server that works in parallel: latency flat whatever is in flight, so the window doubles
    up to the limit, and no further."""
    clock = Clock()
    window = StartWindow(lambda: 64, lambda: 4.0, clock)
    assert window.size() == INITIAL
    sizes = []
    for _ in range(6):
        full_round(window, clock, 0.02)
        sizes.append(window.size())
    assert sizes == [8, 16, 32, 64, 64, 64]


def test_the_window_shrinks_in_proportion_when_starts_queue_and_grows_by_one_after() -> None:
    """A serial server: each start queued ahead adds its time. Beyond the tolerance the window is
    scaled by tolerance x fastest / median, to INITIAL at least; within it, it grows by one start
    per round."""
    clock = Clock()
    window = StartWindow(lambda: 64, lambda: 4.0, clock)
    full_round(window, clock, 0.01)  # the fastest: 10 ms
    assert window.size() == 8
    full_round(window, clock, 0.08)  # 8 in flight, each waited for 7 others: 80 ms against 40
    assert window.size() == 4
    full_round(window, clock, 0.03)
    assert window.size() == 5  # no more doubling after a slow round
    full_round(window, clock, 0.03)
    assert window.size() == 6
    full_round(window, clock, 2.0)
    assert window.size() == INITIAL  # never below: load not its own slows the starts too


def test_a_window_not_used_to_the_full_does_not_grow() -> None:
    """A light load says nothing about more in flight: the window stays, so a burst that follows
    does not begin with starts_in_flight of them queued."""
    clock = Clock()
    window = StartWindow(lambda: 64, lambda: 4.0, clock)
    for _ in range(5):
        began = clock.t
        window.wake(0)
        clock.t += 0.01
        window.finished(began)
    assert window.size() == INITIAL


def test_one_slow_round_cuts_once() -> None:
    """The starts that were in flight at a cut do not count toward another: they were slow for
    the window before it."""
    clock = Clock()
    window = StartWindow(lambda: 64, lambda: 4.0, clock)
    full_round(window, clock, 0.01)
    full_round(window, clock, 0.01)
    assert window.size() == 16
    began = clock.t
    for used in range(32):
        window.wake(min(used, 15))
    clock.t += 0.08
    for _ in range(16):
        window.finished(began)  # 80 ms against 40: halved
    assert window.size() == 8
    clock.t += 0.08
    for _ in range(16):
        window.finished(began)  # 160 ms, but begun before the cut
    assert window.size() == 8
    full_round(window, clock, 0.16)  # begun after it: cut again (to a quarter, held at INITIAL)
    assert window.size() == INITIAL


def test_after_a_quiet_second_the_window_begins_again_small() -> None:
    clock = Clock()
    window = StartWindow(lambda: 64, lambda: 4.0, clock)
    for _ in range(3):
        full_round(window, clock, 0.01)
    assert window.size() == 32
    clock.t += IDLE / 2
    window.wake(0)
    assert window.size() == 32
    clock.t += IDLE
    window.wake(0)
    assert window.size() == INITIAL


def test_the_fastest_start_is_forgotten_after_one_or_two_periods() -> None:
    """A server that got slower for good sets a new baseline: its starts are no longer slow."""
    clock = Clock()
    window = StartWindow(lambda: 64, lambda: 4.0, clock)
    full_round(window, clock, 0.01)
    assert window.base == pytest.approx(0.01)
    clock.t += BASE_PERIOD + 1
    full_round(window, clock, 0.05)
    assert window.base == pytest.approx(0.01)  # the period before still counts
    clock.t += BASE_PERIOD + 1
    full_round(window, clock, 0.05)
    assert window.base == pytest.approx(0.05)


def test_no_tolerance_is_the_fixed_limit_and_a_reload_is_read() -> None:
    clock = Clock()
    limit, tolerance = 64, None
    window = StartWindow(lambda: limit, lambda: tolerance, clock)
    assert window.size() == 64
    full_round(window, clock, 0.01)
    full_round(window, clock, 1.0)
    assert window.size() == 64
    tolerance = 4.0
    assert window.size() == INITIAL
    limit = 2
    assert window.size() == 2


async def test_a_start_cancelled_again_while_it_gives_its_slot_back_still_gives_it_back() -> None:
    """The slot was given back under the lock: a second cancellation while the finished start
    waited for it skipped the decrement, and each such start took one slot for good."""
    slots = StartSlots(fixed(lambda: 2))
    [task] = Starts(slots).launch(1)
    await assert_eventually(lambda: slots.used == 1, timeout=5, interval=0.01)
    await slots._freed.acquire()  # someone else holds the lock as the start ends
    try:
        task.cancel()
        for _ in range(3):  # the start's cleanup is now waiting for the lock
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        slots._freed.release()
    assert slots.used == 0


async def test_the_slots_hold_the_window_and_tell_it_each_start() -> None:
    """Through StartSlots: no more than the window in flight, and each start's end is told."""
    window = StartWindow(lambda: 64, lambda: 4.0)
    starts = Starts(StartSlots(window))
    tasks = starts.launch(10)
    await assert_eventually(lambda: len(starts.order) == INITIAL, timeout=5, interval=0.01)
    await asyncio.sleep(0.1)
    assert starts.slots.used == INITIAL
    starts.release.set()
    await asyncio.gather(*tasks)
    assert starts.order == list(range(10)) and starts.peak == INITIAL and window.base < 1.0


async def test_the_hand_over_s_share_is_of_the_window() -> None:
    """While the signals are slow and full, the starts get the share of the window: a quarter of
    the window's 4 is one."""
    handover = Handover(lambda: 0.05, lambda: True)
    handover.sent(0.5, PRESSURE)
    handover.sent(0.5, PRESSURE)
    slots = StartSlots(StartWindow(lambda: 64, lambda: 4.0), handover.share)
    assert slots.size() == 1
    slots.window = StartWindow(lambda: 64, lambda: None)
    assert slots.size() == 16


def test_a_slow_signal_with_few_events_holds_nothing_back() -> None:
    """A steady load hands over a few events per signal, fast or slow: holding its starts back
    would leave them slower than its events arrive. Only a slow signal with PRESSURE events
    behind it halves the share."""
    handover = Handover(lambda: 0.05, lambda: True)
    for _ in range(10):
        handover.sent(1.0, PRESSURE - 1)
    assert handover.share() == 1.0
    handover.sent(1.0, PRESSURE)
    assert handover.share() == 0.5
    handover.sent(1.0, 1)
    assert handover.share() == 0.5 + STEP


def test_reading_the_share_changes_nothing_and_a_signal_after_a_quiet_time_counts_from_whole() -> None:
    """The gauge reads the share: a read during a quiet time must not decide what the next burst
    starts from. Read or not, a signal after QUIET s of nothing counts from a whole share."""

    def after_quiet(read: bool) -> float:
        receiving = [True]
        handover = Handover(lambda: 0.05, lambda: receiving[0])
        handover.sent(0.06, PRESSURE)
        handover.sent(0.06, PRESSURE)
        assert handover.share() == 0.25
        receiving[0] = False
        time.sleep(QUIET + 0.15)
        if read:
            assert handover.share() == 1.0
            assert handover.share() == 1.0
        receiving[0] = True
        assert handover.share() == 0.25  # a signal on the way again, none reported yet
        handover.sent(0.06, PRESSURE)  # began QUIET + 0.09 s after the last one ended
        return handover.share()

    assert after_quiet(read=True) == after_quiet(read=False) == 0.5


def test_the_window_holds_only_while_clients_wait_and_begins_small_when_they_wait_again() -> None:
    """The window is there so that a 202 is not queued behind the starts: with no client waiting
    on the process's signals (a Kafka or RabbitMQ load), the starts go at the open limit, and a
    client that waits again finds a few in the window, not the limit."""
    clock = Clock()
    waiting = [True]
    window = StartWindow(lambda: 64, lambda: 4.0, clock, engaged=lambda: waiting[0], open_limit=lambda: 200)
    full_round(window, clock, 0.02)
    full_round(window, clock, 0.02)
    assert window.size() == 16
    waiting[0] = False
    assert window.size() == 200
    full_round(window, clock, 0.5)  # slow starts are not judged while the window does not hold
    assert window.size() == 200
    waiting[0] = True
    assert window.size() == INITIAL


def test_a_handover_counts_clients_waiting_for_a_second_after_their_last_signal() -> None:
    handover = Handover(lambda: None, lambda: False)
    assert not handover.awaited()
    handover.sent(0.01, 0)  # a broker's events: nobody waits
    assert not handover.awaited()
    handover.sent(0.01, 1)
    assert handover.awaited()
    handover._awaited -= AWAITED_HOLD + 0.01
    assert not handover.awaited()


async def test_while_nobody_waits_the_share_holds_nothing_back_and_a_waiter_sees_the_window_open() -> None:
    """A share cut by an HTTP burst is the burst's: once no client waits, the starts use the whole
    open limit, and a start that waited for the window's slot takes one within RECHECK s."""
    waiting = [True]
    window = StartWindow(lambda: 1, lambda: 4.0, engaged=lambda: waiting[0], open_limit=lambda: 8)
    slots = StartSlots(window, lambda: 0.25)
    assert slots.size() == 1
    starts = Starts(slots)
    first = starts.launch(1)
    await assert_eventually(lambda: slots.used == 1, timeout=5, interval=0.005)
    second = asyncio.create_task(starts.start(1))
    await asyncio.sleep(0.05)
    assert slots.used == 1, "the window holds one"
    waiting[0] = False
    await assert_eventually(lambda: slots.used == 2, timeout=5, interval=0.005, what="the waiter let in")
    assert slots.size() == 8, "no share while nobody waits"
    starts.release.set()
    await asyncio.gather(*first, second)
