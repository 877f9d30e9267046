"""The dispatcher's client: signal-with-start to ``dispatcher-{slug}[-k]``, sharded and coalesced.

Concurrent submissions for one shard are coalesced: while one signal is in flight, the next
submissions queue up and leave together as one signal carrying a list of events (at most
MAX_SIGNAL_EVENTS events and MAX_SIGNAL_BYTES, see :mod:`dispatcher.contract`). One signal in
flight per shard keeps per-key order (a key always maps to the same shard) and turns a burst of
N requests into a handful of signals, which is what keeps the dispatcher's lock cool. Sharding and
what the metrics mean are described in docs/operations.md.

An outage is answered quickly. A signal that fails, or stays in flight for longer than
``suspect_after`` seconds, makes the client ask Temporal for its system info (no retries, a short
deadline). If that fails too, Temporal is *down*: every submission waiting for that shard,
the one in flight included, is answered Unavailable at once, and so is every new one, until a
background probe gets an answer. A submission is never queued behind a call that is likely
doomed. Answering Unavailable for a signal that may still arrive is safe: nothing was
acknowledged, and the retry carries the same event id, which the dispatcher dedupes.

A dispatcher that continues-as-new while signals keep coming has its last workflow task failed by
Temporal once (a signal overtook it), and until the task that follows, a replay of the run's whole
history, completes, Temporal refuses every signal to it (``RESOURCE_EXHAUSTED``, cause
``BUSY_WORKFLOW``). The SDK's client waits one second before the first retry of that answer and two
before the next, so the signal would wait up to three seconds for a replay of one. The signal is
sent with the SDK's retries off and sent again after BUSY_PAUSE seconds (doubling up to
BUSY_MAX_PAUSE) for as long as that answer comes; any other answer that the SDK retries gets its
retries, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from opentelemetry.context import Context
from temporalio.api.common.v1 import Header, Payload, Payloads, WorkflowType
from temporalio.api.enums.v1 import ResourceExhaustedCause, WorkflowExecutionStatus
from temporalio.api.errordetails.v1 import ResourceExhaustedFailure
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import (
    DescribeWorkflowExecutionResponse,
    GetSystemInfoRequest,
    SignalWithStartWorkflowExecutionRequest,
)
from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode

from bridge.aio import within
from bridge.config import BridgeConfig
from bridge.errors import EventRejected, Overloaded, PartlyHeld, PartlyRefused, Unavailable
from bridge.event import MAX_EVENT_BYTES, EventSignal, encode
from bridge.metrics import Metrics
from dispatcher import told
from dispatcher.contract import (
    CARRY_RESERVE,
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
    DispatcherStats,
    dispatcher_id,
)
from dispatcher.slots import Handover
from dispatcher.spans import client_span, tracing_interceptor
from dispatcher.spans import current as current_trace

log = logging.getLogger(__name__)

AWAITED = frozenset({"http", "webhook"})
"""Adapters (an event's ``source`` up to its colon) whose client waits for the event's hand-over:
an HTTP ``202``. A Kafka or RabbitMQ publisher has its acknowledgement from the broker, so only
these events count toward the hand-over's pressure (:class:`dispatcher.slots.Handover`)."""
BUSY_PAUSE = 0.02
"""Seconds before a signal refused as busy (see the module's text) is sent again; doubled each time."""
BUSY_MAX_PAUSE = 0.2
"""The longest pause between two of those: a replay of a dispatcher's run takes about a second."""
RETRIED_BY_SDK = frozenset(
    {
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
        RPCStatusCode.RESOURCE_EXHAUSTED,
        RPCStatusCode.ABORTED,
        RPCStatusCode.INTERNAL,
        RPCStatusCode.UNKNOWN,
        RPCStatusCode.CANCELLED,
    }
)
"""The answers a call is sent again for with the SDK's retries on (its client's retry policy)."""


def shard_of(event: EventSignal, shards: int) -> int:
    """The event's shard: a hash of its ordering key (or its id), the same in every process."""
    if shards == 1:
        return 0
    key = event.key if event.key is not None else event.id
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % shards


def busy(exc: BaseException) -> bool:
    """Whether ``exc`` is Temporal's refusal of a signal to a workflow that is closing: its
    continue-as-new was overtaken by a signal, and the task after it has not completed yet."""
    if not isinstance(exc, RPCError) or exc.status != RPCStatusCode.RESOURCE_EXHAUSTED:
        return False
    for detail in exc.grpc_status.details:
        failure = ResourceExhaustedFailure()
        if detail.Unpack(failure):
            return failure.cause == ResourceExhaustedCause.RESOURCE_EXHAUSTED_CAUSE_BUSY_WORKFLOW
    return "closing" in exc.message


def not_ready(exc: BaseException) -> bool:
    """Whether ``exc`` is Temporal's "workflow not ready" answer to a query: the workflow's task
    is being retried (a continue-as-new that a signal overtook fails its task once, on purpose),
    so the query has nothing to run on for a moment."""
    if not isinstance(exc, RPCError) or exc.status != RPCStatusCode.FAILED_PRECONDITION:
        return False
    details = exc.grpc_status.details
    return any(d.type_url.endswith("WorkflowNotReadyFailure") for d in details) or "failed state" in exc.message


async def query_stats(
    handle: WorkflowHandle[Any, Any], *, patience: float = 10.0, rpc_timeout: timedelta | None = None
) -> DispatcherStats:
    """The dispatcher's STATS_QUERY, asked again for up to ``patience`` seconds while Temporal
    answers that the workflow is not ready (see :func:`not_ready`); any other error is raised."""
    deadline = time.monotonic() + patience
    pause = 0.1
    while True:
        try:
            stats: DispatcherStats = await handle.query(STATS_QUERY, rpc_timeout=rpc_timeout)
            return stats
        except RPCError as exc:
            if not not_ready(exc) or time.monotonic() + pause > deadline:
                raise
        await asyncio.sleep(pause)
        pause = min(pause * 2, 1.0)


JSON_PLAIN = {"encoding": b"json/plain"}
"""The metadata of the signal's payload: what the SDK's JSON converter writes, and decodes."""


FAILING_ATTEMPTS = 3
"""The attempt of a dispatcher's pending workflow task from which the watcher reports its workflow
tasks as failing: Temporal retries a failed one at once, and a second attempt happens when a worker
restarts mid-task. Each signal begins a new task at attempt 1, so a dispatcher still receiving
events is known by the problem Temporal reports on it instead (REPORTED_TASK_FAILURE)."""
REPORTED_TASK_FAILURE = b"category=WorkflowTaskFailed"
"""In the ``TemporalReportedProblems`` search attribute (a JSON list) of a run whose workflow tasks
fail, on the Temporal servers that report it."""


CLOSED_STATUSES = (
    WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_COMPLETED,
    WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_FAILED,
    WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_CANCELED,
    WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_TERMINATED,
    WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_CONTINUED_AS_NEW,
    WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_TIMED_OUT,
)
"""Listed, not "not running": a paused run (and a status a later server adds) is open, and takes
the signals sent to it."""


def closed(described: DescribeWorkflowExecutionResponse) -> bool:
    """Whether the described run has closed: terminated at its history's limit or by an operator.
    Nothing drains it then, and the next signal-with-start begins a new run with room for events."""
    return described.workflow_execution_info.status in CLOSED_STATUSES


def tasks_failing(described: DescribeWorkflowExecutionResponse) -> bool:
    """Whether a described run's workflow tasks keep failing (FAILING_ATTEMPTS, REPORTED_TASK_FAILURE)."""
    problems = described.workflow_execution_info.search_attributes.indexed_fields.get("TemporalReportedProblems")
    if problems is not None and REPORTED_TASK_FAILURE in problems.data:
        return True
    return described.HasField("pending_workflow_task") and described.pending_workflow_task.attempt >= FAILING_ATTEMPTS


WATCH_EVERY = 0.5
"""Seconds between looks at a dispatcher's ``accept_bytes`` while events are sent to it, at the
most often: while it takes nothing, or what is sent would spend its answer within four of them."""
WATCH_MOST = 5.0
"""Seconds between looks at the least often: what this process sends spends the budget itself
between looks, so a steady load far from the bound needs few (each is a query its worker answers)."""
WATCH_IDLE = 5.0
"""Seconds after the last signal to a dispatcher from which it is no longer looked at (unless it
takes nothing: then it is looked at until it does)."""


def next_look(budget: float, rate: float) -> float:
    """Seconds to the next look at a dispatcher that may take ``budget`` more bytes, while this
    process sends it ``rate`` bytes a second: before a quarter of the budget is spent (other
    processes may send as much), within WATCH_EVERY and WATCH_MOST. A process that sends a quarter
    of the last answer sooner (a burst after a quiet time) looks again at once."""
    if rate <= 0:
        return WATCH_MOST
    return min(WATCH_MOST, max(WATCH_EVERY, budget / rate / 4))


def room_by_history(history: int, unanswered: int) -> float:
    """What a run whose worker does not answer may take, judged by its history alone, as if all of
    it had to be started: nothing drains such a run, and one Temporal terminates at its history's
    limit loses all it holds. ``unanswered``: the bytes this process sent it since it last answered
    (or began); they are in its history once, and their starts will cost TAKE_WEIGHT - 1 times
    more. Without them each look gave back five sixths of what was sent since the last, and a run
    whose worker was slow to answer took about six times its room."""
    return max(0.0, (DRAIN_HISTORY_BYTES - FULL_MARGIN - history - (TAKE_WEIGHT - 1) * unanswered) / TAKE_WEIGHT)


def room_of_a_new_run() -> float:
    """What the run the next signal begins may take (a dispatcher with no run yet, or whose run
    closed), until it answers itself: what an empty history may take, and no more than it could
    carry into its next run before its route table loads (the run's own answer is held to that
    meanwhile). Unknown (no limit), everything queued went while the new run was slow to answer,
    past its bounds, and the events it could not carry were counted failed after their 202s. At
    least one byte: the first signal, which begins the run, goes."""
    carry = MAX_CARRY_BYTES - CARRY_RESERVE - FULL_MARGIN_CARRY  # as the run's _carry_room, with no recent ids
    return max(1.0, min(room_by_history(0, 0), carry))


FIRST_LOOK = 0.5
"""Seconds beyond the look's own RPC timeouts that the first signal waits for the first look."""


@dataclass
class _Room:
    """What a dispatcher may still take (bytes of events): its last ``accept_bytes``, less what was
    sent since; unknown (inf) until the first look."""

    budget: float = math.inf
    sent_at: float = -math.inf  # time.monotonic() of the last signal to it
    sent: int = 0  # bytes sent since the last look
    looked_at: float = -math.inf  # time.monotonic() of the last look
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # a quarter of it was sent: look again
    full: bool = False  # as last logged
    # The first look was tried (answered or not): the first signal waits for it, up to FIRST_LOOK s.
    # Sent at once, it carried all that queued before, however little room a restarted process's
    # dispatcher had left.
    looked: asyncio.Event = field(default_factory=asyncio.Event)
    waited: bool = False  # the first signal waited for it (or its timeout): no other signal waits
    queued: int = 0  # bytes of the submissions queued (or carried) for it, not taken into a signal yet
    unanswered: int = 0  # bytes sent since the run last answered (or was found new): see room_by_history
    judged: str = ""  # the run the last look judged by its history (none: that look was answered)

    @property
    def answer(self) -> float:
        """The last look's ``accept_bytes``: the budget before what was sent since."""
        return self.budget + self.sent

    def unknown_as_new(self) -> None:
        """A room never known (no look answered yet) is a new run's, less what was sent already."""
        if not math.isfinite(self.budget):
            self.budget = room_of_a_new_run() - self.sent


@dataclass
class _Look:
    """What one look at a dispatcher found."""

    budget: float  # bytes of events its run may take
    failing: bool = False  # its workflow tasks fail (judged by its description)
    answered: bool = True  # by the run's own state (or that there is no run), not by its history
    rotated: bool = False  # judged by its history, of a run that continued-as-new since the last look


@dataclass
class _Submission:
    events: list[bytes]  # each event encoded (bridge.event.encode)
    size: int
    awaited: int = 0  # of them, events a client waits for (see AWAITED)
    indices: list[int] = field(default_factory=list)  # of its events in the submission
    trace: Context | None = None  # the submitter's trace context, when tracing is on
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    # The submission of the same call and shard queued just before it: when that one failed, this
    # one is not sent (_live), so a call's events are held in their order or not.
    before: _Submission | None = None

    def failed_before(self) -> BaseException | None:
        """Why the submission before it failed, if it did (answered failed, not cancelled)."""
        before = self.before
        if before is None or not before.done.done() or before.done.cancelled():
            return None
        return before.done.exception()


class DispatcherClient:
    """Sends events to ``dispatcher-{slug}[-k]`` with signal-with-start; returns once held."""

    def __init__(
        self,
        client: Client,
        config: BridgeConfig,
        metrics: Metrics | None = None,
        *,
        rpc_timeout: float = 10.0,
        retry_after: float | Callable[[], float] | None = None,
        suspect_after: float = 1.0,
        probe_timeout: float = 1.0,
        probe_interval: float = 1.0,
        handover_target: Callable[[], float | None] | None = None,
    ) -> None:
        """``retry_after`` (seconds, or a callable read at each refusal) defaults to the config's
        ``http.retry_after_seconds``, and ``handover_target`` (seconds per signal, None for
        relative to the fastest recent signal) to its ``dispatcher.handover_target_ms``; the
        runtime passes callables that follow reloads."""
        self.client = client
        self.project = config.project
        self.task_queue = config.task_queue
        self.shards = config.dispatcher.shards
        self._ids = [dispatcher_id(self.project, k, self.shards) for k in range(self.shards)]
        self.metrics = metrics or Metrics()
        self.rpc_timeout = timedelta(seconds=rpc_timeout)
        self._retry_after = config.http.retry_after_seconds if retry_after is None else retry_after
        self.suspect_after = suspect_after
        self.probe_timeout = timedelta(seconds=probe_timeout)
        self.probe_interval = probe_interval
        self._queues: list[asyncio.Queue[_Submission]] = []
        self._senders: list[asyncio.Task[None]] = []
        self._watchers: list[asyncio.Task[None]] = []  # one per shard: _watch
        self._rooms: list[_Room] = []
        self._carry: list[_Submission | None] = []
        self._down_since: float | None = None
        self._closing = False  # close() is waiting for the queues: submissions are refused
        self._prober: asyncio.Task[None] | None = None
        self._stray: set[asyncio.Task[None]] = set()  # calls given up on, left to finish
        self._sending = 0  # signals in flight, given-up ones included (Temporal still works on them)
        self._inputs: dict[int, Payloads] = {}  # each shard's DispatcherInput, encoded once
        self._tracing = tracing_interceptor(client) if config.tracing.enabled else None
        target = handover_seconds(config)
        # How fast this process hands events over, for the starts of a worker in the same process.
        self.handover = Handover(handover_target or (lambda: target), self.receiving)

    @property
    def retry_after(self) -> float:
        return self._retry_after() if callable(self._retry_after) else self._retry_after

    @property
    def down(self) -> bool:
        """True while Temporal is known to be unreachable (a probe failed, none answered since)."""
        return self._down_since is not None

    def receiving(self) -> bool:
        """Whether events are on the way to a dispatcher: a signal in flight, or submissions queued."""
        return self._sending > 0 or any(not q.empty() for q in self._queues)

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def handle(self, shard: int = 0) -> WorkflowHandle[Any, Any]:
        return self.client.get_workflow_handle(self._ids[shard])

    async def submit(self, events: Sequence[EventSignal]) -> None:
        """Return once Temporal holds every event; raise Unavailable or EventRejected otherwise.

        Nothing is sent when one event is too large on its own. Events are split by shard (and at
        the signal limits) into submissions that the shards' senders coalesce with others.
        """
        self._refuse_if_down()
        await self.submit_encoded(events, [encode(event.to_dict()) for event in events])

    async def submit_encoded(self, events: Sequence[EventSignal], encoded: Sequence[bytes]) -> None:
        """:meth:`submit`, with ``encoded[i]`` the :func:`bridge.event.encode` of ``events[i]``
        (the pipeline's size check made it): each event is encoded once, and the signal carries
        these bytes as they are."""
        self._refuse_if_down()
        placed: list[tuple[int, bytes, bool]] = []
        need: Counter[int] = Counter()  # bytes by shard
        for event, item in zip(events, encoded, strict=True):
            if len(item) > MAX_EVENT_BYTES:
                raise EventRejected(
                    "too_large", f"event {event.id!r} of {len(item)} bytes exceeds the {MAX_EVENT_BYTES}-byte limit"
                )
            shard = shard_of(event, self.shards)
            placed.append((shard, item, event.source.split(":", 1)[0] in AWAITED))
            need[shard] += len(item)
        if any(awaited for _, _, awaited in placed):
            self.handover.waiting()
        if not self._senders:
            self._start_senders()
        for shard, size in need.items():
            self._refuse_if_full(shard, size)
        subs: list[_Submission] = []
        open_: dict[int, _Submission] = {}
        for index, (shard, item, awaited) in enumerate(placed):
            sub = open_.get(shard)
            if sub is None or sub.size + len(item) > MAX_SIGNAL_BYTES or len(sub.events) >= MAX_SIGNAL_EVENTS:
                trace = current_trace() if self._tracing else None
                sub = open_[shard] = _Submission([], 0, trace=trace, before=sub)
                subs.append(sub)
                self._queues[shard].put_nowait(sub)
            sub.events.append(item)
            sub.indices.append(index)
            sub.size += len(item)
            sub.awaited += awaited
        for shard, size in need.items():
            self._rooms[shard].queued += size
        if len(subs) == 1:  # the usual case; gather costs as much as the rest of this call
            await subs[0].done
            return
        results = await asyncio.gather(*(s.done for s in subs), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if not failed:
            return
        first = next((f for f in failed if not isinstance(f, Unavailable)), failed[0])
        held = frozenset(i for sub, r in zip(subs, results, strict=True) if r is None for i in sub.indices)
        if isinstance(first, EventRejected) and (held or len(subs) > 1):
            # A signal of this call's was too large for the server: refused whole, the held events
            # were answered refused, and a client resending them in smaller requests started them
            # again. An event is too large itself only when its signal carried it alone, and the
            # submissions after a failed one were not sent at all (_live): those may go again,
            # also when none was held.
            refused = {
                sub.indices[0]: r
                for sub, r in zip(subs, results, strict=True)
                if isinstance(r, EventRejected) and len(sub.indices) == 1 and r is not sub.failed_before()
            }
            raise PartlyRefused(
                f"{len(held)} of {len(events)} events held, the rest not: {first}", held, refused
            ) from first
        if not held or not isinstance(first, Unavailable):
            raise first
        raise PartlyHeld(
            f"{len(held)} of {len(events)} events held, the rest not: {first}", held, first.retry_after
        ) from first

    async def ensure_started(self) -> None:
        """Start every shard's dispatcher if it is not running (seed Step 4)."""
        for shard, wid in enumerate(self.ids):
            try:
                await self._start(shard)
            except RPCError as exc:
                raise self._unavailable(f"cannot start dispatcher {wid}: {exc}") from exc

    def open(self) -> None:
        """Start the shards' senders, and with them the first look at each dispatcher's room:
        started by the first submission instead, they made each shard's first events wait for
        that look (a query's round trip, or its timeout when no worker runs the dispatcher)."""
        if not self._senders:
            self._start_senders()

    async def reload(self) -> None:
        """Tell every shard's dispatcher to load its routes again, all of them whatever one
        answers. A shard with no open run (terminated, or never started) is told by its next run,
        which loads the routes as they are then. Any other failure is raised once every shard was
        tried: one closed shard left the shards after it on the old routes until they continued
        as new, and the watcher retrying it for good."""
        results = await asyncio.gather(
            *(self.handle(shard).signal(RELOAD_SIGNAL) for shard in range(self.shards)), return_exceptions=True
        )
        failed = [
            (shard, exc)
            for shard, exc in enumerate(results)
            if isinstance(exc, BaseException)
            and not (isinstance(exc, RPCError) and exc.status == RPCStatusCode.NOT_FOUND)
        ]
        if failed:
            shards = ", ".join(str(shard) for shard, _ in failed)
            log.warning("dispatcher reload: shard(s) %s not told: %s", shards, failed[0][1])
            raise failed[0][1]

    async def stats(self) -> list[DispatcherStats]:
        return [await query_stats(self.handle(k)) for k in range(self.shards)]

    async def ping(self, timeout: timedelta = timedelta(seconds=2)) -> bool:
        try:
            await self.client.workflow_service.get_system_info(GetSystemInfoRequest(), timeout=timeout)
        except Exception:
            return False
        return True

    async def close(self) -> None:
        """Stop the senders once their queues are empty; pending submissions finish first, and one
        that arrives while it stops is refused (Unavailable), never left unanswered."""
        self._closing = True
        try:
            for q in self._queues:
                await q.join()
            for task in [*self._senders, *self._watchers, *([self._prober] if self._prober else [])]:
                task.cancel()
            await asyncio.gather(*self._senders, *self._watchers, *self._stray, return_exceptions=True)
        finally:
            self._closing = False
        left = [sub for sub in self._carry if sub is not None]
        for q in self._queues:
            while not q.empty():
                left.append(q.get_nowait())
        _answer(left, self._unavailable("the dispatcher client stopped"))
        if self._prober is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
            self._prober = None
        self._senders.clear()
        self._watchers.clear()
        self._queues.clear()
        self._carry.clear()

    def _unavailable(self, message: str) -> Unavailable:
        return Unavailable(message, self.retry_after)

    def _refuse_if_down(self) -> None:
        if self._closing:
            raise self._unavailable("the bridge is stopping")
        if self._down_since is not None:
            down_for = time.monotonic() - self._down_since
            raise self._unavailable(f"Temporal has been unreachable for {down_for:.0f} s (a probe is watching)")

    async def _check(self) -> None:
        """Probe Temporal once; when it does not answer, mark it down and start the prober."""
        if self._down_since is not None or await self.ping(self.probe_timeout):
            return
        if self._down_since is None:  # another shard's check may have got there first
            self._down_since = time.monotonic()
            log.warning("Temporal does not answer: refusing submissions until it does")
            self._prober = asyncio.create_task(self._probe(), name="dispatcher-probe")

    async def _probe(self) -> None:
        """Ask Temporal every ``probe_interval`` seconds until it answers, then take events again."""
        while True:
            await asyncio.sleep(self.probe_interval)
            if await self.ping(self.probe_timeout):
                assert self._down_since is not None
                log.info("Temporal answers again after %.1f s: taking events", time.monotonic() - self._down_since)
                self._down_since = None
                self._prober = None
                return

    def _start_senders(self) -> None:
        self._queues = [asyncio.Queue() for _ in range(self.shards)]
        self._carry = [None] * self.shards
        self._rooms = [_Room() for _ in range(self.shards)]
        # In a context of their own: started by the first submission, they would otherwise keep
        # its trace context for ever, and make every later signal's span a child of its request.
        self._senders = [
            asyncio.create_task(self._sender(k), name=f"dispatcher-sender-{k}", context=contextvars.Context())
            for k in range(self.shards)
        ]
        self._watchers = [
            asyncio.create_task(self._watch(k), name=f"dispatcher-watcher-{k}", context=contextvars.Context())
            for k in range(self.shards)
        ]

    def _refuse_if_full(self, shard: int, size: int = 0) -> None:
        """Overloaded when the dispatcher has no room left, or what is queued for it already takes
        the room and ``size`` more bytes would not fit. The room was spent only as signals were
        held: everything that came while one was in flight queued, and waited (its payload parsed
        in memory: up to 25 times its text) only to be refused once the signal was held."""
        room = self._rooms[shard]
        if room.budget <= 0 or (room.queued and room.queued + size > room.budget):
            raise self._full(shard)

    def _full(self, shard: int) -> Overloaded:
        return Overloaded(
            f"dispatcher {self._ids[shard]} holds as many events as it can start before it must "
            "continue-as-new; it takes more as its backlog starts",
            self.retry_after,
        )

    async def _watch(self, shard: int) -> None:
        """Keep the shard's ``accept_bytes`` (its STATS_QUERY) up to date while events are sent to
        it, or while it takes none: every WATCH_EVERY to WATCH_MOST s, each look's answer less what was
        sent since.
        Without an answer (no worker runs it), judge by the run's history alone, as if it had to
        start all of it (TAKE_WEIGHT): nothing drains it then, and a run Temporal terminates at its
        history's limit would lose all it holds."""
        room = self._rooms[shard]
        handle = self.handle(shard)
        gauge = self.metrics.child(self.metrics.dispatcher_accept_bytes, self._ids[shard])
        failing_gauge = self.metrics.child(self.metrics.dispatcher_tasks_failing, self._ids[shard])
        failing = False
        delay = 0.0  # the first look at once: the first signal waits for it
        while True:
            await within(delay, room.wake.wait())  # not wait_for: see bridge.aio
            room.wake.clear()
            delay = WATCH_EVERY
            idle = time.monotonic() - room.sent_at > WATCH_IDLE
            if room.budget > 0 and idle and not failing and room.looked.is_set():
                continue
            # What is sent while the look is answered still counts against its answer: the
            # dispatcher answers from the state its last workflow task left, which the signals
            # held meanwhile may not be in yet (a slow worker answers late). Reset with the look,
            # they were forgotten, and a process sending all along spent the room several times.
            before = room.sent
            look = await self._look(shard, handle, failing)
            if look is None:  # not known (Temporal does not answer): the budget stands, less what is sent
                room.unknown_as_new()
                room.looked.set()
                continue
            budget, now_failing = look.budget, look.failing
            failing_gauge.set(now_failing)
            if now_failing != failing:
                failing = now_failing
                if failing:
                    log.error(
                        "dispatcher=%s fails its workflow tasks: it starts nothing, and its events wait in its "
                        "history; see docs/operations.md, 'A dispatcher that fails every workflow task'",
                        self._ids[shard],
                    )
                else:
                    log.info("dispatcher=%s runs its workflow tasks again", self._ids[shard])
            now = time.monotonic()
            rate = room.sent / (now - room.looked_at) if math.isfinite(room.looked_at) else 0.0
            during = room.sent - before
            budget -= during
            if look.answered:
                room.unanswered, room.judged = during, ""
            elif not look.rotated:
                # Judged by its history, a run takes no more than its last answer (or a new run's
                # room, until it answered) less what was sent since: the history counts once the
                # events it holds that are still to start, and a look gave back most of them.
                budget = min(budget, room.budget)
            room.budget, room.sent, room.looked_at = budget, during, now
            if budget > 0:
                delay = next_look(budget, rate)
            gauge.set(max(0.0, budget) if math.isfinite(budget) else -1)
            room.looked.set()
            if (budget <= 0) != room.full:
                room.full = budget <= 0
                if room.full:
                    log.warning(
                        "dispatcher=%s holds as many events as it can start before continuing-as-new: "
                        "refusing its events (overloaded) until its backlog starts",
                        self._ids[shard],
                    )
                else:
                    log.info("dispatcher=%s takes events again", self._ids[shard])

    async def _look(self, shard: int, handle: WorkflowHandle[Any, Any], failing: bool) -> _Look | None:
        """One look at the shard's run: its answer; without one, its history (or that it has no
        run, or that it closed: a new run's room). None: Temporal answers neither."""
        room = self._rooms[shard]
        info: DescribeWorkflowExecutionResponse | None = None
        try:
            stats = await query_stats(handle, patience=0, rpc_timeout=self.probe_timeout)
            look = _Look(float(stats.get("accept_bytes", math.inf)))
        except Exception:
            try:
                info = (await handle.describe(rpc_timeout=self.probe_timeout)).raw_description
            except Exception as exc:
                if not (isinstance(exc, RPCError) and exc.status == RPCStatusCode.NOT_FOUND):
                    return None
                return _Look(room_of_a_new_run())  # no run yet: the next signal begins one
            history = info.workflow_execution_info.history_size_bytes
            run = info.workflow_execution_info.execution.run_id
            # A run that continued-as-new since the last look holds at most its history of what
            # was sent to the run before it (the rest was started, or carried).
            rotated = bool(room.judged) and run != room.judged
            if rotated:
                room.unanswered = min(room.unanswered, history)
            room.judged = run
            # Cleared only by an answer: each signal begins a new task at attempt 1.
            failing = failing or tasks_failing(info)
            look = _Look(room_by_history(history, room.unanswered), failing, answered=False, rotated=rotated)
        if look.budget <= 0 and await self._closed(handle, info):
            # Its last state (or its history) says full, but the next signal starts a new run.
            log.warning("dispatcher=%s: its run has closed; the next events start a new run", self._ids[shard])
            return _Look(room_of_a_new_run())
        return look

    async def _closed(self, handle: WorkflowHandle[Any, Any], info: DescribeWorkflowExecutionResponse | None) -> bool:
        """Whether the shard's latest run has closed (:func:`closed`); described again unless
        ``info`` is this look's description. Not known (Temporal does not answer): open."""
        if info is None:
            try:
                info = (await handle.describe(rpc_timeout=self.probe_timeout)).raw_description
            except Exception:
                return False
        return closed(info)

    async def _sender(self, shard: int) -> None:
        """Send one shard's submissions, one signal at a time, coalescing whatever queued meanwhile."""
        queue = self._queues[shard]
        while True:
            batch = await self._next_batch(shard)
            try:
                live = _live(batch)
                if not live:
                    continue
                if self.down:
                    _answer(live, self._unavailable("Temporal is unreachable"))
                    continue
                if self._rooms[shard].budget <= 0:  # spent while these waited behind the signal before
                    _answer(live, self._full(shard))
                    continue
                await self._send(shard, live)
            except BaseException:
                _answer(batch, self._unavailable("the dispatcher client is stopping"))
                raise
            finally:
                for _ in batch:
                    queue.task_done()

    async def _send(self, shard: int, batch: list[_Submission]) -> None:
        """One signal for the batch. When it takes longer than ``suspect_after`` and a probe finds
        Temporal down, the batch is answered Unavailable and the call is left to finish alone."""
        began = time.monotonic()
        traces = [sub.trace for sub in batch if sub.trace is not None]
        awaited = sum(sub.awaited for sub in batch)
        call = asyncio.create_task(self._signal(shard, [e for sub in batch for e in sub.events], traces, awaited))
        self._sending += 1
        call.add_done_callback(self._sent)
        try:
            done, _ = await asyncio.wait({call}, timeout=self.suspect_after)
            if not done:
                await self._check()
                if self.down and not call.done():
                    _answer(batch, self._unavailable("Temporal is unreachable"))
                    self._stray.add(call)
                    call.add_done_callback(self._forget)
                    return
            await call
        except asyncio.CancelledError:
            call.cancel()
            raise
        except EventRejected as exc:
            if len(batch) == 1:
                _answer(batch, exc)
            else:  # the signal of many requests was too large: only a request too large alone is
                await self._one_by_one(shard, batch)
        except Exception as exc:
            _answer(batch, exc)
            await self._check()
        else:
            self.handover.sent(time.monotonic() - began, awaited)
            room = self._rooms[shard]
            sent = sum(sub.size for sub in batch)
            room.budget -= sent
            room.sent += sent
            room.unanswered += sent
            room.sent_at = time.monotonic()
            if not math.isfinite(room.looked_at):  # the rate until the first look counts from here
                room.looked_at = began
            if room.sent * 4 >= room.answer:  # other processes may have sent as much meanwhile
                room.wake.set()
            # Answered on the loop's next turn: the sender first takes what queued meanwhile and
            # starts its signal, so Temporal works on it while the answered requests are answered
            # (each a response to write). The order of signals is as before: one at a time.
            asyncio.get_running_loop().call_soon(_answer, batch, None)

    async def _one_by_one(self, shard: int, batch: list[_Submission]) -> None:
        """Each submission of a signal Temporal refused as too large, in a signal of its own: on a
        server whose payload limit is below the bridge's MAX_SIGNAL_BYTES, one request's events
        refused every request coalesced with them (413, which clients do not retry). Each goes
        through :meth:`_send`, with its cut-off, probe and accounting; once one fails otherwise than
        too large (Temporal away), the rest are answered as it was, not sent one after another."""
        for i, sub in enumerate(batch):
            await self._send(shard, [sub])
            failed = sub.done.exception() if sub.done.done() and not sub.done.cancelled() else None
            if isinstance(failed, Exception) and not isinstance(failed, EventRejected):
                _answer(batch[i + 1 :], failed)
                return
            if self.down:  # its submitter gave up, so its failure was not kept: the probe's verdict
                _answer(batch[i + 1 :], self._unavailable("Temporal is unreachable"))
                return

    def _sent(self, _call: asyncio.Task[None]) -> None:
        self._sending -= 1

    def _forget(self, call: asyncio.Task[None]) -> None:
        self._stray.discard(call)
        if not call.cancelled() and call.exception() is None:
            log.info("a signal answered late was accepted after all; its events' retries are deduplicated")

    async def _next_batch(self, shard: int) -> list[_Submission]:
        """The oldest submission and every queued one after it that still fits in one signal, and
        in the dispatcher's room (its ``accept_bytes`` less what was sent since).

        The first that does not fit is carried to the next batch, so the order holds. The room is
        checked as a submission is queued, but spent only as signals are held: what queued behind
        a signal in flight would otherwise all go once it is held, past what the run can carry
        into its next, which then counts the rest failed after the adapters acknowledged them.
        """
        queue = self._queues[shard]
        first = self._carry[shard] or await queue.get()
        room = self._rooms[shard]
        if not room.looked.is_set() and not room.waited:  # the first signal: what the dispatcher can take, first
            room.waited = True  # once: a look that is slow (Temporal throttling) holds no later signal
            self._carry[shard] = first  # answered by close() meanwhile, as any carried submission
            await within(FIRST_LOOK + 2 * self.probe_timeout.total_seconds(), room.looked.wait())
            room.unknown_as_new()  # the look is slow: until it answers
        self._carry[shard] = None
        batch = [first]
        count, size = len(first.events), first.size
        most = min(MAX_SIGNAL_BYTES, room.budget)
        while not queue.empty():
            nxt = queue.get_nowait()
            if count + len(nxt.events) > MAX_SIGNAL_EVENTS or size + nxt.size > most:
                self._carry[shard] = nxt
                break
            batch.append(nxt)
            count += len(nxt.events)
            size += nxt.size
        room.queued -= size
        return batch

    async def _start(self, shard: int) -> None:
        """Start one shard's dispatcher unless it runs (the signals are sent by :meth:`_signal`)."""
        await self.client.start_workflow(
            DISPATCHER_WORKFLOW,
            DispatcherInput(project=self.project, shard=shard, raw_signals=True),
            id=self._ids[shard],
            task_queue=self.task_queue,
            rpc_timeout=self.rpc_timeout,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )

    async def _signal(self, shard: int, events: list[bytes], traces: Sequence[Context] = (), awaited: int = 0) -> None:
        """One signal-with-start of ``events``, of which ``awaited`` are events a client waits for."""
        wid = self._ids[shard]
        # The list of events, as the SDK would encode the list of their dicts, from their encodings.
        signal_input = Payloads(payloads=[Payload(metadata=JSON_PLAIN, data=b"[" + b",".join(events) + b"]")])
        try:
            name = f"SignalWithStartWorkflow:{DISPATCHER_WORKFLOW}"
            with client_span(self._tracing, name, wid, traces) as header:
                share = self.handover.share()
                if share < 1.0 or awaited:  # the worker running the dispatcher, in whatever process, gives way too
                    header = header or Header()
                    header.fields[told.HEADER].CopyFrom(told.header(self.client.identity, share))
                request = SignalWithStartWorkflowExecutionRequest(
                    namespace=self.client.namespace,
                    workflow_id=wid,
                    workflow_type=WorkflowType(name=DISPATCHER_WORKFLOW),
                    task_queue=TaskQueue(name=self.task_queue),
                    input=await self._input(shard),
                    identity=self.client.identity,
                    request_id=str(uuid.uuid4()),  # the same in every attempt: Temporal applies it once
                    signal_name=EVENT_SIGNAL,
                    signal_input=signal_input,
                    header=header,
                )
                await self._signal_with_start(request)
        except RPCError as exc:
            log.warning(
                "signal-with-start failed dispatcher=%s events=%d status=%s: %s",
                wid,
                len(events),
                exc.status.name,
                exc.message,
            )
            if exc.status == RPCStatusCode.INVALID_ARGUMENT and _signal_too_large(exc.message):
                raise EventRejected("too_large", exc.message) from exc
            raise self._unavailable(f"Temporal did not accept the events: {exc.message}") from exc
        except Exception as exc:
            log.warning("signal-with-start failed dispatcher=%s: %r", wid, exc)
            raise self._unavailable(f"Temporal did not accept the events: {exc}") from exc
        self.metrics.signals.inc()
        self.metrics.batch_size.observe(len(events))

    async def _signal_with_start(self, request: SignalWithStartWorkflowExecutionRequest) -> None:
        """Send ``request``, again after a short pause while Temporal answers busy (see the
        module's text), with the SDK's retries for the other answers it retries."""
        service = self.client.workflow_service
        pause = BUSY_PAUSE
        deadline = time.monotonic() + self.rpc_timeout.total_seconds()
        while True:
            try:
                await service.signal_with_start_workflow_execution(request, retry=False, timeout=self.rpc_timeout)
                return
            except RPCError as exc:
                if busy(exc) and time.monotonic() + pause < deadline:
                    self.metrics.signals_busy.inc()
                    log.debug("dispatcher=%s is busy: the signal goes again in %.2f s", request.workflow_id, pause)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, BUSY_MAX_PAUSE)
                    continue
                if exc.status not in RETRIED_BY_SDK:
                    raise
            await service.signal_with_start_workflow_execution(request, retry=True, timeout=self.rpc_timeout)
            return

    async def _input(self, shard: int) -> Payloads:
        """The shard's DispatcherInput, as the SDK encodes a workflow's argument."""
        if shard not in self._inputs:
            payloads = await self.client.data_converter.encode(
                [DispatcherInput(project=self.project, shard=shard, raw_signals=True)]
            )
            self._inputs[shard] = Payloads(payloads=payloads)
        return self._inputs[shard]


def handover_seconds(config: BridgeConfig) -> float | None:
    """``dispatcher.handover_target_ms`` in seconds (None: relative to the fastest signal)."""
    ms = config.dispatcher.handover_target_ms
    return None if ms is None else ms / 1000


def _signal_too_large(message: str) -> bool:
    """Temporal refused the signal for its size ("Blob data size exceeds limit."), not for the
    dispatcher's ("Workflow history size exceeds limit.": Temporal ends that run, and the retry's
    signal-with-start starts the next one, so it is Unavailable, never a refusal of the events)."""
    text = message.lower()
    return "size" in text and "history" not in text


def _live(batch: list[_Submission]) -> list[_Submission]:
    """``batch`` less what is not to be sent:

    - a submission whose submitter gave up while it was queued (cancelled: an HTTP client gone,
      an adapter stopping), which is then acknowledged to nobody. Sent anyway, it went out after
      the pipeline had stopped counting it, so ``max_pending_events`` did not bound the queue;
    - one whose call's submission before it failed, answered as that one was: a Kafka batch over
      one signal goes as several, and one that failed while the next was held had its later
      events started first, the earlier ones only on the batch's retry (the records of one key
      start in the order they were written).
    """
    live = []
    for sub in batch:
        if sub.done.cancelled():
            continue
        failure = sub.failed_before()
        if failure is None:
            live.append(sub)
        elif not sub.done.done():
            sub.done.set_exception(failure)
    return live


def _answer(batch: list[_Submission], failure: Exception | None) -> None:
    """Answer every submission a signal carried; a submitter that gave up (cancelled) is skipped."""
    for sub in batch:
        if sub.done.done():
            continue
        if failure is None:
            sub.done.set_result(None)
        else:
            sub.done.set_exception(failure)
