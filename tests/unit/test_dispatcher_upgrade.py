"""Runs open when the bridge is upgraded replay their histories on this version: hand-built
histories as the version before raw signals (dispatcher.workflow.RAW_SIGNALS) wrote them."""

from __future__ import annotations

from typing import Any

import pytest
from temporalio.api.common.v1 import Payload

from dispatcher import starts
from dispatcher import workflow as dispatcher_workflow
from dispatcher.contract import LOAD_ROUTES, START_TARGETS
from tests.unit.dispatcher_history import COUNTING, CountingConverter, History, routes

NO_JSON = Payload(metadata={"encoding": b"json/plain"}, data=b"{no json")


def events(*ids: str, pad: int = 0) -> list[dict[str, Any]]:
    payload = {"pad": "x" * pad} if pad else {}
    return [{"id": i, "name": "order.created", "source": "http:t", "payload": payload} for i in ids]


def begun(**settings: Any) -> History:
    """A run begun before raw signals, its routes loaded."""
    h = History()
    h.task()
    h.patch(dispatcher_workflow.NO_LOCAL_ACTIVITIES)
    h.patch(starts.STRICT_STARTS)
    h.activity("1", LOAD_ROUTES, routes(start_mode="activity", **settings))
    h.task()
    return h


async def test_a_signal_that_is_no_json_is_not_counted_in_a_run_begun_before() -> None:
    """The SDK dropped such a signal before any handler ran, uncounted; counted now, a run with
    signals_per_run continued-as-new a signal sooner than its history says."""
    h = begun(signals_per_run=3)
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
    assert await h.replay() is None


@pytest.mark.parametrize("between", ["empty", "no-json"])
async def test_a_run_begun_before_asks_for_slices_where_it_did(between: str) -> None:
    """A task's checks ran out on a signal's last event, then an empty signal (or one that is no
    JSON) came: the handler asked checks-in-slices there, where the version before did not (it
    asked first in a later task, and left events for the main loop behind the marker)."""
    h = begun()
    h.events_signal(events("big1", pad=1100 * 1024))
    h.events_signal(events("big2", pad=1100 * 1024))
    if between == "empty":
        h.events_signal([])
    else:
        h.signal(NO_JSON)
    h.task()
    h.events_signal(events("big3", pad=1100 * 1024))
    h.events_signal(events("big4", pad=1100 * 1024))
    h.events_signal(events("small"))
    h.task()
    h.patch(dispatcher_workflow.CHECKS_IN_SLICES)
    h.timer("1")
    h.task(complete=False)
    assert await h.replay() is None


async def test_a_run_begun_before_takes_the_backlog_of_an_upgrade_raw() -> None:
    """A run that took a signal before the upgrade, then every signal sent while the worker was
    away: 40 of 1 MiB of empty lists in one activation. Asked at its first signal, the patch was
    no for it, and the SDK decoded them all, past the 2 s deadlock timeout (3 s on this machine)."""
    h = begun()
    h.events_signal(events("e0"))
    h.task()
    wide = b",".join([b"[]"] * 340_000)
    for i in range(40):
        data = b'[{"id":"w%d","name":"order.created","source":"http:t","payload":[%s]}]' % (i, wide)
        h.signal(Payload(metadata={"encoding": b"json/plain"}, data=data))
    h.task(complete=False)
    CountingConverter.decoded = 0
    assert await h.replay(COUNTING) is None
    assert CountingConverter.decoded < 4 * len(data), CountingConverter.decoded  # of 40
