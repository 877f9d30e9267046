"""`StartSlots` and `Handover`: a process's starts in flight, fewer while its adapters hand events over slowly."""

from __future__ import annotations

import asyncio
import time

from dispatcher.slots import FLOOR, QUIET, STEP, Handover, StartSlots
from tests.helpers import assert_eventually


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
    starts = Starts(StartSlots(lambda: 3))
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
    handover.sent(0.2)
    handover.sent(0.2)
    assert handover.share() == 0.25
    handover.sent(0.01)
    assert handover.share() == 0.25 + STEP
    for _ in range(20):
        handover.sent(1.0)
    assert handover.share() == FLOOR  # never nothing: one start stays in flight
    receiving = False
    assert handover.share() == FLOOR  # a gap between two signals of a burst holds on
    time.sleep(QUIET + 0.05)
    assert handover.share() == 1.0  # quiet for a while: nothing held back
    receiving = True
    for _ in range(40):
        handover.sent(0.001)
    assert handover.share() == 1.0


async def test_while_the_hand_over_is_slow_only_its_share_goes_then_the_rest() -> None:
    receiving = True
    handover = Handover(lambda: 0.05, lambda: receiving)
    for _ in range(3):
        handover.sent(0.5)  # an eighth of 16
    starts = Starts(StartSlots(lambda: 16, handover))
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
    starts = Starts(StartSlots(lambda: 4, handover))
    first = starts.launch(4)
    await assert_eventually(lambda: starts.slots.used == 4, timeout=5, interval=0.01)
    for _ in range(10):
        handover.sent(1.0)
    later = asyncio.create_task(starts.start(99))
    await asyncio.sleep(0.1)
    assert starts.slots.used == 4 and 99 not in starts.order
    starts.release.set()
    await asyncio.gather(*first, later)
    assert starts.order[-1] == 99 and starts.slots.used == 0


async def test_a_new_limit_is_read_at_the_next_start() -> None:
    """dispatcher.starts_in_flight follows a reload: once a slot frees, the line fills to the new size."""
    limit = 1
    starts = Starts(StartSlots(lambda: limit))
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
