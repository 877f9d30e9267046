"""START_TARGETS against a stand-in client: outcomes in order, and one key's starts one by one."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import pytest
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.converter import DataConverter
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import ActivityEnvironment

from bridge.metrics import Metrics
from bridge.snapshot import Snapshot
from dispatcher import activities
from dispatcher.activities import SEND_MARGIN, BridgeActivities, with_request_id
from dispatcher.contract import DUPLICATE, SIGNAL_STARTED, SIGNALED, STARTED, StartBatch, TargetInput, TargetStart
from dispatcher.slots import INITIAL, PRESSURE, Handover
from tests.helpers import assert_eventually, config, runner


class SlowClient:
    """Records when each start began and ended; an id in ``taken`` already ran."""

    def __init__(self, taken: set[str]) -> None:
        self.taken = taken
        self.log: list[tuple[str, str]] = []

    async def start_workflow(self, workflow: str, arg: Any, *, id: str, **_: Any) -> None:
        self.log.append(("begin", id))
        await asyncio.sleep(0.02 if id == "a0" else 0.001)  # the first of key A is the slowest
        self.log.append(("end", id))
        if id in self.taken:
            raise WorkflowAlreadyStartedError(id, workflow)

    def get_workflow_handle(self, workflow_id: str) -> Any:
        return Runs.Handle({"dispatcher_batch": "another batch"})


class Runs:
    """A namespace's runs by id, each with the memo it was started with; a describe that fails
    while ``outage``."""

    class Handle:
        def __init__(self, memo: dict[str, Any] | None) -> None:
            self._memo = memo

        async def describe(self, **_: Any) -> Any:
            Runs.described += 1
            if self._memo is None:
                raise RPCError("unavailable", RPCStatusCode.UNAVAILABLE, b"")
            memo = self._memo

            async def read() -> dict[str, Any]:
                return memo

            return SimpleNamespace(memo=read)

    described = 0  # describe calls, all instances

    def __init__(self) -> None:
        self.memos: dict[str, dict[str, Any]] = {}
        self.outage = False

    async def start_workflow(self, workflow: str, arg: Any, *, id: str, memo: dict[str, Any], **_: Any) -> None:
        if id in self.memos:
            raise WorkflowAlreadyStartedError(id, workflow)
        self.memos[id] = memo

    def get_workflow_handle(self, workflow_id: str) -> Any:
        return Runs.Handle(None if self.outage else self.memos[workflow_id])


def snapshot(**dispatcher: Any) -> Snapshot:
    return Snapshot.compile(config("shop", "unused:7233", [runner("w", "order.created")], dispatcher=dispatcher))


def start(start_id: str, key: str | None) -> TargetStart:
    arg = TargetInput(workflow_id="w", exec_id="x", input={}, trigger={}, event={})
    return TargetStart(start_id, "T", "q", arg, {}, key)


async def test_starts_of_one_key_go_one_by_one_in_order_and_others_at_once() -> None:
    client = SlowClient(taken={"a1"})
    batch = StartBatch([start("a0", "A"), start("b0", "B"), start("a1", "A"), start("n0", None), start("a2", "A")])
    acts = BridgeActivities(snapshot())
    outcomes = await ActivityEnvironment(client=cast(Client, client)).run(acts.start_targets, batch)

    assert outcomes == [STARTED, STARTED, DUPLICATE, STARTED, STARTED]
    ends = [i for what, i in client.log if what == "end"]
    begins = [i for what, i in client.log if what == "begin"]
    # Key A: each start begins only after the previous one of A ended.
    for earlier, later in (("a0", "a1"), ("a1", "a2")):
        assert client.log.index(("end", earlier)) < client.log.index(("begin", later))
    # Other keys did not wait for A's slow first start.
    assert begins[:3] == ["a0", "b0", "n0"] and ends.index("b0") < ends.index("a0")


class CountingClient:
    """Starts that take a while, counting how many were in flight at once."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self.started: list[str] = []
        self.go = asyncio.Event()
        self.go.set()

    async def start_workflow(self, workflow: str, arg: Any, *, id: str, **_: Any) -> None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await self.go.wait()
        await asyncio.sleep(0.005)
        self.in_flight -= 1
        self.started.append(id)


def waited_on() -> Handover:
    """The hand-over of a process whose adapters just handed over an event a client waits for."""
    handover = Handover(lambda: None, lambda: False)
    handover.sent(0.001, 1)
    handover._awaited += 3600  # for as long as the test takes, however slow the machine
    return handover


async def test_a_batch_run_again_counts_its_own_starts_as_started_and_others_as_duplicates() -> None:
    """A local START_TARGETS runs again when its workflow task is lost, and has no heartbeat to
    skip what it started: its own earlier starts were counted as duplicates (1,976 started and 24
    duplicates of 2,000 events in one run of the continue-as-new test). A start refused because
    the run exists counts as started when the run's memo is this batch's, and as a duplicate when
    another batch (or another dispatcher run) started it, or when the memo cannot be read."""
    runs = Runs()
    env = ActivityEnvironment(client=cast(Client, runs))
    env.info = dataclasses.replace(env.info, activity_id="7", is_local=True)
    acts = BridgeActivities(snapshot())
    memo = {"event_id": "E1", "dispatcher_run": "R1"}
    batch = StartBatch([dataclasses.replace(start(f"n{i}", None), memo=memo) for i in range(3)])

    assert await env.run(acts.start_targets, batch) == [STARTED] * 3
    assert runs.memos["n0"] == {**memo, "dispatcher_batch": "7"}
    assert await env.run(acts.start_targets, batch) == [STARTED] * 3  # the same batch, run again
    runs.memos["n1"]["note"] = "the run upserted its memo"
    assert await env.run(acts.start_targets, batch) == [STARTED] * 3

    # A scheduled batch: its first attempt cannot meet its own starts, and asks nothing.
    env.info = dataclasses.replace(env.info, is_local=False, attempt=1)
    described = Runs.described
    assert await env.run(acts.start_targets, batch) == [DUPLICATE] * 3
    assert Runs.described == described
    env.info = dataclasses.replace(env.info, attempt=2)  # a retry whose first attempt's answers were lost
    assert await env.run(acts.start_targets, batch) == [STARTED] * 3
    env.info = dataclasses.replace(env.info, is_local=True, attempt=1)

    env.info = dataclasses.replace(env.info, activity_id="8")  # a later batch with the same event
    assert await env.run(acts.start_targets, batch) == [DUPLICATE] * 3
    other_run = StartBatch([dataclasses.replace(s, memo={**memo, "dispatcher_run": "R2"}) for s in batch.starts])
    env.info = dataclasses.replace(env.info, activity_id="7")  # another dispatcher run's batch 7
    assert await env.run(acts.start_targets, other_run) == [DUPLICATE] * 3
    runs.outage = True
    assert await env.run(acts.start_targets, batch) == [DUPLICATE] * 3


async def test_an_attempt_near_its_timeout_sends_nothing_more_and_its_retry_sends_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An attempt that outlived its start-to-close timeout (its starts gave way for long) kept
    sending: the server refuses its heartbeats by then, so the retry did not know those answers
    and sent the same signal-with-start again, a second run once the first had closed."""
    client = CountingClient()
    acts = BridgeActivities(snapshot())
    env = ActivityEnvironment(client=cast(Client, client))
    env.info = dataclasses.replace(env.info, start_to_close_timeout=timedelta(minutes=10))
    batch = StartBatch([start(f"n{i}", None) for i in range(3)])
    monkeypatch.setattr(activities, "send_until", lambda info: time.monotonic() - 1)  # its margin is spent
    with pytest.raises(ApplicationError, match="out of time"):
        await env.run(acts.start_targets, batch)
    assert client.started == []
    monkeypatch.undo()
    env.info = dataclasses.replace(env.info, attempt=2)  # the retry, just begun
    assert await env.run(acts.start_targets, batch) == [STARTED] * 3


def test_an_attempt_stops_sending_its_margin_before_its_timeout_on_its_own_clock() -> None:
    """Counted from when the attempt began on this worker, not from the server's start time: a
    worker clock ahead of the server's would have stopped every attempt before it sent anything."""
    long_ago = datetime(2000, 1, 1, tzinfo=UTC)  # the server's start time, on a clock far behind this one
    info = dataclasses.replace(ActivityEnvironment().info, start_to_close_timeout=timedelta(minutes=10))
    info = dataclasses.replace(info, started_time=long_ago)
    began = time.monotonic()
    until = activities.send_until(info)
    assert 600 - SEND_MARGIN.total_seconds() <= until - began <= 600 - SEND_MARGIN.total_seconds() + 1
    short = dataclasses.replace(info, start_to_close_timeout=timedelta(seconds=1))
    assert activities.send_until(short) == math.inf  # no room for the margin: no bound


async def test_starts_in_flight_are_capped_and_give_way_while_the_hand_over_is_slow() -> None:
    batch = StartBatch([start(f"n{i}", None) for i in range(40)])

    client = CountingClient()
    acts = BridgeActivities(snapshot(starts_in_flight=8), handover=waited_on())
    assert await ActivityEnvironment(client=cast(Client, client)).run(acts.start_targets, batch) == [STARTED] * 40
    assert client.peak == 8

    client = CountingClient()  # nobody waits on the hand-over: as many as a batch, no window
    acts = BridgeActivities(snapshot(starts_in_flight=8, batch_size=30), handover=Handover(lambda: None, lambda: False))
    assert await ActivityEnvironment(client=cast(Client, client)).run(acts.start_targets, batch) == [STARTED] * 40
    assert client.peak == 30

    client = CountingClient()
    handover = Handover(lambda: 0.05, lambda: True)
    handover.sent(1.0, PRESSURE)
    handover.sent(1.0, PRESSURE)  # a quarter of 8 (no window: always starts_in_flight)
    metrics = Metrics()
    acts = BridgeActivities(
        snapshot(starts_in_flight=8, start_latency_tolerance=None), handover=handover, metrics=metrics
    )
    assert metrics.registry.get_sample_value("signal_bridge_start_share") == 0.25
    client.go.clear()
    run = asyncio.create_task(ActivityEnvironment(client=cast(Client, client)).run(acts.start_targets, batch))
    in_flight = "signal_bridge_starts_in_flight"
    await assert_eventually(lambda: metrics.registry.get_sample_value(in_flight) == 2, timeout=5, interval=0.01)
    client.go.set()
    assert await run == [STARTED] * 40
    assert client.peak == 2 and sorted(client.started) == sorted(s.id for s in batch.starts)
    assert metrics.registry.get_sample_value("signal_bridge_starts_in_flight") == 0


async def test_the_start_window_begins_small_and_is_shown() -> None:
    """With the window (the default), the first starts go INITIAL at a time, whatever the limit,
    and ``signal_bridge_start_window`` shows it."""
    batch = StartBatch([start(f"n{i}", None) for i in range(INITIAL * 3)])
    client = CountingClient()
    client.go.clear()
    metrics = Metrics()
    acts = BridgeActivities(snapshot(starts_in_flight=64), metrics=metrics, handover=waited_on())
    assert metrics.registry.get_sample_value("signal_bridge_start_window") == INITIAL
    run = asyncio.create_task(ActivityEnvironment(client=cast(Client, client)).run(acts.start_targets, batch))
    await assert_eventually(lambda: client.in_flight == INITIAL, timeout=5, interval=0.01)
    await asyncio.sleep(0.1)
    assert client.in_flight == INITIAL
    client.go.set()
    assert await run == [STARTED] * (INITIAL * 3)


def first_event(at: datetime, continued_from: str = "") -> Any:
    """A run's first event, as a one-event page of its history."""
    started = HistoryEvent()
    started.event_time.FromDatetime(at)
    started.workflow_execution_started_event_attributes.continued_execution_run_id = continued_from
    return SimpleNamespace(history=SimpleNamespace(events=[started]), next_page_token=b"")


def signaled_page(request_id: str) -> Any:
    """A page of a run's history (newest first) holding one signal sent with ``request_id``."""
    signaled = HistoryEvent()
    signaled.event_time.FromDatetime(datetime.now(UTC))
    header = with_request_id(None, request_id)
    assert header is not None
    signaled.workflow_execution_signaled_event_attributes.header.CopyFrom(header)
    return SimpleNamespace(history=SimpleNamespace(events=[signaled]), next_page_token=b"")


class ClosingRuns:
    """Answers a signal-with-start as a server before temporalio/temporal#11968 does once the run
    it reached has closed: with another run, whatever the request id. The first attempt's plain
    start meets an outage."""

    namespace, identity, data_converter = "default", "test", DataConverter.default

    def __init__(self) -> None:
        self.signal_with_starts: list[tuple[str, str]] = []
        self.starts: list[str] = []
        self.outage = True
        self.workflow_service = self

    async def signal_with_start_workflow_execution(self, req: Any, **_: Any) -> Any:
        await asyncio.sleep(0.05)  # still in flight when the other start fails
        self.signal_with_starts.append((req.workflow_id, req.request_id))
        return SimpleNamespace(started=True)

    async def start_workflow(self, workflow: str, arg: Any, *, id: str, **_: Any) -> None:
        if self.outage:
            raise RPCError("unavailable", RPCStatusCode.UNAVAILABLE, b"")
        self.starts.append(id)


async def test_a_retried_batch_does_not_send_again_what_an_earlier_attempt_got_an_answer_for() -> None:
    """A retry sent every start of the batch again. A start is refused as a duplicate then; a
    signal-with-start (if_missing: start) whose run had closed meanwhile started another run, and
    the event ran twice."""
    client = ClosingRuns()
    arg = TargetInput(workflow_id="entity", exec_id="x", input={}, trigger={}, event={"id": "E1"})
    with_start = TargetStart("order-42", "Entity", "q", arg, {"event_id": "E1"}, None, "evt", "start", "req-E1")
    batch = StartBatch([with_start, start("other", None)])
    acts = BridgeActivities(snapshot())
    env = ActivityEnvironment(client=cast(Client, client))
    beats: list[Any] = []
    env.on_heartbeat = lambda *details: beats.append(details)
    with pytest.raises(RPCError):
        await env.run(acts.start_targets, batch)
    assert client.signal_with_starts == [("order-42", "req-E1")]
    client.outage = False
    env.info = dataclasses.replace(env.info, attempt=2, heartbeat_details=list(beats[-1]))
    outcomes = await env.run(acts.start_targets, batch)
    assert outcomes == [SIGNAL_STARTED, STARTED]
    assert client.signal_with_starts == [("order-42", "req-E1")] and client.starts == ["other"]


class Unreadable(ClosingRuns):
    """A namespace whose runs this worker may not read (or, with ``status`` UNAVAILABLE, cannot
    read now)."""

    def __init__(self, status: RPCStatusCode) -> None:
        super().__init__()
        self.outage = False
        self.status = status
        self.reads = 0

    def get_workflow_handle(self, workflow_id: str) -> Any:
        outer = self

        class Handle:
            async def describe(self, **_: Any) -> Any:
                outer.reads += 1
                raise RPCError("no", outer.status, b"")

        return Handle()


@pytest.mark.parametrize("status", [RPCStatusCode.PERMISSION_DENIED, RPCStatusCode.UNAVAILABLE])
async def test_a_retry_that_cannot_read_the_runs_sends_once_or_fails_for_the_next_attempt(
    status: RPCStatusCode,
) -> None:
    """A refusal that every attempt would meet (the worker may not read histories) made every
    attempt fail, and the batch never ended: the signals are sent, as before the search, and it
    is said once. A passing error fails the attempt, and the next looks again."""
    client = Unreadable(status)
    arg = TargetInput(workflow_id="entity", exec_id="x", input={}, trigger={}, event={"id": "E1"})
    starts = [
        TargetStart(f"order-{i}", "Entity", "q", arg, {"event_id": "E1"}, None, "evt", "start", f"req-{i}")
        for i in range(3)
    ]
    env = ActivityEnvironment(client=cast(Client, client))
    env.info = dataclasses.replace(env.info, is_local=False, attempt=2, scheduled_time=datetime.now(UTC))
    acts = BridgeActivities(snapshot())
    if status == RPCStatusCode.UNAVAILABLE:
        with pytest.raises(RPCError):
            await env.run(acts.start_targets, StartBatch(starts))
        assert client.signal_with_starts == []
        return
    assert await env.run(acts.start_targets, StartBatch(starts)) == [SIGNAL_STARTED] * 3
    assert sorted(client.signal_with_starts) == [(f"order-{i}", f"req-{i}") for i in range(3)]
    assert client.reads == 1  # given up once for the attempt


class OpenRun(ClosingRuns):
    """A target whose current run is open, with a history too long to read on every retry."""

    def __init__(self) -> None:
        super().__init__()
        self.outage = False
        self.listed: list[str] = []

    def get_workflow_handle(self, workflow_id: str) -> Any:
        async def describe(**_: Any) -> Any:
            return SimpleNamespace(run_id="open-run", status=WorkflowExecutionStatus.RUNNING)

        return SimpleNamespace(describe=describe)

    async def list_workflows(self, query: str) -> Any:
        self.listed.append(query)
        for _ in ():
            yield None

    async def get_workflow_execution_history(self, request: Any) -> Any:
        assert request.maximum_page_size == 1  # its first event only: whom it continued from
        return first_event(datetime.now(UTC) - timedelta(days=1))

    async def get_workflow_execution_history_reverse(self, request: Any) -> Any:
        raise AssertionError("an open run's history was read")


async def test_a_retry_does_not_read_an_open_run_that_dedupes_the_signal_itself() -> None:
    """Reading back to the batch's scheduling, a retry read a busy open run's history on every
    attempt, growing with every one: an open run dedupes the signal sent again by its request id,
    and only closed runs are searched."""
    client = OpenRun()
    arg = TargetInput(workflow_id="entity", exec_id="x", input={}, trigger={}, event={"id": "E1"})
    with_start = TargetStart("order-1", "Entity", "q", arg, {"event_id": "E1"}, None, "evt", "start", "req-1")
    env = ActivityEnvironment(client=cast(Client, client))
    env.info = dataclasses.replace(env.info, is_local=False, attempt=2, scheduled_time=datetime.now(UTC))
    assert await env.run(BridgeActivities(snapshot()).start_targets, StartBatch([with_start])) == [SIGNAL_STARTED]
    assert client.signal_with_starts == [("order-1", "req-1")]
    assert len(client.listed) == 1 and 'ExecutionStatus != "Running"' in client.listed[0]


class ClosesWhileWaiting(ClosingRuns):
    """A target whose open run R1 holds the signal an earlier attempt sent unheard, and closes
    while the retry waits for a start slot (the only one, held by another start)."""

    def __init__(self) -> None:
        super().__init__()
        self.outage = False
        self.r1_open = True

    def get_workflow_handle(self, workflow_id: str) -> Any:
        async def describe(**_: Any) -> Any:
            status = WorkflowExecutionStatus.RUNNING if self.r1_open else WorkflowExecutionStatus.COMPLETED
            return SimpleNamespace(run_id="R1", status=status)

        return SimpleNamespace(describe=describe)

    async def list_workflows(self, query: str) -> Any:
        for _ in ():
            yield None

    async def get_workflow_execution_history(self, request: Any) -> Any:
        return first_event(datetime.now(UTC) - timedelta(days=1))

    async def get_workflow_execution_history_reverse(self, request: Any) -> Any:
        assert request.execution.run_id == "R1"
        return signaled_page("req-E1")

    async def start_workflow(self, workflow: str, arg: Any, *, id: str, **_: Any) -> None:
        await asyncio.sleep(0.3)  # holds the only slot while R1 closes
        self.starts.append(id)


async def test_a_retry_looks_for_its_signal_right_before_sending_it_not_before_its_wait() -> None:
    """The search for a signal an earlier attempt sent unheard came before the wait for a start
    slot: R1, open then (it dedupes a signal sent again), closed during the wait, and the
    signal-with-start sent after it started a second run with the same event."""
    client = ClosesWhileWaiting()
    arg = TargetInput(workflow_id="entity", exec_id="x", input={}, trigger={}, event={"id": "E1"})
    with_start = TargetStart("order-42", "Entity", "q", arg, {"event_id": "E1"}, None, "evt", "start", "req-E1")
    acts = BridgeActivities(snapshot(starts_in_flight=1, batch_size=1))
    env = ActivityEnvironment(client=cast(Client, client))
    env.info = dataclasses.replace(
        env.info, is_local=False, attempt=2, scheduled_time=datetime.now(UTC) - timedelta(seconds=1)
    )

    async def close_r1() -> None:
        await asyncio.sleep(0.1)
        client.r1_open = False

    closer = asyncio.create_task(close_r1())
    outcomes = await env.run(acts.start_targets, StartBatch([start("other", None), with_start]))
    await closer
    assert outcomes == [STARTED, SIGNALED]  # found in R1, not sent again
    assert client.signal_with_starts == []


class ContinuedAsNew(OpenRun):
    """A target whose run R1 took an earlier attempt's signal and continued as new into R2 just
    now: R2 is open, and visibility does not list R1 yet."""

    def __init__(self) -> None:
        super().__init__()
        self.signals: list[tuple[str, str]] = []

    async def signal_workflow_execution(self, req: Any, **_: Any) -> Any:
        self.signals.append((req.workflow_execution.workflow_id, req.request_id))

    async def get_workflow_execution_history(self, request: Any) -> Any:
        if request.execution.run_id == "open-run":
            return first_event(datetime.now(UTC), continued_from="R1")
        return first_event(datetime.now(UTC) - timedelta(days=1))

    async def get_workflow_execution_history_reverse(self, request: Any) -> Any:
        assert request.execution.run_id == "R1"
        return signaled_page("req-1")


async def test_a_retry_finds_its_signal_in_the_run_its_target_continued_as_new_from() -> None:
    """Runs closed since the batch were found through visibility alone, which lists a run that
    just continued as new only later: its successor, open, does not dedupe a signal sent to the
    run before it, and took the event a second time."""
    client = ContinuedAsNew()
    arg = TargetInput(workflow_id="entity", exec_id="x", input={}, trigger={}, event={"id": "E1"})
    skip = TargetStart("order-1", "Entity", "q", arg, {"event_id": "E1"}, None, "evt", "skip", "req-1")
    env = ActivityEnvironment(client=cast(Client, client))
    env.info = dataclasses.replace(
        env.info, is_local=False, attempt=2, scheduled_time=datetime.now(UTC) - timedelta(seconds=5)
    )
    assert await env.run(BridgeActivities(snapshot()).start_targets, StartBatch([skip])) == [SIGNALED]
    assert client.signals == [] and client.signal_with_starts == []


class ClosesDuringList(ClosesWhileWaiting):
    """R1 holds the earlier attempt's signal and is open when described; it closes while the
    visibility query runs, which does not list it yet either."""

    def __init__(self, list_seconds: float = 0.05) -> None:
        super().__init__()
        self.list_seconds = list_seconds
        self.sent_at: list[float] = []
        self.first_events = 0

    async def get_workflow_execution_history(self, request: Any) -> Any:
        self.first_events += 1
        return await super().get_workflow_execution_history(request)

    async def list_workflows(self, query: str) -> Any:
        await asyncio.sleep(self.list_seconds)
        self.r1_open = False
        for _ in ():
            yield None

    async def signal_with_start_workflow_execution(self, req: Any, **_: Any) -> Any:
        self.sent_at.append(time.monotonic())
        return await super().signal_with_start_workflow_execution(req)


def retried(client: Any, *starts: TargetStart, **dispatcher: Any) -> tuple[ActivityEnvironment, BridgeActivities]:
    env = ActivityEnvironment(client=cast(Client, client))
    env.info = dataclasses.replace(
        env.info, is_local=False, attempt=2, scheduled_time=datetime.now(UTC) - timedelta(seconds=1)
    )
    return env, BridgeActivities(snapshot(**dispatcher))


def signal_start(target: str = "order-42", request_id: str = "req-E1") -> TargetStart:
    arg = TargetInput(workflow_id="entity", exec_id="x", input={}, trigger={}, event={"id": "E1"})
    return TargetStart(target, "Entity", "q", arg, {"event_id": "E1"}, None, "evt", "start", request_id)


async def test_a_run_seen_open_that_closes_during_the_search_is_searched_again() -> None:
    """An open run was not read (it dedupes a signal sent again); if it closed during the rest of
    the search, the signal-with-start sent after it started another run with the same event."""
    client = ClosesDuringList()
    env, acts = retried(client)
    assert await env.run(acts.start_targets, StartBatch([signal_start()])) == [SIGNALED]
    assert client.signal_with_starts == []


async def test_a_search_past_the_attempts_deadline_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The deadline was looked at before the search: a slow search sent its signal-with-start
    after it, when the answer could reach no heartbeat and the retry would send it again."""
    deadline = time.monotonic() + 0.1
    monkeypatch.setattr(activities, "send_until", lambda info: deadline)
    client = ClosesDuringList(list_seconds=0.3)
    client.get_workflow_handle = lambda wid: SimpleNamespace(  # type: ignore[method-assign]
        describe=lambda **_: asyncio.sleep(0, SimpleNamespace(run_id="R", status=WorkflowExecutionStatus.RUNNING))
    )
    env, acts = retried(client)
    with pytest.raises(ApplicationError, match="out of time"):
        await env.run(acts.start_targets, StartBatch([signal_start()]))
    assert client.sent_at == []


async def test_a_retrys_search_is_no_starts_latency_and_whom_a_run_continued_from_is_read_once() -> None:
    """The window took the search's time for the start's and shrank (64 to 39 for one retried
    batch); and every signal of a batch read the first event of each run again."""
    clock = [0.0]  # the window's: a search takes 10 of it, a send 1

    class Timed(ClosesDuringList):
        async def list_workflows(self, query: str) -> Any:
            clock[0] += 10
            for _ in ():
                yield None

        async def get_workflow_execution_history_reverse(self, request: Any) -> Any:
            return SimpleNamespace(history=SimpleNamespace(events=[]), next_page_token=b"")

        async def signal_with_start_workflow_execution(self, req: Any, **_: Any) -> Any:
            clock[0] += 1
            self.signal_with_starts.append((req.workflow_id, req.request_id))
            return SimpleNamespace(started=True)

    client = Timed()
    client.r1_open = False  # closed, and it holds none of these signals
    starts = [signal_start("order-1", f"req-{i}") for i in range(3)]  # three events to one target
    env, acts = retried(client)
    window = acts.slots.window
    window.now = lambda: clock[0]  # type: ignore[method-assign]
    timed: list[float] = []
    finished = window.finished
    window.finished = lambda began: (timed.append(clock[0] - began), finished(began))[1]  # type: ignore[method-assign]
    assert await env.run(acts.start_targets, StartBatch(starts)) == [SIGNAL_STARTED] * 3
    assert timed == [1, 1, 1]  # each send, not its search
    assert client.first_events == 1  # R1's, once for the attempt
