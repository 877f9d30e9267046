"""`DispatcherClient` against a fake Temporal client: coalescing, splitting, ordering, failures, close.

The fake records every signal-with-start and can hold calls in flight (per dispatcher id) or
fail the next ones, which is all the client's batching logic can observe of Temporal.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from datetime import timedelta
from types import SimpleNamespace
from typing import Any, cast

import pytest
from google.protobuf.any_pb2 import Any as ProtoAny
from google.protobuf.message import Message
from temporalio.api.common.v1 import GrpcStatus, Payload
from temporalio.api.enums.v1 import ResourceExhaustedCause, WorkflowExecutionStatus
from temporalio.api.errordetails.v1 import ResourceExhaustedFailure, WorkflowNotReadyFailure
from temporalio.api.workflowservice.v1 import DescribeWorkflowExecutionResponse, SignalWithStartWorkflowExecutionRequest
from temporalio.client import Client
from temporalio.common import RawValue, WorkflowIDConflictPolicy
from temporalio.converter import DataConverter
from temporalio.service import RPCError, RPCStatusCode

import dispatcher.client
from bridge.errors import EventRejected, Overloaded, PartlyHeld, PartlyRefused, Unavailable
from bridge.event import EventSignal, encode, encoded_size
from bridge.metrics import Metrics
from dispatcher import told
from dispatcher.client import (
    WATCH_EVERY,
    WATCH_MOST,
    DispatcherClient,
    busy,
    next_look,
    not_ready,
    query_stats,
    shard_of,
)
from dispatcher.contract import (
    DISPATCHER_WORKFLOW,
    DRAIN_HISTORY_BYTES,
    EVENT_SIGNAL,
    FULL_MARGIN,
    FULL_MARGIN_CARRY,
    MAX_CARRY_BYTES,
    MAX_SIGNAL_BYTES,
    MAX_SIGNAL_EVENTS,
    RELOAD_SIGNAL,
    STATS_QUERY,
    TAKE_WEIGHT,
    DispatcherInput,
    dispatcher_id,
)
from dispatcher.slots import PRESSURE, STEP
from tests.helpers import assert_eventually, config, runner

PROJECT = "shop"


@dataclass
class Call:
    workflow: str
    arg: Any
    id: str
    task_queue: str
    options: dict[str, Any]

    @property
    def events(self) -> list[dict[str, Any]]:
        """The events as the dispatcher's signal handler decodes them."""
        [payload] = self.payloads
        [events] = DataConverter.default.payload_converter.from_payloads([payload], [list[dict[str, Any]]])
        return cast(list[dict[str, Any]], events)

    @property
    def payloads(self) -> list[Payload]:
        """The signal's arguments as the SDK puts them on the wire."""
        [arg] = self.options["start_signal_args"]
        assert isinstance(arg, RawValue)
        return [arg.payload]

    @property
    def ids(self) -> list[str]:
        return [e["id"] for e in self.events]


@dataclass
class FakeHandle:
    temporal: FakeTemporal
    id: str

    async def signal(self, name: str, *args: Any) -> None:
        self.temporal.signals.append((self.id, name))

    async def query(self, name: str, *, rpc_timeout: timedelta | None = None) -> dict[str, Any]:
        """STATS_QUERY with the dispatcher's ``accept_bytes`` (none: an older dispatcher's answer)."""
        assert name == STATS_QUERY
        self.temporal.looks += 1
        if self.temporal.no_worker:
            raise RPCError("no poller seen for task queue", RPCStatusCode.FAILED_PRECONDITION, b"")
        if self.id in self.temporal.absent:
            raise RPCError("workflow not found", RPCStatusCode.NOT_FOUND, b"")
        accept = self.temporal.accept.get(self.id)  # the state the answer is from
        if self.temporal.query_delay:
            await asyncio.sleep(self.temporal.query_delay)
        if self.temporal.query_hold is not None:
            await self.temporal.query_hold.wait()
        self.temporal.answered += 1
        return {"received": 0} if accept is None else {"received": 0, "accept_bytes": accept}

    async def describe(self, *, rpc_timeout: timedelta | None = None) -> Any:
        if self.id in self.temporal.absent:
            raise RPCError("workflow not found", RPCStatusCode.NOT_FOUND, b"")
        if self.temporal.describe_error is not None:
            raise self.temporal.describe_error
        described = DescribeWorkflowExecutionResponse()
        described.workflow_execution_info.history_size_bytes = self.temporal.history_bytes.get(self.id, 0)
        described.workflow_execution_info.execution.run_id = self.temporal.run_ids.get(self.id, "run-1")
        described.workflow_execution_info.status = (
            WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_TERMINATED
            if self.id in self.temporal.closed
            else WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING
        )
        if self.id in self.temporal.task_attempt:
            described.pending_workflow_task.attempt = self.temporal.task_attempt[self.id]
        if self.id in self.temporal.problems:
            problems = described.workflow_execution_info.search_attributes.indexed_fields["TemporalReportedProblems"]
            problems.CopyFrom(DataConverter.default.payload_converter.to_payloads([self.temporal.problems[self.id]])[0])
        return SimpleNamespace(raw_description=described)


@dataclass
class FakeService:
    """`Client.workflow_service`: the system-info call the client probes Temporal with, and the
    signal-with-start it sends events with (recorded by its FakeTemporal)."""

    reachable: bool = True
    probes: int = 0
    temporal: FakeTemporal | None = None

    async def get_system_info(self, request: Any, *, timeout: timedelta | None = None) -> object:
        self.probes += 1
        if not self.reachable:
            raise RPCError("connection refused", RPCStatusCode.UNAVAILABLE, b"")
        return object()

    async def signal_with_start_workflow_execution(
        self, req: SignalWithStartWorkflowExecutionRequest, *, retry: bool = False, timeout: timedelta | None = None
    ) -> object:
        assert self.temporal is not None
        return await self.temporal.signal_with_start(req, retry)


@dataclass
class FakeTemporal:
    """The parts of `temporalio.client.Client` the dispatcher client uses to send and probe.

    Every signal-with-start sent without the SDK's retries is a call (``calls``, numbered from 0).
    One sent again with them (the same request id as the call before it) is that call retried by
    the SDK until it gave up: it ends as that call did."""

    calls: list[Call] = field(default_factory=list)
    signals: list[tuple[str, str]] = field(default_factory=list)
    held: set[str] = field(default_factory=set)  # dispatcher ids whose calls wait for `release`
    release: asyncio.Event = field(default_factory=asyncio.Event)
    errors: dict[int, BaseException] = field(default_factory=dict)  # call number (from 0) -> what it raises
    in_flight: int = 0
    sdk_retried: list[int] = field(default_factory=list)  # calls sent again with the SDK's retries
    workflow_service: FakeService = field(default_factory=FakeService)
    namespace: str = "default"
    identity: str = "fake@test"
    accept: dict[str, int] = field(default_factory=dict)  # dispatcher id -> its accept_bytes
    history_bytes: dict[str, int] = field(default_factory=dict)  # dispatcher id -> its run's history
    no_worker: bool = False  # the stats query fails: no worker runs the dispatcher
    task_attempt: dict[str, int] = field(default_factory=dict)  # dispatcher id -> its pending task's attempt
    problems: dict[str, list[str]] = field(default_factory=dict)  # dispatcher id -> TemporalReportedProblems
    closed: set[str] = field(default_factory=set)  # dispatchers whose latest run was terminated
    absent: set[str] = field(default_factory=set)  # dispatchers with no run yet: the next signal begins one
    describe_error: BaseException | None = None  # what describing a dispatcher raises
    grow_history: bool = False  # each signal adds its bytes to its dispatcher's history_bytes
    run_ids: dict[str, str] = field(default_factory=dict)  # dispatcher id -> its latest run's id (run-1)
    query_delay: float = 0.0  # seconds a query takes
    looks: int = 0  # stats queries asked
    answered: int = 0  # of them, answered
    query_hold: asyncio.Event | None = None  # when set, a query answers (from the state it was asked in) once it is set
    data_converter: DataConverter = DataConverter.default

    def __post_init__(self) -> None:
        self.workflow_service.temporal = self

    async def start_workflow(self, workflow: str, arg: Any, *, id: str, task_queue: str, **options: Any) -> None:
        self.calls.append(Call(workflow, arg, id, task_queue, options))
        await self._answer(len(self.calls) - 1, id)

    async def signal_with_start(self, req: SignalWithStartWorkflowExecutionRequest, retry: bool) -> object:
        if retry and self.calls and self.calls[-1].options.get("request_id") == req.request_id:
            number = len(self.calls) - 1
            self.sdk_retried.append(number)
            if number in self.errors:
                raise self.errors[number]
            return object()
        [arg] = await self.data_converter.decode(list(req.input.payloads), [DispatcherInput])
        options = {
            "start_signal": req.signal_name,
            "start_signal_args": [RawValue(payload) for payload in req.signal_input.payloads],
            "request_id": req.request_id,
            "namespace": req.namespace,
            "identity": req.identity,
            "retry": retry,
            "header": dict(req.header.fields),
        }
        if req.workflow_id_conflict_policy:
            options["id_conflict_policy"] = req.workflow_id_conflict_policy
        self.calls.append(Call(req.workflow_type.name, arg, req.workflow_id, req.task_queue.name, options))
        await self._answer(len(self.calls) - 1, req.workflow_id)
        self.absent.discard(req.workflow_id)
        if self.grow_history:
            taken = sum(len(p.data) for p in req.signal_input.payloads)
            self.history_bytes[req.workflow_id] = self.history_bytes.get(req.workflow_id, 0) + taken
        if req.workflow_id in self.accept:  # what it took is no longer room
            taken = sum(len(p.data) for p in req.signal_input.payloads)
            self.accept[req.workflow_id] = max(0, self.accept[req.workflow_id] - taken)
        return object()

    async def _answer(self, number: int, workflow_id: str) -> None:
        self.in_flight += 1
        try:
            if workflow_id in self.held:
                await self.release.wait()
            if number in self.errors:
                raise self.errors[number]
        finally:
            self.in_flight -= 1

    def get_workflow_handle(self, workflow_id: str) -> FakeHandle:
        return FakeHandle(self, workflow_id)

    def sent(self, dispatcher: str | None = None) -> list[list[str]]:
        """Event ids per signal, in the order the signals were sent."""
        return [c.ids for c in self.calls if dispatcher is None or c.id == dispatcher]


def make_client(
    temporal: FakeTemporal, shards: int = 1, metrics: Metrics | None = None, **options: Any
) -> DispatcherClient:
    cfg = config(PROJECT, "unused:7233", [runner("w", "order.created")], dispatcher={"shards": shards})
    options.setdefault("retry_after", 3.0)
    return DispatcherClient(cast(Client, temporal), cfg, metrics or Metrics(), **options)


def ev(event_id: str, key: str | None = None, size: int = 0) -> EventSignal:
    payload = {"pad": "x" * size} if size else {}
    return EventSignal(id=event_id, name="order.created", payload=payload, source="http", key=key)


async def in_flight(temporal: FakeTemporal, count: int = 1) -> None:
    await assert_eventually(lambda: temporal.in_flight == count, timeout=5, interval=0.005, what="signal in flight")


async def settle() -> None:
    """Let every ready task run up to its next wait."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_submissions_during_a_signal_in_flight_leave_together() -> None:
    temporal = FakeTemporal(held={dispatcher_id(PROJECT, 0, 1)})
    client = make_client(temporal)
    first = asyncio.create_task(client.submit([ev("a")]))
    await in_flight(temporal)
    later = [asyncio.create_task(client.submit(events)) for events in ([ev("b")], [ev("c"), ev("d")], [ev("e")])]
    await settle()
    assert temporal.sent() == [["a"]]
    assert not any(t.done() for t in [first, *later])

    temporal.held.clear()
    temporal.release.set()
    await asyncio.gather(first, *later)
    assert temporal.sent() == [["a"], ["b", "c", "d", "e"]]
    await client.close()


async def test_the_next_signal_starts_before_the_answered_submitters_resume() -> None:
    """While the answered requests are written out, Temporal already works on the next signal."""
    temporal = FakeTemporal(held={dispatcher_id(PROJECT, 0, 1)})
    client = make_client(temporal)
    first = asyncio.create_task(client.submit([ev("a")]))
    await in_flight(temporal)
    second = asyncio.create_task(client.submit([ev("b")]))
    await settle()
    seen: list[bool] = []
    send = temporal.signal_with_start

    async def recording(*args: Any, **kwargs: Any) -> object:
        seen.append(first.done())
        return await send(*args, **kwargs)

    temporal.signal_with_start = recording  # type: ignore[method-assign]
    open_gate(temporal)
    await asyncio.gather(first, second)
    assert temporal.sent() == [["a"], ["b"]]
    assert seen == [False]  # "b" left while "a"'s submitter had not resumed yet
    await client.close()


async def test_signal_with_start_names_the_dispatcher_its_input_and_the_event_signal() -> None:
    temporal = FakeTemporal()
    client = make_client(temporal)
    await client.submit([ev("a")])
    [call] = temporal.calls
    assert call.workflow == DISPATCHER_WORKFLOW
    assert call.arg == DispatcherInput(project=PROJECT, shard=0, raw_signals=True)
    assert (call.id, call.task_queue) == ("dispatcher-shop", "shop")
    assert call.options["start_signal"] == EVENT_SIGNAL
    assert call.events == [ev("a").to_dict() | {"time": call.events[0]["time"]}]
    assert "id_conflict_policy" not in call.options  # signal-with-start: a closed dispatcher is started anew
    await client.close()


async def test_the_signal_carries_each_event_encoded_once_as_the_sdk_would_encode_the_list() -> None:
    """The pipeline's encodings are sent as they are: byte for byte the SDK's own JSON of the list."""
    temporal = FakeTemporal()
    client = make_client(temporal)
    events = [
        EventSignal(
            id="é-1",
            name="order.created",
            payload={"z": 1, "a": [1.5, None, True], "nested": {"b": "ü", "a": "\u2028"}},
            source="http:token-1",
            metadata={"headers": {"x-request-id": "r"}},
            key="k",
        ),
        ev("b"),
    ]
    await client.submit_encoded(events, [encode(e.to_dict()) for e in events])
    [call] = temporal.calls
    [expected] = DataConverter.default.payload_converter.to_payloads([[e.to_dict() for e in events]])
    assert call.payloads == [expected]
    assert call.events == [e.to_dict() for e in events]
    await client.close()


async def test_submit_encodes_the_events_itself() -> None:
    temporal = FakeTemporal()
    client = make_client(temporal)
    events = [ev("a", size=10), ev("b")]
    await client.submit(events)
    [call] = temporal.calls
    assert call.payloads == DataConverter.default.payload_converter.to_payloads([[e.to_dict() for e in events]])
    await client.close()


async def test_one_submission_over_the_event_limit_is_split_in_order() -> None:
    temporal = FakeTemporal()
    client = make_client(temporal)
    count = 2 * MAX_SIGNAL_EVENTS + 7
    await client.submit([ev(str(i)) for i in range(count)])
    assert [len(ids) for ids in temporal.sent()] == [MAX_SIGNAL_EVENTS, MAX_SIGNAL_EVENTS, 7]
    assert [i for ids in temporal.sent() for i in ids] == [str(i) for i in range(count)]
    await client.close()


async def test_one_submission_over_the_byte_limit_is_split_in_order() -> None:
    temporal = FakeTemporal()
    client = make_client(temporal)
    events = [ev(str(i), size=MAX_SIGNAL_BYTES // 3) for i in range(7)]
    await client.submit(events)
    assert [len(ids) for ids in temporal.sent()] == [2, 2, 2, 1]
    assert [i for ids in temporal.sent() for i in ids] == [str(i) for i in range(7)]
    assert all(sum(encoded_size(e) for e in call.events) <= MAX_SIGNAL_BYTES for call in temporal.calls)
    await client.close()


async def hold_first(temporal: FakeTemporal, client: DispatcherClient) -> asyncio.Task[None]:
    """Submit one event and keep its signal in flight until ``open_gate``."""
    temporal.held.add(dispatcher_id(PROJECT, 0, 1))
    first = asyncio.create_task(client.submit([ev("first")]))
    await in_flight(temporal)
    return first


def open_gate(temporal: FakeTemporal) -> None:
    temporal.held.clear()
    temporal.release.set()


async def test_queued_submissions_are_not_coalesced_past_the_event_limit() -> None:
    temporal = FakeTemporal()
    client = make_client(temporal)
    first = await hold_first(temporal, client)
    sizes = (MAX_SIGNAL_EVENTS - 10, 20, 5)
    tasks = [asyncio.create_task(client.submit([ev(f"{n}/{i}") for i in range(n)])) for n in sizes]
    await settle()
    open_gate(temporal)
    await asyncio.gather(first, *tasks)
    # 490 + 20 would pass 500: the 20 wait for the next signal, and the 5 queued behind join them.
    assert [len(ids) for ids in temporal.sent()] == [1, MAX_SIGNAL_EVENTS - 10, 25]
    await client.close()


async def test_queued_submissions_are_not_coalesced_past_the_byte_limit() -> None:
    temporal = FakeTemporal()
    client = make_client(temporal)
    first = await hold_first(temporal, client)
    tasks = [asyncio.create_task(client.submit([ev(f"big-{i}", size=400 * 1024)])) for i in range(3)]
    await settle()
    open_gate(temporal)
    await asyncio.gather(first, *tasks)
    assert temporal.sent() == [["first"], ["big-0", "big-1"], ["big-2"]]
    assert all(sum(encoded_size(e) for e in c.events) <= MAX_SIGNAL_BYTES for c in temporal.calls)
    await client.close()


async def test_an_event_too_large_alone_is_rejected_and_nothing_is_sent() -> None:
    temporal = FakeTemporal()
    client = make_client(temporal)
    with pytest.raises(EventRejected) as caught:
        await client.submit([ev("ok"), ev("huge", size=MAX_SIGNAL_BYTES)])
    assert caught.value.reason == "too_large"
    await client.close()
    assert temporal.calls == []


async def test_each_shard_keeps_submission_order_and_does_not_wait_for_the_others() -> None:
    shards = 4
    temporal = FakeTemporal()
    client = make_client(temporal, shards=shards)
    keys = [f"customer-{k}" for k in range(12)]
    held = dispatcher_id(PROJECT, shard_of(ev("x", key=keys[0]), shards), shards)
    temporal.held.add(held)
    batches = [[ev(f"{key}/{n}", key=key) for key in keys] for n in range(5)]
    tasks = []
    for batch in batches:  # one after another, each while earlier ones may still be in flight
        tasks.append(asyncio.create_task(client.submit(batch)))
        await asyncio.sleep(0)

    # The other shards send everything while one shard's first signal is held.
    def others_done() -> bool:
        sent = {i for c in temporal.calls if c.id != held for i in c.ids}
        return sent == {e.id for b in batches for e in b if client.ids[shard_of(e, shards)] != held}

    await assert_eventually(others_done, timeout=5, interval=0.005, what="the other shards sent everything")
    assert len(temporal.sent(held)) == 1
    open_gate(temporal)
    await asyncio.gather(*tasks)

    for key in keys:
        wid = client.ids[shard_of(ev("x", key=key), shards)]
        seen = [i for ids in temporal.sent(wid) for i in ids if i.startswith(f"{key}/")]
        assert seen == [f"{key}/{n}" for n in range(5)]
    assert sorted(i for ids in temporal.sent() for i in ids) == sorted(e.id for b in batches for e in b)
    await client.close()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (RPCError("connection refused", RPCStatusCode.UNAVAILABLE, b""), Unavailable),
        (RPCError("deadline exceeded", RPCStatusCode.DEADLINE_EXCEEDED, b""), Unavailable),
        (RuntimeError("the channel broke"), Unavailable),
        # The dispatcher's history is full (no worker took its signals for long): Temporal ends that
        # run and the retry starts the next one, so the events are not refused.
        (RPCError("Workflow history size exceeds limit.", RPCStatusCode.INVALID_ARGUMENT, b""), Unavailable),
    ],
)
async def test_a_failed_signal_fails_every_submission_it_carried(error: BaseException, expected: type) -> None:
    temporal = FakeTemporal(errors={1: error})  # the second signal fails
    client = make_client(temporal)
    answers = await coalesced_behind_a_first(temporal, client, "b", "c")

    assert temporal.sent() == [["first"], ["b", "c"]]
    # Answers the SDK retries get its retries (the same request again); the others are final.
    retried = isinstance(error, RPCError) and error.status in (
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
    )
    assert temporal.sdk_retried == ([1] if retried else [])
    for exc in answers:
        assert isinstance(exc, expected) and exc.retry_after == 3.0, exc
    await client.submit([ev("d")])  # the sender survived
    assert temporal.sent()[-1] == ["d"]
    await client.close()


async def coalesced_behind_a_first(temporal: FakeTemporal, client: DispatcherClient, *ids: str) -> list[Any]:
    """Submit one event per id while a first signal is held, so that the sender coalesces them into
    the next signal; then let it all go. The submissions' answers: None, or what they raised."""
    first = await hold_first(temporal, client)
    carried = [asyncio.create_task(client.submit([ev(i)])) for i in ids]
    await settle()
    open_gate(temporal)
    await first
    return list(await asyncio.gather(*carried, return_exceptions=True))


TOO_LARGE = [
    RPCError("request size exceeds the limit", RPCStatusCode.INVALID_ARGUMENT, b""),
    RPCError("Blob data size exceeds limit.", RPCStatusCode.INVALID_ARGUMENT, b""),
]


@pytest.mark.parametrize("error", TOO_LARGE)
async def test_a_signal_too_large_is_sent_again_request_by_request(error: RPCError) -> None:
    """On a server whose payload limit is below the bridge's 1 MiB, a coalesced signal of many
    requests was refused as too large and every request in it answered 413 (which clients do not
    retry): requests that fit alone were lost. Each is now sent alone; only one too large alone is
    refused."""
    temporal = FakeTemporal(errors={1: error, 2: error})  # the coalesced signal, then b alone
    client = make_client(temporal)
    b, c = await coalesced_behind_a_first(temporal, client, "b", "c")

    assert temporal.sent() == [["first"], ["b", "c"], ["b"], ["c"]]
    assert isinstance(b, EventRejected) and b.reason == "too_large"
    assert c is None, "held: it fit alone"
    await client.submit([ev("d")])  # the sender survived
    assert temporal.sent()[-1] == ["d"]
    await client.close()


async def test_once_a_request_sent_alone_finds_temporal_away_the_rest_are_answered_not_sent() -> None:
    """Sent one by one after a too-large signal, each waited its own RPC deadline and retries
    while Temporal was away, and the client never noticed it was down."""
    temporal = FakeTemporal(errors={1: TOO_LARGE[0], 2: RPCError("refused", RPCStatusCode.UNAVAILABLE, b"")})
    client = make_client(temporal)
    answers = await coalesced_behind_a_first(temporal, client, "b", "c", "d")
    assert temporal.sent() == [["first"], ["b", "c", "d"], ["b"]]
    assert all(isinstance(a, Unavailable) for a in answers), answers
    await client.close()


@pytest.mark.parametrize("error", TOO_LARGE)
async def test_one_request_too_large_alone_is_refused_as_too_large(error: RPCError) -> None:
    temporal = FakeTemporal(errors={0: error})
    client = make_client(temporal)
    with pytest.raises(EventRejected) as caught:
        await client.submit([ev("a"), ev("b")])  # one request: one submission
    assert caught.value.reason == "too_large" and temporal.sent() == [["a", "b"]]
    await client.close()


async def test_a_cancelled_submitter_does_not_stop_the_others() -> None:
    temporal = FakeTemporal()
    client = make_client(temporal)
    first = await hold_first(temporal, client)
    gone = asyncio.create_task(client.submit([ev("gone")]))
    stays = asyncio.create_task(client.submit([ev("stays")]))
    await settle()
    gone.cancel()  # an HTTP client hung up; its event may still be sent, and that is fine
    open_gate(temporal)
    await asyncio.gather(first, stays)
    assert gone.cancelled()
    assert temporal.sent()[-1][-1] == "stays"
    await client.close()


async def test_close_flushes_what_was_submitted() -> None:
    temporal = FakeTemporal()
    client = make_client(temporal)
    first = await hold_first(temporal, client)
    queued = [asyncio.create_task(client.submit([ev(i)])) for i in ("b", "c")]
    await settle()
    closing = asyncio.create_task(client.close())
    await settle()
    assert not closing.done()
    open_gate(temporal)
    await closing
    assert first.done() and all(t.done() and t.exception() is None for t in queued)
    assert temporal.sent() == [["first"], ["b", "c"]]
    await client.submit([ev("after")])  # a closed client starts its senders again when used
    assert temporal.sent()[-1] == ["after"]
    await client.close()


async def test_a_submission_while_close_waits_is_refused_not_left_unanswered() -> None:
    """close() waits for the queues to empty, then cancels the senders: a submission queued after
    the wait ended would never be answered, and its caller would wait for ever. It is refused as
    soon as close() begins; what was queued before still goes."""
    temporal = FakeTemporal()
    client = make_client(temporal)
    first = await hold_first(temporal, client)
    queued = asyncio.create_task(client.submit([ev("b")]))
    await settle()
    closing = asyncio.create_task(client.close())
    await settle()
    with pytest.raises(Unavailable, match="stopping"):
        await client.submit([ev("late")])
    open_gate(temporal)
    await asyncio.wait_for(closing, 5)
    await asyncio.wait_for(asyncio.gather(first, queued), 5)
    assert temporal.sent() == [["first"], ["b"]]


async def test_what_is_left_in_a_queue_when_close_ends_is_answered_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing submits during close() (it refuses), but a submission that reached a queue past the
    senders' end, put there directly here, is answered, not left waiting."""
    temporal = FakeTemporal()
    client = make_client(temporal)
    await client.submit([ev("a")])
    stray = dispatcher.client._Submission([b"{}"], 2)
    real_join = asyncio.Queue.join

    async def join_then_put(queue: asyncio.Queue[Any]) -> None:
        await real_join(queue)
        queue.put_nowait(stray)  # after the join, before the cancel

    monkeypatch.setattr(asyncio.Queue, "join", join_then_put)
    await asyncio.wait_for(client.close(), 5)
    assert stray.done.done() and isinstance(stray.done.exception(), Unavailable)


async def test_a_reload_reaches_every_shard_whatever_one_answers() -> None:
    """Shards were told one after another: a shard whose run was closed (NOT_FOUND, told by its
    next run) stopped the rest, which kept the old routes, and the watcher retried for good."""

    class Answering(FakeHandle):
        async def signal(self, name: str, *args: Any) -> None:
            if (answer := failures.get(self.id)) is not None:
                raise answer
            await super().signal(name, *args)

    temporal = FakeTemporal()
    temporal.get_workflow_handle = lambda wid: Answering(temporal, wid)  # type: ignore[method-assign]
    client = make_client(temporal, shards=3)
    failures = {client.ids[0]: RPCError("workflow execution already completed", RPCStatusCode.NOT_FOUND, b"")}
    await client.reload()  # a closed shard counts as told
    assert temporal.signals == [(wid, RELOAD_SIGNAL) for wid in client.ids[1:]]

    temporal.signals.clear()
    failures = {client.ids[1]: RPCError("connection refused", RPCStatusCode.UNAVAILABLE, b"")}
    with pytest.raises(RPCError):
        await client.reload()
    assert temporal.signals == [(client.ids[0], RELOAD_SIGNAL), (client.ids[2], RELOAD_SIGNAL)]


async def test_ensure_started_and_reload_reach_every_shard() -> None:
    temporal = FakeTemporal()
    client = make_client(temporal, shards=3)
    await client.ensure_started()
    assert [c.id for c in temporal.calls] == ["dispatcher-shop-0", "dispatcher-shop-1", "dispatcher-shop-2"]
    assert [c.arg for c in temporal.calls] == [
        DispatcherInput(project=PROJECT, shard=k, raw_signals=True) for k in range(3)
    ]
    for call in temporal.calls:
        assert call.options["id_conflict_policy"] == WorkflowIDConflictPolicy.USE_EXISTING
        assert "start_signal" not in call.options
    await client.reload()
    assert temporal.signals == [(wid, RELOAD_SIGNAL) for wid in client.ids]

    down = FakeTemporal(errors={0: RPCError("connection refused", RPCStatusCode.UNAVAILABLE, b"")})
    with pytest.raises(Unavailable):
        await make_client(down).ensure_started()


# --- an outage is answered quickly -------------------------------------------------------------

FAST = {"suspect_after": 0.05, "probe_timeout": 0.05, "probe_interval": 0.05}
REFUSED = RPCError("connection refused", RPCStatusCode.UNAVAILABLE, b"")


async def test_once_temporal_is_down_submissions_fail_at_once_until_a_probe_answers() -> None:
    temporal = FakeTemporal(errors={0: REFUSED})
    temporal.workflow_service.reachable = False
    client = make_client(temporal, **FAST)
    with pytest.raises(Unavailable):
        await client.submit([ev("a")])
    assert client.down

    async with asyncio.timeout(5):  # a guard against a hang: nothing is sent, so nothing is waited for
        for i in range(20):
            with pytest.raises(Unavailable) as caught:
                await client.submit([ev(f"b{i}")])
    assert caught.value.retry_after == 3.0
    assert len(temporal.calls) == 1  # nothing more was sent while it was down

    temporal.workflow_service.reachable = True
    await assert_eventually(lambda: not client.down, timeout=5, interval=0.01, what="the probe saw Temporal again")
    await client.submit([ev("c")])
    assert temporal.sent()[-1] == ["c"]
    await client.close()


async def test_a_hanging_signal_is_not_waited_for_once_a_probe_fails() -> None:
    """Temporal dies with a signal in flight: its submitters and those queued behind it are
    answered within about suspect_after + probe_timeout, not after the RPC's own deadline."""
    temporal = FakeTemporal(held={dispatcher_id(PROJECT, 0, 1)})
    temporal.workflow_service.reachable = False
    client = make_client(temporal, **FAST)
    first = asyncio.create_task(client.submit([ev("first")]))
    await in_flight(temporal)
    behind = asyncio.create_task(client.submit([ev("behind")]))
    async with asyncio.timeout(5):  # the held signal never answers: gather returns only if not waited for
        results = await asyncio.gather(first, behind, return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in results), results
    assert temporal.sent() == [["first"]] and temporal.in_flight == 1  # left to finish on its own

    temporal.workflow_service.reachable = True
    open_gate(temporal)
    await assert_eventually(lambda: not client.down and temporal.in_flight == 0, timeout=5, interval=0.01)
    await client.submit([ev("after")])
    await client.close()


async def test_a_slow_signal_is_waited_for_while_temporal_answers() -> None:
    temporal = FakeTemporal()
    client = make_client(temporal, **FAST)
    first = await hold_first(temporal, client)
    # Past suspect_after a probe runs; Temporal answers it, so the signal is waited for.
    await assert_eventually(lambda: temporal.workflow_service.probes >= 1, timeout=5, interval=0.01)
    await settle()
    assert not first.done() and not client.down
    open_gate(temporal)
    await first
    await client.close()


async def test_a_refusal_from_a_reachable_temporal_does_not_mark_it_down() -> None:
    temporal = FakeTemporal(errors={0: RPCError("namespace rps limit", RPCStatusCode.RESOURCE_EXHAUSTED, b"")})
    client = make_client(temporal, **FAST)
    with pytest.raises(Unavailable):
        await client.submit([ev("a")])
    assert not client.down
    await client.submit([ev("b")])
    await client.close()


async def test_a_submission_of_several_signals_some_failing_says_which_events_are_held() -> None:
    """600 events go as two signals (at most MAX_SIGNAL_EVENTS each); the second fails. The first
    500 are held: the caller hears which, not that nothing is."""
    temporal = FakeTemporal(errors={1: RPCError("deadline", RPCStatusCode.DEADLINE_EXCEEDED, b"")})
    client = make_client(temporal, **FAST)
    events = [ev(f"e{i}") for i in range(MAX_SIGNAL_EVENTS + 100)]
    with pytest.raises(PartlyHeld) as caught:
        await client.submit(events)
    assert caught.value.held == frozenset(range(MAX_SIGNAL_EVENTS))
    assert [len(batch) for batch in temporal.sent()][:1] == [MAX_SIGNAL_EVENTS]
    assert f"{MAX_SIGNAL_EVENTS} of {len(events)} events held" in str(caught.value)
    await client.close()


async def test_a_submission_held_in_part_and_refused_too_large_in_part_says_which_are_held() -> None:
    """On a server whose payload limit is below the bridge's, a later signal of one call was refused
    as too large: the whole call was refused (413), and the events Temporal held were counted
    refused, so a client resending them in smaller requests started them again. Now the refusal
    says which are held, and which were too large alone (a signal of many may fit in parts)."""
    temporal = FakeTemporal(errors={1: TOO_LARGE[1]})
    client = make_client(temporal, **FAST)
    events = [ev(f"e{i}") for i in range(MAX_SIGNAL_EVENTS + 100)]
    with pytest.raises(PartlyRefused) as caught:
        await client.submit(events)
    assert isinstance(caught.value, EventRejected) and caught.value.reason == "too_large"
    assert caught.value.held == frozenset(range(MAX_SIGNAL_EVENTS))
    assert not caught.value.refused, "a signal of 100 events refused is none of them too large alone"
    await client.close()


async def test_only_an_event_whose_signal_carried_it_alone_is_refused_as_too_large_and_none_unsent() -> None:
    """Three signals of one call: the first held, the second (one large event) refused, the third
    never sent (a call's events are held in order or not). Only the second's event is too large."""
    temporal = FakeTemporal(errors={1: TOO_LARGE[1]})
    client = make_client(temporal, **FAST)
    small = [ev(f"s{i}", size=4000) for i in range(150)]
    large = [ev(f"big{i}", size=MAX_SIGNAL_BYTES // 2) for i in range(2)]
    with pytest.raises(PartlyRefused) as caught:
        await client.submit([*small, *large])
    sent = temporal.sent()
    assert [len(batch) for batch in sent] == [150, 1], "the signal after the refused one was not sent"
    held, refused = caught.value.held, caught.value.refused
    assert held == frozenset(range(150)) and set(refused) == {150}
    assert refused[150].reason == "too_large"
    await client.close()


async def test_when_a_submission_s_first_signal_fails_its_later_ones_are_not_sent() -> None:
    """A Kafka batch over one signal goes as several. The first failed (a rate limit: Temporal is
    not down) and the next was held: the batch's later events started first, and the earlier ones
    only when the settle path retried the batch, against the order of the records of one key."""
    temporal = FakeTemporal(errors={0: RPCError("namespace rps limit", RPCStatusCode.RESOURCE_EXHAUSTED, b"")})
    client = make_client(temporal, **FAST)
    events = [ev(f"e{i}", key="K") for i in range(2 * MAX_SIGNAL_EVENTS + 1)]
    with pytest.raises(Unavailable) as caught:
        await client.submit(events)
    assert not isinstance(caught.value, PartlyHeld) and "rps limit" in str(caught.value)
    assert len(temporal.sent()) == 1, "the later signals were not sent"
    await client.submit(events)  # the settle path's retry: in order
    sent = [i for batch in temporal.sent()[1:] for i in batch]
    assert sent == [e.id for e in events]
    await client.close()


async def test_a_submission_whose_submitter_gave_up_while_queued_is_not_sent() -> None:
    """It was sent anyway, after the pipeline had stopped counting it (its caller's ``finally``),
    so max_pending_events did not bound what waited in the queue; and nobody was answered."""
    temporal = FakeTemporal(held={dispatcher_id(PROJECT, 0, 1)})
    client = make_client(temporal)
    first = asyncio.create_task(client.submit([ev("a")]))
    await in_flight(temporal)
    gone = asyncio.create_task(client.submit([ev("gone")]))
    stays = asyncio.create_task(client.submit([ev("b")]))
    await settle()
    gone.cancel()
    await settle()
    temporal.held.clear()
    temporal.release.set()
    await asyncio.gather(first, stays)
    assert gone.cancelled()
    assert temporal.sent() == [["a"], ["b"]]
    await client.close()


async def test_a_submission_of_several_signals_all_failing_is_unavailable_not_partly_held() -> None:
    error = RPCError("namespace rps limit", RPCStatusCode.RESOURCE_EXHAUSTED, b"")
    client = make_client(FakeTemporal(errors={0: error, 1: error}), **FAST)
    with pytest.raises(Unavailable) as caught:
        await client.submit([ev(f"e{i}") for i in range(MAX_SIGNAL_EVENTS + 1)])
    assert not isinstance(caught.value, PartlyHeld)
    await client.close()


async def test_retry_after_follows_http_retry_after_seconds_or_a_callable() -> None:
    cfg = config(PROJECT, "unused:7233", [runner("w", "order.created")], http={"retry_after_seconds": 2})
    temporal = FakeTemporal(errors={0: REFUSED})
    temporal.workflow_service.reachable = False
    client = DispatcherClient(cast(Client, temporal), cfg, **FAST)
    with pytest.raises(Unavailable) as caught:
        await client.submit([ev("a")])
    assert caught.value.retry_after == 2
    await client.close()
    current = {"seconds": 7.0}
    client = DispatcherClient(cast(Client, temporal), cfg, retry_after=lambda: current["seconds"])
    assert client.retry_after == 7.0
    current["seconds"] = 1.0  # a reload changed http.retry_after_seconds
    assert client.retry_after == 1.0


def _rpc_error(status: RPCStatusCode, message: str, *details: Message) -> RPCError:
    packed = []
    for detail in details:
        any_ = ProtoAny()
        any_.Pack(detail)
        packed.append(any_)
    raw = GrpcStatus(code=status.value, message=message, details=packed).SerializeToString()
    return RPCError(message, status, raw)


class _StatsHandle:
    """A workflow handle whose STATS_QUERY raises the given errors first, then answers."""

    def __init__(self, *errors: RPCError) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def query(self, name: str, rpc_timeout: timedelta | None = None) -> dict[str, int]:
        assert name == STATS_QUERY
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return {"received": 1}


NOT_READY = _rpc_error(
    RPCStatusCode.FAILED_PRECONDITION,
    "Unable to query workflow due to Workflow Task in failed state.",
    WorkflowNotReadyFailure(),
)


async def test_the_stats_query_is_asked_again_while_the_workflow_task_is_retried() -> None:
    """A continue-as-new that a signal overtook fails its workflow task once; a query in that
    moment is answered "not ready", which is no answer about the dispatcher."""
    handle = _StatsHandle(NOT_READY, NOT_READY)
    stats = await query_stats(cast(Any, handle), patience=5)
    assert stats == {"received": 1} and handle.calls == 3
    assert not_ready(NOT_READY)


async def test_other_query_errors_and_a_lasting_not_ready_are_raised() -> None:
    gone = _rpc_error(RPCStatusCode.NOT_FOUND, "workflow not found")
    handle = _StatsHandle(gone)
    with pytest.raises(RPCError) as raised:
        await query_stats(cast(Any, handle), patience=5)
    assert raised.value is gone and handle.calls == 1 and not not_ready(gone)

    stuck = _StatsHandle(*[NOT_READY] * 100)
    with pytest.raises(RPCError) as raised:
        await query_stats(cast(Any, stuck), patience=0.5)
    assert raised.value is NOT_READY and 2 <= stuck.calls < 100
    assert not not_ready(_rpc_error(RPCStatusCode.FAILED_PRECONDITION, "namespace is not active"))


async def test_receiving_while_a_signal_is_in_flight_or_events_are_queued() -> None:
    """What a process's starts give way to (dispatcher.slots): events on the way to the dispatcher."""
    temporal = FakeTemporal(held={dispatcher_id(PROJECT, 0, 1)})
    dc = make_client(temporal)
    assert not dc.receiving()
    first = asyncio.create_task(dc.submit([ev("a")]))
    await in_flight(temporal)
    second = asyncio.create_task(dc.submit([ev("b")]))
    await settle()
    assert dc.receiving()
    temporal.release.set()
    await asyncio.gather(first, second)
    await assert_eventually(lambda: not dc.receiving(), timeout=5, interval=0.005, what="nothing on the way")
    assert temporal.sent() == [["a"], ["b"]]
    await dc.close()


async def test_the_hand_over_is_told_each_signal_s_time_and_events() -> None:
    """The client's Handover halves the starts' share for a slow signal with PRESSURE events or
    more, and not for a slow one with fewer; its target follows the callable."""
    target = 60.0
    temporal = FakeTemporal()
    dc = make_client(temporal, handover_target=lambda: target)
    await dc.submit([ev(f"a{i}") for i in range(PRESSURE)])
    assert dc.handover.share() == 1.0  # fast against 60 s
    target = 0.0  # every signal is slow now
    await dc.submit([ev("b")])
    assert dc.handover.share() == 1.0  # one event: a steady load's signal
    await dc.submit([ev(f"c{i}") for i in range(PRESSURE)])
    assert dc.handover.share() == 0.5
    await dc.close()


async def test_only_events_a_client_waits_for_press_the_hand_over() -> None:
    """HTTP and webhook events (their 202s wait for the signal) count; a broker's do not (the
    publisher has its ack from the broker): a slow Kafka poll of hundreds of records is no burst."""
    temporal = FakeTemporal()
    dc = make_client(temporal, handover_target=lambda: 0.0)  # every signal is slow
    brokers = [
        EventSignal(id=f"k{i}", name="order.created", payload={}, source=f"{'kafka' if i % 2 else 'amqp'}:orders")
        for i in range(4 * PRESSURE)
    ]
    await dc.submit(brokers)
    assert dc.handover.share() == 1.0
    mixed = [*brokers[: PRESSURE - 1], EventSignal(id="h", name="order.created", payload={}, source="http:token-1")]
    await dc.submit(mixed)
    assert dc.handover.share() == 1.0  # one event waited for, not PRESSURE
    waited = [
        EventSignal(id=f"w{i}", name="order.created", payload={}, source="webhook:github" if i % 2 else "http:t")
        for i in range(PRESSURE)
    ]
    await dc.submit(waited)
    assert dc.handover.share() == 0.5
    await dc.close()


async def test_each_signal_clients_wait_on_or_sent_below_a_whole_share_tells_the_worker() -> None:
    """A worker in another process gives way only if told (dispatcher.told): each signal that
    carries events a client waits for, or is sent while the hand-over's share is below one, carries
    the share, with the sender's identity; a broker's events sent with a whole share carry none."""
    temporal = FakeTemporal()
    target = 60.0
    dc = make_client(temporal, handover_target=lambda: target)
    kafka = EventSignal(id="k", name="order.created", payload={}, source="kafka:orders")
    await dc.submit([kafka])  # nobody waits, a whole share
    await dc.submit([ev(f"a{i}") for i in range(PRESSURE)])  # a client waits: told, whole
    target = 0.0  # every signal is slow now
    await dc.submit([ev(f"b{i}") for i in range(PRESSURE)])  # sent with a whole share; halves it
    await dc.submit([kafka])  # sent with half
    await dc.submit([ev("d")])  # a STEP given back by the signal before
    headers = [c.options["header"] for c in temporal.calls]
    assert [told.HEADER in h for h in headers] == [False, True, True, True, True]
    shares = [told.read(h[told.HEADER]) for h in headers[1:]]
    assert shares == [("fake@test", 1.0), ("fake@test", 1.0), ("fake@test", 0.5), ("fake@test", 0.5 + STEP)]
    await dc.close()


async def test_a_dispatcher_that_can_take_no_more_is_refused_as_overloaded_until_it_can(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dispatcher whose run holds as much as it can start before continuing-as-new answers
    ``accept_bytes: 0``: its events are refused (Overloaded, nothing sent) until it takes more."""
    monkeypatch.setattr(dispatcher.client, "WATCH_EVERY", 0.01)
    monkeypatch.setattr(dispatcher.client, "WATCH_MOST", 0.01)
    temporal = FakeTemporal()
    wid = dispatcher_id(PROJECT, 0, 1)
    temporal.accept[wid] = 0
    dc = make_client(temporal)
    with pytest.raises(Overloaded):  # the first signal waits for the first look
        await dc.submit([ev("a")])
    assert temporal.looks == 1
    with pytest.raises(Overloaded):
        await dc.submit([ev("b")])
    assert temporal.sent() == []
    temporal.accept[wid] = 10_000
    looks = temporal.looks
    await assert_eventually(lambda: temporal.looks > looks, timeout=5, interval=0.01, what="another look")
    await dc.submit([ev("c")])
    assert temporal.sent() == [["c"]]
    await dc.close()


async def test_the_first_signal_waits_for_the_first_look_and_carries_only_what_fits() -> None:
    """The room was unknown (inf) until a look, and the first look came after the first signal:
    a process restarted with a Kafka backlog sent all it had queued to a run near its bounds,
    which then counted what it could not carry failed after the records were committed."""
    temporal = FakeTemporal()
    wid = dispatcher_id(PROJECT, 0, 1)
    one = encoded_size(ev("q00", size=1000).to_dict())
    temporal.accept[wid] = 3 * one
    dc = make_client(temporal)
    submits = [asyncio.create_task(dc.submit([ev(f"q{i:02}", size=1000)])) for i in range(10)]
    results = await asyncio.gather(*submits, return_exceptions=True)
    held = [f"q{i:02}" for i, r in enumerate(results) if r is None]
    assert [i for ids in temporal.sent() for i in ids] == held
    assert 1 <= len(held) <= 3 and all(isinstance(r, Overloaded) for r in results if r is not None), results
    assert temporal.looks >= 1
    await dc.close()


async def test_a_first_look_that_does_not_answer_holds_the_first_signal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every signal waited while the first look was outstanding: with Temporal throttling the
    queries (each retried for up to 10 s by the SDK), each of them waited the whole timeout."""
    never = asyncio.Event()

    async def hangs(self: FakeHandle, name: str, *, rpc_timeout: timedelta | None = None) -> dict[str, Any]:
        await never.wait()
        return {}

    monkeypatch.setattr(FakeHandle, "query", hangs)
    monkeypatch.setattr(dispatcher.client, "FIRST_LOOK", 0.1)
    temporal = FakeTemporal()
    dc = make_client(temporal, probe_timeout=0.05)
    await asyncio.wait_for(dc.submit([ev("a")]), 5)  # waited for the look, up to its timeout
    monkeypatch.setattr(dispatcher.client, "FIRST_LOOK", 3600.0)  # a second wait would not end
    await asyncio.wait_for(dc.submit([ev("b")]), 5)
    assert temporal.sent() == [["a"], ["b"]] and not dc._rooms[0].looked.is_set()
    await dc.close()


async def test_an_opened_client_looks_at_the_room_before_the_first_event() -> None:
    """The first look came with the first submission, so each shard's first events waited for it:
    a query's round trip, or its timeout when no worker ran the dispatcher."""
    temporal = FakeTemporal()
    dc = make_client(temporal, shards=2)
    dc.open()
    await assert_eventually(
        lambda: all(room.looked.is_set() for room in dc._rooms), timeout=5, interval=0.01, what="the first looks"
    )
    assert temporal.looks == 2 and temporal.sent() == []
    await asyncio.wait_for(dc.submit([ev(f"e{i}") for i in range(8)]), 5)
    assert sorted(i for ids in temporal.sent() for i in ids) == [f"e{i}" for i in range(8)]
    assert not any(room.waited for room in dc._rooms)  # no signal waited for a look
    await dc.close()


async def with_room(
    monkeypatch: pytest.MonkeyPatch, temporal: FakeTemporal, dc: DispatcherClient, first: EventSignal, room: int
) -> None:
    """Send ``first``, let the client look at a dispatcher that can take ``room`` bytes, then stop
    the timed looks: from there on only a wake (a quarter of the answer sent) looks again."""
    monkeypatch.setattr(dispatcher.client, "WATCH_EVERY", 0.01)
    monkeypatch.setattr(dispatcher.client, "WATCH_MOST", 0.01)
    await dc.submit([first])
    temporal.accept[dispatcher_id(PROJECT, 0, 1)] = room
    await assert_eventually(lambda: dc._rooms[0].budget == room, timeout=5, interval=0.01, what="a look")
    monkeypatch.setattr(dispatcher.client, "WATCH_EVERY", 3600.0)
    monkeypatch.setattr(dispatcher.client, "WATCH_MOST", 3600.0)
    looks = temporal.looks
    await assert_eventually(lambda: temporal.looks > looks, timeout=5, interval=0.01, what="the last timed look")


async def queued_behind_a_signal(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[FakeTemporal, DispatcherClient, asyncio.Task[None], list[asyncio.Task[None]], int]:
    """A client whose dispatcher has room for five events of ``one`` bytes, a signal in flight
    (held), and twenty such events submitted behind it: (temporal, client, the signal's submission,
    the twenty, one)."""
    temporal = FakeTemporal()
    one = encoded_size(ev("q00", size=1000).to_dict())
    dc = make_client(temporal)
    await with_room(monkeypatch, temporal, dc, ev("first"), 5 * one)
    temporal.held.add(dispatcher_id(PROJECT, 0, 1))
    slow = asyncio.create_task(dc.submit([ev("slow")]))
    await in_flight(temporal)
    queued = [asyncio.create_task(dc.submit([ev(f"q{i:02}", size=1000)])) for i in range(20)]
    await settle()
    return temporal, dc, slow, queued, one


async def test_what_would_queue_past_the_room_is_refused_at_once_not_after_the_signal_ahead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The room was spent only as signals were held: everything sent while one was in flight
    queued, holding its parsed payload (up to 25 times its text), only to be refused once that
    signal was held. A token's 250 requests of 1 MB queued so took gigabytes."""
    temporal, dc, slow, queued, one = await queued_behind_a_signal(monkeypatch)
    refused = [t for t in queued if t.done() and isinstance(t.exception(), Overloaded)]
    assert len(refused) >= 14 and all(t.done() == (t in refused) for t in queued)  # before the signal ahead was held
    assert dc._rooms[0].queued <= 6 * one
    temporal.held.clear()
    temporal.release.set()
    results = await asyncio.gather(slow, *queued, return_exceptions=True)
    assert sum(r is None for r in results[1:]) == 20 - len(refused)
    assert dc._rooms[0].queued == 0
    await dc.close()


async def test_what_queued_behind_a_signal_in_flight_goes_only_within_the_room(monkeypatch: pytest.MonkeyPatch) -> None:
    """The room was checked as a submission was queued and spent only as signals were held: all
    that queued behind a signal in flight went once it was held, past what the run can carry into
    its next, which then counted the rest failed after the adapters had acknowledged them."""
    temporal, dc, slow, queued, _ = await queued_behind_a_signal(monkeypatch)
    temporal.held.clear()
    temporal.release.set()
    results = await asyncio.gather(slow, *queued, return_exceptions=True)
    assert results[0] is None
    held = [f"q{i:02}" for i, r in enumerate(results[1:]) if r is None]
    refused = [f"q{i:02}" for i, r in enumerate(results[1:]) if isinstance(r, Overloaded)]
    assert sorted(held + refused) == [f"q{i:02}" for i in range(20)]
    sent = [i for ids in temporal.sent()[2:] for i in ids]
    assert sent == held  # each queued event is either sent and held, or refused and not sent
    assert 1 <= len(held) <= 5 and len(refused) >= 15, (held, refused)
    await dc.close()


async def test_what_was_sent_since_the_last_look_counts_against_accept_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between two looks the client spends the last answer by the bytes it sends, so a burst stops
    at the bound without waiting for the next look; and once it sent a quarter of that answer it
    looks again at once (other processes may have sent as much)."""
    temporal = FakeTemporal()
    one = encoded_size(ev("x0", size=100).to_dict())
    dc = make_client(temporal)
    await with_room(monkeypatch, temporal, dc, ev("x0", size=100), 3 * one)
    looks = temporal.looks
    for i in range(1, 4):  # three events of about `one` bytes spend it
        await dc.submit([ev(f"x{i}", size=100)])
        await settle()
    with pytest.raises(Overloaded):
        await dc.submit([ev("x4", size=100)])
    assert temporal.sent() == [["x0"], ["x1"], ["x2"], ["x3"]]
    assert temporal.looks > looks  # woken by what was sent, not by the clock
    await dc.close()


async def test_what_is_sent_while_a_look_is_answered_still_counts_against_its_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A look's answer is the dispatcher's state as its last workflow task left it, which the
    signals sent while the look was answered may not be in. Those still count against the answer:
    forgotten as the look came back, they let a process that sent all along (a slow worker answers
    late) spend the room several times, and the run reached its bounds with more than it could
    carry, counting the rest failed after their 202s."""
    temporal = FakeTemporal()
    wid = dispatcher_id(PROJECT, 0, 1)
    one = encoded_size(ev("x00", size=100).to_dict())
    dc = make_client(temporal)
    await with_room(monkeypatch, temporal, dc, ev("x00", size=100), 20 * one)
    temporal.query_hold = asyncio.Event()
    looks, answered = temporal.looks, temporal.answered
    for i in range(1, 6):  # a quarter of the answer sent: the client looks again, and the look is slow
        await dc.submit([ev(f"x{i:02}", size=100)])
        await settle()
    await assert_eventually(lambda: temporal.looks > looks, timeout=5, interval=0.01, what="a look asked")
    for i in range(6, 9):  # sent while it is answered: the answer will not have them
        await dc.submit([ev(f"x{i:02}", size=100)])
        await settle()
    hold, temporal.query_hold = temporal.query_hold, asyncio.Event()  # the look after it waits
    hold.set()
    await assert_eventually(lambda: temporal.answered > answered, timeout=5, interval=0.01, what="the look answered")
    await settle()
    # What the client believes it may still send, against what the dispatcher can take (the fake
    # takes two bytes more per signal than the client counts: the list's brackets).
    assert dc._rooms[0].budget <= temporal.accept[wid] + 2 * 8, (dc._rooms[0].budget, temporal.accept[wid], one)
    temporal.query_hold.set()
    await dc.close()


async def test_a_dispatcher_with_no_run_yet_takes_what_a_new_run_can_until_it_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No run to ask yet (a project's first events): until the run the first signal begins
    answers, the client sends what a new run can take, judged by its history as for a run whose
    worker does not answer. Taken as unknown (no limit), everything queued went while the new run
    was slow to answer, past its bounds, and what it could not carry was counted failed."""
    monkeypatch.setattr(dispatcher.client, "WATCH_EVERY", 3600.0)
    monkeypatch.setattr(dispatcher.client, "WATCH_MOST", 3600.0)
    await new_run_room_of(monkeypatch, 3, 100)
    temporal = FakeTemporal(absent={dispatcher_id(PROJECT, 0, 1)}, query_hold=asyncio.Event())
    dc = make_client(temporal)
    for i in range(3):
        await dc.submit([ev(f"n{i:02}", size=100)])
        await settle()
    with pytest.raises(Overloaded):
        await dc.submit([ev("n03", size=100)])
    assert temporal.sent() == [["n00"], ["n01"], ["n02"]]
    assert temporal.query_hold is not None
    temporal.query_hold.set()
    await dc.close()


async def test_without_a_worker_to_answer_the_run_s_history_alone_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    """No worker answers the query (none runs, so nothing drains the run): the client judges by the
    run's history, as if all of it had to be started, and refuses well before Temporal's limit."""
    monkeypatch.setattr(dispatcher.client, "WATCH_EVERY", 0.01)
    monkeypatch.setattr(dispatcher.client, "WATCH_MOST", 0.01)
    temporal = FakeTemporal(no_worker=True)
    wid = dispatcher_id(PROJECT, 0, 1)
    temporal.history_bytes[wid] = 1024 * 1024
    dc = make_client(temporal)
    await dc.submit([ev("a")])
    await assert_eventually(lambda: temporal.looks > 0, timeout=5, interval=0.01, what="a look")
    await settle()
    await dc.submit([ev("b")])  # 1 MiB of history: room enough
    temporal.history_bytes[wid] = DRAIN_HISTORY_BYTES - FULL_MARGIN
    looks = temporal.looks
    await assert_eventually(lambda: temporal.looks > looks + 1, timeout=5, interval=0.01, what="more looks")
    with pytest.raises(Overloaded):
        await dc.submit([ev("c")])
    assert temporal.sent() == [["a"], ["b"]]
    await dc.close()


@pytest.mark.parametrize("answered", [True, False], ids=["its-last-state-answers-full", "its-history-is-full"])
async def test_a_full_run_that_closed_takes_events_again_for_the_next_signal_starts_a_new_run(
    monkeypatch: pytest.MonkeyPatch, answered: bool
) -> None:
    """A run Temporal terminated at its history's limit (or an operator did) stays full: a query
    replays its last state, ``accept_bytes: 0``, and its history is as long as it was. Nothing
    drains it, and the next signal-with-start begins a new run: judged by the closed run, every
    event would be refused as overloaded until the process restarted."""
    monkeypatch.setattr(dispatcher.client, "WATCH_EVERY", 0.01)
    monkeypatch.setattr(dispatcher.client, "WATCH_MOST", 0.01)
    temporal = FakeTemporal(no_worker=not answered)
    wid = dispatcher_id(PROJECT, 0, 1)
    temporal.accept[wid] = 0
    temporal.history_bytes[wid] = 50 * 1024 * 1024
    dc = make_client(temporal)
    with pytest.raises(Overloaded):  # full and running: refused, the first signal too
        await dc.submit([ev("a")])
    with pytest.raises(Overloaded):
        await dc.submit([ev("b")])
    temporal.closed.add(wid)
    await assert_eventually(lambda: dc._rooms[0].budget > 0, timeout=5, interval=0.01, what="a look at it closed")
    # No more than the new run may take until it answers itself (unknown, everything queued went):
    # at most what a run can carry before its route table loads.
    assert dc._rooms[0].budget <= MAX_CARRY_BYTES - 4096 - FULL_MARGIN_CARRY
    await dc.submit([ev("c")])  # full and closed: sent, to start a new run
    assert temporal.sent() == [["c"]]
    await dc.close()


async def new_run_room_of(monkeypatch: pytest.MonkeyPatch, events: int, size: int) -> int:
    """Shrink the bounds the client judges an unanswered run by, so that a new run's room is
    ``events`` events of ``size`` bytes of padding; the bytes of one such event."""
    one = encoded_size(ev("x00", size=size).to_dict())
    monkeypatch.setattr(dispatcher.client, "FULL_MARGIN", 0)
    monkeypatch.setattr(dispatcher.client, "DRAIN_HISTORY_BYTES", int(events * one * TAKE_WEIGHT))
    assert dispatcher.client.room_of_a_new_run() == pytest.approx(events * one, abs=TAKE_WEIGHT)
    return one


async def test_a_run_judged_by_its_history_takes_no_more_than_its_room_however_often_it_is_looked_at(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run whose worker does not answer is judged by its history, as if all of it had to be
    started. What this process sent it is in that history once, and its starts will cost the rest:
    counted once, each look gave back five sixths of what was sent since the last, and such a run
    took about six times its room."""
    monkeypatch.setattr(dispatcher.client, "WATCH_EVERY", 0.001)
    monkeypatch.setattr(dispatcher.client, "WATCH_MOST", 0.001)
    one = await new_run_room_of(monkeypatch, 10, 100)
    temporal = FakeTemporal(no_worker=True, grow_history=True)
    temporal.history_bytes[dispatcher_id(PROJECT, 0, 1)] = 0
    dc = make_client(temporal)
    sent = 0
    for i in range(60):
        try:
            await dc.submit([ev(f"x{i:02}", size=100)])
        except Overloaded:
            continue
        sent += 1
        looks = temporal.looks
        await assert_eventually(lambda looks=looks: temporal.looks > looks, timeout=5, interval=0.001, what="a look")
    assert 9 <= sent <= 11, (sent, one)  # ten fit; the last may go over by one event
    await dc.close()


async def sent_until_refused(
    dc: DispatcherClient, temporal: FakeTemporal, count: int, prefix: str = "x", looks: bool = True
) -> int:
    """Submit ``count`` events of 100 bytes of padding one at a time, each taken one followed by a
    look (``looks``; else by the loop settling); how many were taken."""
    sent = 0
    for i in range(count):
        try:
            await dc.submit([ev(f"{prefix}{i:02}", size=100)])
        except Overloaded:
            await settle()
            continue
        sent += 1
        if not looks:
            await settle()
            continue
        seen = temporal.looks
        await assert_eventually(lambda seen=seen: temporal.looks > seen, timeout=5, interval=0.001, what="a look")
    return sent


async def test_a_run_that_stops_answering_takes_no_more_than_its_last_answer_less_what_was_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run answered that it can take little (much queued), then its worker stops answering:
    judged by its history alone (which counts its queued events once, not what starting them will
    cost), it seemed to have room again, and took several times what it had."""
    monkeypatch.setattr(dispatcher.client, "WATCH_EVERY", 0.001)
    monkeypatch.setattr(dispatcher.client, "WATCH_MOST", 0.001)
    one = await new_run_room_of(monkeypatch, 30, 100)
    temporal = FakeTemporal()
    wid = dispatcher_id(PROJECT, 0, 1)
    temporal.history_bytes[wid] = 0
    dc = make_client(temporal)
    await with_room(monkeypatch, temporal, dc, ev("x99", size=100), 3 * one)
    monkeypatch.setattr(dispatcher.client, "WATCH_EVERY", 0.001)
    monkeypatch.setattr(dispatcher.client, "WATCH_MOST", 0.001)
    temporal.no_worker = True
    assert await sent_until_refused(dc, temporal, 20) <= 4  # three fit; the last may go over by one
    await dc.close()


async def test_a_new_run_that_does_not_answer_yet_takes_no_more_than_it_can_carry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first signal began the run, which does not answer yet (its worker is not up): judged by
    its history, it seemed to have far more room than a run can carry before its route table
    loads, which the first look (no run) held it to."""
    monkeypatch.setattr(dispatcher.client, "WATCH_EVERY", 0.001)
    monkeypatch.setattr(dispatcher.client, "WATCH_MOST", 0.001)
    one = await new_run_room_of(monkeypatch, 30, 100)
    monkeypatch.setattr(dispatcher.client, "FULL_MARGIN_CARRY", 0)
    monkeypatch.setattr(dispatcher.client, "MAX_CARRY_BYTES", 4096 + 3 * one)
    temporal = FakeTemporal(absent={dispatcher_id(PROJECT, 0, 1)}, no_worker=True)
    dc = make_client(temporal)
    assert await sent_until_refused(dc, temporal, 20) <= 4
    await dc.close()


async def test_a_run_judged_by_its_history_that_continued_as_new_takes_events_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Judged by its history (its queries time out, while its worker still drains it), a run took
    all it could; once it continued-as-new, what was sent to the run before it counts at most as
    much as its new history holds, and it takes events again. Counted whole for good, nothing was
    taken until a query answered."""
    monkeypatch.setattr(dispatcher.client, "WATCH_EVERY", 0.001)
    monkeypatch.setattr(dispatcher.client, "WATCH_MOST", 0.001)
    await new_run_room_of(monkeypatch, 5, 100)
    temporal = FakeTemporal(no_worker=True, grow_history=True)
    wid = dispatcher_id(PROJECT, 0, 1)
    temporal.history_bytes[wid] = 0
    dc = make_client(temporal)
    assert 4 <= await sent_until_refused(dc, temporal, 20) <= 6
    temporal.run_ids[wid], temporal.history_bytes[wid] = "run-2", 0  # started or carried: a new, empty history
    await assert_eventually(lambda: dc._rooms[0].budget > 0, timeout=5, interval=0.01, what="room again")
    assert await sent_until_refused(dc, temporal, 20, prefix="y") >= 4
    await dc.close()


async def test_a_first_look_slower_than_the_first_signal_waits_leaves_it_a_new_run_s_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first signal waits for the first look only so long; a look slower than that (a full
    run's look may take three RPC timeouts) left the room unknown, and everything queued went."""
    monkeypatch.setattr(dispatcher.client, "FIRST_LOOK", 0.0)
    await new_run_room_of(monkeypatch, 3, 100)
    temporal = FakeTemporal(query_delay=3600.0)
    dc = make_client(temporal, probe_timeout=0.01)
    sent = await sent_until_refused(dc, temporal, 20, looks=False)
    assert 3 <= sent <= 4, sent
    await dc.close()


async def test_a_dispatcher_never_looked_at_takes_what_a_new_run_can_while_temporal_does_not_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Neither the query nor the description answers (Temporal throttles, times out): a room never
    known is a new run's, less what was sent. Unknown (no limit), the first signal carried all that
    queued, and every later one as much as a signal holds."""
    monkeypatch.setattr(dispatcher.client, "WATCH_EVERY", 0.001)
    monkeypatch.setattr(dispatcher.client, "WATCH_MOST", 0.001)
    await new_run_room_of(monkeypatch, 3, 100)
    temporal = FakeTemporal(no_worker=True, describe_error=RPCError("slow", RPCStatusCode.DEADLINE_EXCEEDED, b""))
    dc = make_client(temporal)
    sent = await sent_until_refused(dc, temporal, 20, looks=False)
    assert 3 <= sent <= 4, sent
    await dc.close()


async def test_a_dispatcher_whose_workflow_tasks_keep_failing_is_reported_once_and_its_recovery_too(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A dispatcher whose replay fails (a nondeterminism error) answers no query and starts nothing,
    while its events still arrive: the watcher describes it, shows it in
    ``signal_bridge_dispatcher_tasks_failing``, and logs one ERROR while it stays so, then one INFO
    when the query is answered again."""
    caplog.set_level(logging.INFO, logger="dispatcher.client")
    monkeypatch.setattr(dispatcher.client, "WATCH_EVERY", 0.01)
    monkeypatch.setattr(dispatcher.client, "WATCH_MOST", 0.01)
    temporal = FakeTemporal(no_worker=True)
    wid = dispatcher_id(PROJECT, 0, 1)
    temporal.task_attempt[wid] = 2  # a task in flight, on its second attempt: a worker restarted
    metrics = Metrics()
    dc = make_client(temporal, metrics=metrics)

    def failing() -> float | None:
        return metrics.registry.get_sample_value("signal_bridge_dispatcher_tasks_failing", {"dispatcher": wid})

    await dc.submit([ev("a")])
    await assert_eventually(lambda: temporal.looks > 2, timeout=5, interval=0.01, what="looks")
    assert failing() == 0 and not [r for r in caplog.records if r.levelname == "ERROR"]
    temporal.problems[wid] = [
        "category=WorkflowTaskFailed",
        "cause=WorkflowTaskFailedCauseWorkflowWorkerUnhandledFailure",
    ]
    temporal.task_attempt[wid] = 1  # each signal begins a new task
    await dc.submit([ev("b")])  # taken: it waits in the run's history
    await assert_eventually(lambda: failing() == 1, timeout=5, interval=0.01, what="the problem seen")
    looks = temporal.looks
    await dc.submit([ev("c")])
    await assert_eventually(lambda: temporal.looks > looks + 2, timeout=5, interval=0.01, what="more looks")
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "fails its workflow tasks" in errors[0] and wid in errors[0]
    del temporal.problems[wid]  # a server that reports none: the attempts alone, 1 with each signal
    looks = temporal.looks
    await dc.submit([ev("c2")])
    await assert_eventually(lambda: temporal.looks > looks + 2, timeout=5, interval=0.01, what="looks after")
    assert failing() == 1, "cleared with no answer to the query"
    assert not [r for r in caplog.records if "runs its workflow tasks again" in r.getMessage()]
    temporal.no_worker = False  # reset, it answers again
    await dc.submit([ev("d")])
    await assert_eventually(lambda: failing() == 0, timeout=5, interval=0.01, what="the answer seen")
    assert any("runs its workflow tasks again" in r.getMessage() for r in caplog.records if r.levelname == "INFO")
    assert temporal.sent() == [["a"], ["b"], ["c"], ["c2"], ["d"]]
    await dc.close()


async def test_a_failing_dispatcher_is_looked_at_while_nothing_is_sent_so_its_mending_is_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once events stop, the watcher looks no more (WATCH_IDLE) unless the dispatcher was failing:
    then the gauge would say so for ever after a reset mended it."""
    monkeypatch.setattr(dispatcher.client, "WATCH_EVERY", 0.01)
    monkeypatch.setattr(dispatcher.client, "WATCH_MOST", 0.01)
    monkeypatch.setattr(dispatcher.client, "WATCH_IDLE", 0.05)
    temporal = FakeTemporal(no_worker=True)
    wid = dispatcher_id(PROJECT, 0, 1)
    temporal.problems[wid] = ["category=WorkflowTaskFailed"]
    metrics = Metrics()
    dc = make_client(temporal, metrics=metrics)

    def failing() -> float | None:
        return metrics.registry.get_sample_value("signal_bridge_dispatcher_tasks_failing", {"dispatcher": wid})

    await dc.submit([ev("a")])
    await assert_eventually(lambda: failing() == 1, timeout=5, interval=0.01, what="the problem seen")
    await asyncio.sleep(0.2)  # idle: nothing sent since
    temporal.no_worker = False
    await assert_eventually(lambda: failing() == 0, timeout=5, interval=0.01, what="the mending seen")
    await dc.close()


def test_a_paused_run_is_open_and_a_terminated_one_closed() -> None:
    """A paused dispatcher still takes the signals sent to it: judged closed, its full history
    would be sent more until Temporal terminated it at its limit."""
    described = DescribeWorkflowExecutionResponse()
    for status, is_closed in (
        (WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING, False),
        (WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_PAUSED, False),
        (WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_UNSPECIFIED, False),
        (WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_TERMINATED, True),
        (WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_COMPLETED, True),
    ):
        described.workflow_execution_info.status = status
        assert dispatcher.client.closed(described) is is_closed, status


def test_a_run_whose_pending_task_is_on_its_third_attempt_fails_its_tasks_without_a_reported_problem() -> None:
    """A server that reports no problems: the pending task's attempt tells (FAILING_ATTEMPTS)."""
    described = DescribeWorkflowExecutionResponse()
    assert not dispatcher.client.tasks_failing(described)
    described.pending_workflow_task.attempt = dispatcher.client.FAILING_ATTEMPTS - 1
    assert not dispatcher.client.tasks_failing(described)
    described.pending_workflow_task.attempt = dispatcher.client.FAILING_ATTEMPTS
    assert dispatcher.client.tasks_failing(described)


def test_a_dispatcher_far_from_full_is_looked_at_seldom_and_one_near_it_often() -> None:
    """The next look comes before a quarter of the budget is spent at the rate sent lately, within
    WATCH_EVERY and WATCH_MOST: a steady load far from the bound costs a query every WATCH_MOST s."""
    assert next_look(5_000_000, 20_000) == WATCH_MOST  # a half load: 62 s to a quarter
    assert next_look(5_000_000, 0) == WATCH_MOST
    assert next_look(math.inf, 20_000) == WATCH_MOST  # a dispatcher that does not say
    assert next_look(2_000_000, 2_000_000) == WATCH_EVERY  # a burst: a quarter in 0.25 s
    assert next_look(4_000_000, 500_000) == 2.0


# --- a dispatcher continuing-as-new ------------------------------------------------------------


def busy_error(message: str = "workflow operation can not be applied because workflow is closing") -> RPCError:
    """Temporal's refusal of a signal while the dispatcher's continue-as-new is being retried."""
    cause = ResourceExhaustedCause.RESOURCE_EXHAUSTED_CAUSE_BUSY_WORKFLOW
    return _rpc_error(RPCStatusCode.RESOURCE_EXHAUSTED, message, ResourceExhaustedFailure(cause=cause))


def test_busy_is_the_refusal_of_a_closing_workflow_only() -> None:
    assert busy(busy_error())
    assert busy(
        RPCError(
            "workflow operation can not be applied because workflow is closing", RPCStatusCode.RESOURCE_EXHAUSTED, b""
        )
    )
    rps = ResourceExhaustedFailure(cause=ResourceExhaustedCause.RESOURCE_EXHAUSTED_CAUSE_RPS_LIMIT)
    assert not busy(_rpc_error(RPCStatusCode.RESOURCE_EXHAUSTED, "namespace rps limit", rps))
    assert not busy(RPCError("namespace rps limit", RPCStatusCode.RESOURCE_EXHAUSTED, b""))
    assert not busy(_rpc_error(RPCStatusCode.UNAVAILABLE, "workflow is closing"))
    assert not busy(RuntimeError("workflow is closing"))


async def test_a_busy_refusal_is_sent_again_at_once_with_the_same_request_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not after the SDK's pause for RESOURCE_EXHAUSTED (a second, then two): the same request
    (Temporal applies a request id once), after a short pause of the client's own, counted."""
    monkeypatch.setattr(dispatcher.client, "BUSY_PAUSE", 0.001)
    temporal = FakeTemporal(errors={0: busy_error(), 1: busy_error()})
    metrics = Metrics()
    client = make_client(temporal, metrics=metrics)
    await client.submit([ev("a")])
    assert temporal.sent() == [["a"], ["a"], ["a"]]
    assert len({c.options["request_id"] for c in temporal.calls}) == 1
    assert all(c.options["retry"] is False for c in temporal.calls) and temporal.sdk_retried == []
    assert metrics.registry.get_sample_value("signal_bridge_signals_busy_total") == 2
    assert metrics.registry.get_sample_value("signal_bridge_signals_sent_total") == 1
    await client.submit([ev("b")])  # a new signal is a new request
    assert temporal.calls[-1].options["request_id"] != temporal.calls[0].options["request_id"]
    await client.close()


async def test_a_lasting_busy_refusal_ends_with_the_sdk_s_retries_and_then_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dispatcher.client, "BUSY_PAUSE", 0.001)
    monkeypatch.setattr(dispatcher.client, "BUSY_MAX_PAUSE", 0.005)
    temporal = FakeTemporal(errors={n: busy_error() for n in range(10_000)})
    client = make_client(temporal, rpc_timeout=0.1)
    with pytest.raises(Unavailable):
        await client.submit([ev("a")])
    assert len(temporal.calls) >= 2
    assert temporal.sdk_retried == [len(temporal.calls) - 1]  # the last attempt, with the SDK's retries
    await client.close()


@pytest.mark.parametrize("turns", range(4))
async def test_close_right_after_a_send_that_woke_the_watcher_ends(monkeypatch: pytest.MonkeyPatch, turns: int) -> None:
    """A send that spent a quarter of the last answer wakes the shard's watcher; a close() just then
    cancels a watcher whose wait has its result. With asyncio.wait_for (Python 3.11) that
    cancellation was lost, the watcher looped on and close() waited for it forever."""
    monkeypatch.setattr(dispatcher.client, "WATCH_EVERY", 0.01)
    monkeypatch.setattr(dispatcher.client, "WATCH_MOST", 0.01)
    temporal = FakeTemporal()
    wid = dispatcher_id(PROJECT, 0, 1)
    dc = make_client(temporal)
    await dc.submit([ev("x0")])
    temporal.accept[wid] = 1  # one byte: the next send spends more than a quarter of it
    await assert_eventually(lambda: temporal.looks > 0, timeout=5, interval=0.01, what="a look")
    monkeypatch.setattr(dispatcher.client, "WATCH_EVERY", 3600.0)  # from here on only a wake looks
    monkeypatch.setattr(dispatcher.client, "WATCH_MOST", 3600.0)
    looks = temporal.looks
    await assert_eventually(lambda: temporal.looks > looks, timeout=5, interval=0.01, what="the last timed look")

    async def send_and_close() -> None:
        await dc.submit([ev("x1")])  # sends more than a quarter of one byte: wakes the watcher
        for _ in range(turns):
            await asyncio.sleep(0)
        await dc.close()  # in the same step as the submit's answer when turns is 0, as a caller does

    closing = asyncio.create_task(send_and_close())
    done, _ = await asyncio.wait({closing}, timeout=2)
    if not done:  # the watcher runs on: end it for the next test
        for task in asyncio.all_tasks():
            if task.get_name().startswith("dispatcher-watcher"):
                task.cancel()
        await asyncio.wait({closing}, timeout=2)
    assert done, "close() did not end"
    closing.result()


async def test_an_event_a_client_waits_for_holds_the_window_from_when_it_is_given() -> None:
    """Not from when its signal is answered: until then the starts would go on at the open limit,
    queued ahead of the signal the client waits for."""
    temporal = FakeTemporal()
    dc = make_client(temporal)
    temporal.held.add(dispatcher_id(PROJECT, 0, 1))
    assert not dc.handover.awaited()
    kafka = asyncio.create_task(dc.submit([EventSignal(id="k", name="a", payload={}, source="kafka:t")]))
    await in_flight(temporal)
    assert not dc.handover.awaited(), "a broker's events wait for nobody"
    http = asyncio.create_task(dc.submit([ev("h")]))
    await asyncio.sleep(0)
    assert dc.handover.awaited(), "held while the signal is still to come"
    open_gate(temporal)
    await asyncio.gather(kafka, http)
    await dc.close()
