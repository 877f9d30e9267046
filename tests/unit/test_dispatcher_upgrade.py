"""Runs open when the bridge is upgraded replay their histories on this version: hand-built
histories as the version before raw signals (dispatcher.workflow.RAW_SIGNALS) wrote them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from temporalio.api.common.v1 import Payload

from bridge.routing import RouteTable
from dispatcher import starts
from dispatcher import workflow as dispatcher_workflow
from dispatcher.contract import LOAD_ROUTES, START_TARGETS, DispatcherInput, DispatcherSettings, RoutesResult, wire
from tests import helpers
from tests.unit.dispatcher_history import COUNTING, CountingConverter, History, routes

NO_JSON = Payload(metadata={"encoding": b"json/plain"}, data=b"{no json")


def events(*ids: str, pad: int = 0) -> list[dict[str, Any]]:
    payload = {"pad": "x" * pad} if pad else {}
    return [{"id": i, "name": "order.created", "source": "http:t", "payload": payload} for i in ids]


def begun(inp: DispatcherInput | None = None, **settings: Any) -> History:
    """A run begun before raw signals (or with ``inp``), its routes loaded."""
    h = History(inp)
    h.task()
    h.patch(dispatcher_workflow.NO_LOCAL_ACTIVITIES)
    h.patch(starts.STRICT_STARTS)
    h.activity("1", LOAD_ROUTES, routes(start_mode="activity", **settings))
    h.task()
    return h


def no_json_then_two_events(h: History) -> None:
    """As the version before wrote it with signals_per_run 3: a signal that is no JSON (which its
    SDK dropped uncounted) among three, then two events each started in a batch of its own."""
    h.events_signal("not an event")
    h.signal(NO_JSON)
    h.task()
    h.events_signal(events("e1"))
    h.task()
    h.activity("2", START_TARGETS, ["started"])
    h.task()
    h.events_signal(events("e2"))
    h.task()
    h.activity("3", START_TARGETS, ["started"])
    h.task(complete=False)


async def test_a_signal_that_is_no_json_is_not_counted_in_a_run_begun_before() -> None:
    """The SDK dropped such a signal before any handler ran, uncounted; counted now, a run with
    signals_per_run continued-as-new a signal sooner than its history says."""
    h = begun(signals_per_run=3)
    no_json_then_two_events(h)
    assert await h.replay() is None


@pytest.mark.parametrize("between", ["empty", "no-json"])
async def test_a_run_begun_before_asks_for_slices_where_it_did(between: str) -> None:
    """A task's checks ran out on a signal's last event, then an empty signal (or one that is no
    JSON) came: the handler asked checks-in-slices there, where the version before did not (it
    asked first in a later task, and left events for the main loop behind the marker)."""
    h = begun()
    checks_run_out(h, (lambda h: h.events_signal([])) if between == "empty" else (lambda h: h.signal(NO_JSON)))
    h.task(complete=False)
    assert await h.replay() is None


def checks_run_out(h: History, between: Callable[[History], None] | None = None) -> None:
    """As the version before wrote it: a task's checks run out on big2 (``between`` adds a signal
    after it in that task), then three more signals, and the next task asks checks-in-slices and
    ends with a timer, 'small' left for the main loop."""
    h.events_signal(events("big1", pad=1100 * 1024))
    h.events_signal(events("big2", pad=1100 * 1024))
    if between is not None:
        between(h)
    h.task()
    h.events_signal(events("big3", pad=1100 * 1024))
    h.events_signal(events("big4", pad=1100 * 1024))
    h.events_signal(events("small"))
    h.task()
    h.patch(dispatcher_workflow.CHECKS_IN_SLICES)
    h.timer("1")


def upgrade_backlog(h: History) -> bytes:
    """Every signal sent while the worker was away, in one activation: 40 of 1 MiB of empty lists.
    Returns the last one's payload."""
    wide = b",".join([b"[]"] * 340_000)
    for i in range(40):
        data = b'[{"id":"w%d","name":"order.created","source":"http:t","payload":[%s]}]' % (i, wide)
        h.signal(Payload(metadata={"encoding": b"json/plain"}, data=data))
    h.task(complete=False)
    return data


@pytest.mark.parametrize("waited_before", [False, True], ids=["signals-before", "a-wait-before"])
async def test_a_run_begun_before_takes_the_backlog_of_an_upgrade_raw(waited_before: bool) -> None:
    """A run open at the upgrade, then the backlog the upgrade left. Asked at its first signal, the
    patch was no for it, and the SDK's decoding of them all passed the 2 s deadlock timeout (3 s
    on this machine). Asked where a signal first waited, it was no for a run that had signals wait
    before the upgrade (the SDK keeps a patch's first answer): asked under a name of its own there."""
    h = begun()
    if waited_before:
        checks_run_out(h)
        h.task()
    else:
        h.events_signal(events("e0"))
        h.task()
    data = upgrade_backlog(h)
    CountingConverter.decoded = 0
    assert await h.replay(COUNTING) is None
    assert CountingConverter.decoded < 10 * len(data), CountingConverter.decoded  # of 40


async def test_a_run_an_earlier_worker_began_raw_replays_as_that_worker_ran_it() -> None:
    """In a rolling upgrade, a run the new client began (raw_signals in its input) may have had its
    tasks run by a worker of the version before, which ignores the field: taken raw from the input
    alone, its replay counted a signal that is no JSON, which that worker had not."""
    h = begun(DispatcherInput(project="shop", raw_signals=True), signals_per_run=3)
    no_json_then_two_events(h)
    assert await h.replay() is None


async def test_a_run_begun_before_the_template_step_limit_renders_its_loops_as_it_did() -> None:
    """A run open at the upgrade had started an event whose input loops 160,400 steps, over
    templates.MAX_STEPS: held to the limit on replay, that start would fail and its batch not be
    scheduled, where the history schedules it. Asked as the run began, the patch is no for it."""
    loops = "{% for a in .trigger.xs %}{% for b in .trigger.xs %}{{ a }}{% endfor %}{% endfor %}"
    entry = {**helpers.runner("w", "order.created"), "input": {"pairs": loops}}
    table = RouteTable.from_config(helpers.config("shop", "127.0.0.1:1", [entry]))
    h = History()
    h.task()
    h.patch(dispatcher_workflow.NO_LOCAL_ACTIVITIES)
    h.patch(starts.STRICT_STARTS)
    h.activity(
        "1", LOAD_ROUTES, wire(RoutesResult(routes=table.spec(), settings=DispatcherSettings(start_mode="activity")))
    )
    h.task()
    h.events_signal([{"id": "e1", "name": "order.created", "source": "http:t", "payload": {"xs": list(range(400))}}])
    h.task()
    h.activity("2", START_TARGETS, ["started"])
    h.task(complete=False)
    assert await h.replay() is None
