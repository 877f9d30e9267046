"""Activities: the route table and task lists from the worker's config, target starts, HTTP calls.

The config lives in the worker process, not in workflow code: workflows fetch what they need
through activities, whose results are recorded, so replays never depend on the file, and a
reload is seen by the next load. An http task's call reads its config from the current snapshot
too (:mod:`dispatcher.http_task`). The names and payloads are in :mod:`dispatcher.contract`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from temporalio import activity
from temporalio.api.common.v1 import Header, Memo, SearchAttributes, WorkflowExecution, WorkflowType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import (
    GetWorkflowExecutionHistoryRequest,
    GetWorkflowExecutionHistoryReverseRequest,
    SignalWithStartWorkflowExecutionRequest,
    SignalWorkflowExecutionRequest,
)
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.converter import PayloadConverter, encode_search_attributes
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from bridge.config import HttpTask
from bridge.logsafe import safe
from bridge.metrics import Metrics
from bridge.snapshot import Snapshot
from dispatcher import http_task, search
from dispatcher.contract import (
    BATCH_MEMO,
    DUPLICATE,
    HTTP_REQUEST,
    LOAD_ROUTES,
    LOAD_TASKS,
    MISSING,
    SIGNAL_STARTED,
    SIGNALED,
    START_TARGETS,
    STARTED,
    DispatcherSettings,
    HttpCall,
    RoutesResult,
    StartBatch,
    TargetStart,
    failed,
)
from dispatcher.slots import Handover, StartSlots, StartWindow, Timing
from dispatcher.spans import client_span, tracing_interceptor
from dispatcher.told import Told

log = logging.getLogger(__name__)


class BridgeActivities:
    """Built with a callable that returns the current snapshot, so `reload` sees a swapped one."""

    def __init__(
        self,
        current: Snapshot | Callable[[], Snapshot],
        *,
        search_attributes: bool = False,
        tracing: bool = False,
        handover: Handover | None = None,
        told: Told | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """``search_attributes``: the namespace has dispatcher.search's attributes (the worker
        looked at start), so target runs may carry them. ``tracing``: each start is made in its
        event's trace (``metadata.traceparent``), so the run continues it. ``handover``: how this
        process's adapters hand events over, which its starts give way to (dispatcher.slots);
        ``told``: the shares adapter processes told in their signals, which they give way to as
        well (dispatcher.told). ``metrics``: where the starts in flight and their share are shown."""
        self._current = current
        self.search_attributes = search_attributes
        self.tracing = tracing

        def engaged() -> bool:  # a client waits on this process's signals, or on an ingress's
            return (handover is not None and handover.awaited()) or (told is not None and told.waiting())

        window = StartWindow(
            self._starts_in_flight,
            lambda: self.snapshot().config.dispatcher.start_latency_tolerance,
            engaged=engaged,
            open_limit=self._starts_unawaited,
        )

        def share() -> float:
            own = handover.share() if handover is not None else 1.0
            return own if told is None else min(own, told.share())

        self.slots = StartSlots(window, share if handover is not None or told is not None else None)
        if metrics is not None:
            slots = self.slots
            metrics.starts_in_flight.set_function(lambda: slots.used)
            metrics.start_share.set_function(share)
            metrics.start_window.set_function(window.size)

    def snapshot(self) -> Snapshot:
        return self._current() if callable(self._current) else self._current

    def _starts_in_flight(self) -> int:
        return self.snapshot().config.dispatcher.starts_in_flight

    def _starts_unawaited(self) -> int:
        """Starts in flight while no client waits: as many as the dispatcher starts at once."""
        settings = self.snapshot().config.dispatcher
        return max(settings.starts_in_flight, settings.batch_size)

    @activity.defn(name=LOAD_ROUTES)
    async def load_routes(self) -> RoutesResult:
        snap = self.snapshot()
        settings = DispatcherSettings.from_config(snap.config.dispatcher)
        return RoutesResult(routes=snap.routes.spec(), settings=settings, search_attributes=self.search_attributes)

    @activity.defn(name=LOAD_TASKS)
    async def load_tasks(self, workflow_id: str) -> list[dict[str, Any]]:
        """The entry's tasks as written (``${VAR}`` references kept); an http task's timeout is
        its effective one, so the runner can size the activity's."""
        config = self.snapshot().config
        for wf in config.workflows:
            if wf.id == workflow_id:
                tasks = [t.model_dump() for t in wf.tasks]
                for task, dumped in zip(wf.tasks, tasks, strict=True):
                    if isinstance(task, HttpTask):
                        own = task.config.timeout_seconds or config.runner.timeout_seconds
                        dumped["config"]["timeout_seconds"] = min(own, config.runner.timeout_seconds)
                return tasks
        raise ApplicationError(f"no workflow {workflow_id!r} in the config", non_retryable=True)

    @activity.defn(name=START_TARGETS)
    async def start_targets(self, batch: StartBatch) -> list[str]:
        """Start every target; one outcome each: STARTED, DUPLICATE (its id ran already) or failed(why).

        Idempotent: a retry of this activity finds what an earlier attempt started and reports it
        as a duplicate; nothing starts twice. A signal-with-start is not: once the run it started
        or signaled has closed, the same request starts another run (the server dedupes its request
        id only for an open run), and the event runs twice. So each answer is heartbeated as it
        comes, and a retry sends nothing an earlier attempt got an answer for (its heartbeat
        details, which the SDK flushes when an attempt fails); a signal an earlier attempt may
        have sent unheard (its worker died) is looked for in the runs' histories
        (:class:`DeliveredBefore`). A local activity has no heartbeat details: the dispatcher
        schedules batches with such starts (starts.needs_scheduling).
        """
        client = activity.client()
        interceptor = tracing_interceptor(client) if self.tracing else None

        async def start(s: TargetStart) -> str:
            async with self.slots.slot() as timing:
                if earlier is not None and (seen := await sent_before(earlier, s, timing, last_send)):
                    return seen
                if time.monotonic() > last_send:
                    # Sent after the attempt's timeout, an answer would never reach its heartbeat,
                    # and the retry would send a signal-with-start again; failing first flushes them.
                    timing.unsent()
                    raise ApplicationError("START_TARGETS is out of time: the next attempt sends the rest")
                if s.signal is not None:
                    return await self._signal(client, s, interceptor)
                if self.tracing:
                    with in_trace_of(s):
                        return await start_one(client, s, info.activity_id, maybe_ours)
                return await start_one(client, s, info.activity_id, maybe_ours)

        async def heartbeat() -> None:
            # A worker that dies mid-batch is noticed within the heartbeat timeout, not 60 s (a local
            # activity's, at its workflow task's timeout: it has nothing to heartbeat).
            while True:
                activity.heartbeat(list(outcomes))
                await asyncio.sleep(2)

        async def in_order(chain: list[int]) -> None:
            for i in chain:
                if not outcomes[i]:
                    outcomes[i] = await start(batch.starts[i])
                    if not info.is_local:
                        activity.heartbeat(list(outcomes))

        # Starts with the same ordering key, and signals to the same run, one after another in the
        # batch's order; the rest at once.
        info = activity.info()
        last_send = send_until(info)
        # Only a retry, or a local activity (run again with a lost workflow task), can meet its own starts.
        maybe_ours = info.is_local or info.attempt > 1
        outcomes = answered_before(info, len(batch.starts))
        # A signal an earlier attempt may have sent unheard is looked for before it is sent again.
        earlier = DeliveredBefore(client, info.scheduled_time) if maybe_ours and not info.is_local else None
        chains: dict[object, list[int]] = {}
        for i, s in enumerate(batch.starts):
            chain = ("run", s.id) if s.signal is not None else (i if s.key is None else s.key)
            chains.setdefault(chain, []).append(i)
        beat = None if info.is_local else asyncio.create_task(heartbeat())
        try:
            # Every chain runs to its end before an error of one fails the attempt: a start still in
            # flight then would go on unseen, and its answer be missing from the heartbeat.
            results = await asyncio.gather(*(in_order(chain) for chain in chains.values()), return_exceptions=True)
            if errors := [r for r in results if isinstance(r, BaseException)]:
                raise errors[0]
            return outcomes
        finally:
            if beat is not None:
                beat.cancel()

    async def _signal(self, client: Client, s: TargetStart, interceptor: TracingInterceptor | None) -> str:
        if self.tracing:
            with in_trace_of(s), signal_span(s, interceptor) as header:
                return await deliver_signal(client, s, header)
        return await deliver_signal(client, s)

    @activity.defn(name=HTTP_REQUEST)
    async def http_request(self, call: HttpCall) -> dict[str, Any]:
        return await http_task.run(self.snapshot().config, call)


async def sent_before(earlier: DeliveredBefore, s: TargetStart, timing: Timing, last_send: float) -> str | None:
    """Where an earlier attempt's signal went, looked for right before it is sent, in the slot:
    looked for before the wait for one (seconds, with the window small while a burst is handed
    over), an open run that held it could close meanwhile, and the signal-with-start then started
    another. The search is no start's latency for the window."""
    if s.signal is None or time.monotonic() > last_send:
        return None
    seen = await earlier.find(s)
    if seen:
        timing.unsent()
    else:
        timing.restart()
    return seen


SEND_MARGIN = timedelta(seconds=30)
"""How long before its start-to-close timeout an attempt of START_TARGETS stops sending: longer than
the SDK's heartbeat throttle (8 s: 0.8 of the 10 s heartbeat timeout) and a start's RPC."""


def send_until(info: activity.Info) -> float:
    """The time (``time.monotonic()``) after which the attempt sends no more starts or signals: its
    answers would come after its timeout, when heartbeats are refused, and be lost to the retry.
    Counted on this worker's clock from when the attempt began here (the server's start time on a
    clock that is ahead would stop every attempt at once). No bound for a timeout that leaves no
    room for the margin (the dispatcher sets 10 minutes)."""
    if info.start_to_close_timeout is None or info.start_to_close_timeout <= 2 * SEND_MARGIN:
        return math.inf
    return time.monotonic() + (info.start_to_close_timeout - SEND_MARGIN).total_seconds()


OWN_START_KEYS = ("event_id", "dispatcher", "dispatcher_run", BATCH_MEMO)
"""The memo keys that make a run this batch's own start (the run may change the rest of its memo)."""


async def start_one(client: Client, s: TargetStart, batch: str | None = None, maybe_ours: bool = False) -> str:
    """Start ``s``'s run unless its id ran already: STARTED, DUPLICATE or failed(why).

    With ``batch`` (the START_TARGETS activity id) the run's memo says so. When ``maybe_ours`` (an
    attempt after one whose answers may be lost: a retry, or a local activity run again with its
    lost workflow task), a refused start whose run's memo has this start's OWN_START_KEYS is this
    batch's own: STARTED, not DUPLICATE.
    """
    memo = s.memo if batch is None else {**s.memo, BATCH_MEMO: batch}
    try:
        await client.start_workflow(
            s.workflow_type,
            s.arg,
            id=s.id,
            task_queue=s.task_queue,
            memo=memo,
            search_attributes=search.typed(s.search),
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
        )
    except WorkflowAlreadyStartedError:
        if batch is None or not maybe_ours:
            return DUPLICATE
        found = await memo_of(client, s.id)
        own = found is not None and all(found.get(k) == memo.get(k) for k in OWN_START_KEYS)
        return STARTED if own else DUPLICATE
    except RPCError as exc:
        if exc.status in (RPCStatusCode.INVALID_ARGUMENT, RPCStatusCode.NOT_FOUND):
            return failed(exc.message)
        raise
    return STARTED


async def memo_of(client: Client, workflow_id: str) -> Mapping[str, Any] | None:
    """The memo of the run ``workflow_id``, or None when it cannot be read (gone, or refused)."""
    try:
        described = await client.get_workflow_handle(workflow_id).describe(rpc_timeout=timedelta(seconds=10))
        return await described.memo()
    except Exception as exc:  # an answer it cannot read is no proof the run is this batch's
        log.warning("memo of %s not read, its refused start counts as a duplicate: %s", safe(workflow_id), safe(exc))
        return None


def answered_before(info: activity.Info, size: int) -> list[str]:
    """The outcomes an earlier attempt of this START_TARGETS heartbeated ("" where it had none)."""
    details = info.heartbeat_details
    earlier = details[0] if not info.is_local and details else None
    if isinstance(earlier, list) and len(earlier) == size and all(isinstance(o, str) for o in earlier):
        return list(earlier)
    return [""] * size


async def deliver_signal(client: Client, s: TargetStart, header: Header | None = None) -> str:
    """Signal the open run ``s.id`` (signal-with-start with ``if_missing: start``) with the start's
    request id, which Temporal dedupes for the life of the run: a redelivered event, a retried
    activity or a later dispatcher run never delivers it twice. SIGNALED, SIGNAL_STARTED, MISSING
    or failed(why); transient errors raise, so the activity is retried. ``header``: the trace
    context for the run (:func:`signal_span`); these raw calls pass no client interceptor."""
    assert s.signal is not None
    payloads = await client.data_converter.encode_wrapper([s.arg])
    header = with_request_id(header, s.request_id)
    try:
        if s.if_missing == "start":
            attributes = SearchAttributes()
            encode_search_attributes(search.typed(s.search), attributes)
            memo = Memo(
                fields={
                    k: v for k, v in zip(s.memo, await client.data_converter.encode(list(s.memo.values())), strict=True)
                }
            )
            answer = await client.workflow_service.signal_with_start_workflow_execution(
                SignalWithStartWorkflowExecutionRequest(
                    namespace=client.namespace,
                    workflow_id=s.id,
                    workflow_type=WorkflowType(name=s.workflow_type),
                    task_queue=TaskQueue(name=s.task_queue),
                    input=payloads,
                    identity=client.identity,
                    request_id=s.request_id or "",
                    signal_name=s.signal,
                    signal_input=payloads,
                    memo=memo,
                    search_attributes=attributes,
                    header=header,
                )
            )
            return SIGNAL_STARTED if answer.started else SIGNALED
        await client.workflow_service.signal_workflow_execution(
            SignalWorkflowExecutionRequest(
                namespace=client.namespace,
                workflow_execution=WorkflowExecution(workflow_id=s.id),
                signal_name=s.signal,
                input=payloads,
                identity=client.identity,
                request_id=s.request_id or "",
                header=header,
            )
        )
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND and s.if_missing != "start":
            return MISSING  # no such run, or it closed
        if namespace_not_active(exc):
            raise  # a global namespace failing over: the same signal goes to the new cluster
        if exc.status in (RPCStatusCode.INVALID_ARGUMENT, RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION):
            return failed(exc.message)
        raise
    return SIGNALED


REQUEST_HEADER = "signal-bridge-request"
"""The header every signal of a target start carries: its request id, so that a retry can find in a
run's history whether an earlier attempt's signal reached it (:class:`DeliveredBefore`)."""

PLAIN = PayloadConverter.default


def with_request_id(header: Header | None, request_id: str | None) -> Header | None:
    """``header`` (a trace context, or none) and the start's request id under REQUEST_HEADER."""
    if not request_id:
        return header
    out = Header()
    if header is not None:
        out.CopyFrom(header)
    out.fields[REQUEST_HEADER].CopyFrom(PLAIN.to_payloads([request_id])[0])
    return out


def request_id_of(header: Header) -> str | None:
    """The request id a signal's header carries (REQUEST_HEADER), or None."""
    field = header.fields.get(REQUEST_HEADER)
    if field is None:
        return None
    try:
        value = PLAIN.from_payloads([field])[0]
    except Exception:  # a header some other client wrote: not ours
        return None
    return value if isinstance(value, str) else None


SEARCHES = 3
"""How many times a retry searches a target's runs for a signal when the run it saw open closes
during the search; past that, the signal is sent."""
MAX_RUNS_SEARCHED = 100
"""How many runs of a target's id, closed since its batch was scheduled, a retry reads before it
gives up looking for an earlier attempt's signal in the rest and sends it again."""
CLOCK_MARGIN = timedelta(minutes=1)
"""How much earlier than the batch's scheduling a retry reads runs' histories from: the times it
compares are stamped by different Temporal hosts."""
CANNOT_READ = (RPCStatusCode.PERMISSION_DENIED, RPCStatusCode.INVALID_ARGUMENT, RPCStatusCode.UNIMPLEMENTED)
"""Refusals that would meet every attempt: the search gives up (logged) and the signals are sent."""


class DeliveredBefore:
    """What a retry of START_TARGETS finds of its signals that an earlier attempt may have sent
    without a heartbeat telling so (its worker died after the send; heartbeats are throttled to
    one in 8 s). The server dedupes a request id only within the run that took it: once that run
    has closed or continued-as-new, the same signal-with-start starts or signals another, and the
    event runs twice. So a retry reads, newest first and back to when the batch was first
    scheduled, the histories of the target id's runs closed since then: the current run (read by
    id, which visibility may not list yet) and those visibility lists. An open run needs no
    reading: it dedupes the signal sent again. Each run is read once per attempt, however many of
    the batch's signals it may hold. Transient errors raise: the attempt fails and the next looks
    again."""

    def __init__(self, client: Client, scheduled: datetime) -> None:
        self.client = client
        self.since = scheduled - CLOCK_MARGIN
        self._runs: dict[tuple[str, str], tuple[set[str], str | None]] = {}
        self._first: dict[tuple[str, str], str | None] = {}  # whom each run continued from
        self._blind = False  # the namespace refuses the reads: logged once, the signals are sent

    async def find(self, s: TargetStart) -> str | None:
        """SIGNALED or SIGNAL_STARTED when a run of ``s.id`` holds ``s``'s signal; None when none
        does (or they cannot be read), and it is to be sent."""
        if not s.request_id or self._blind:
            return None
        try:
            for _ in range(SEARCHES):
                runs, open_run = await self._runs_of(s.id)
                for run in runs:
                    signals, started_by = await self._read(s.id, run)
                    if s.request_id in signals:
                        return SIGNAL_STARTED if started_by == s.request_id else SIGNALED
                # The run seen open dedupes the signal sent again, unless it closed during the
                # search: then it is searched again, among the closed ones.
                if open_run is None or await self._still_open(s.id, open_run):
                    return None
        except RPCError as exc:
            if exc.status not in CANNOT_READ:
                raise
            self._blind = True
            log.warning(
                "a retried batch cannot read its targets' runs (%s): its signals without an answer are "
                "sent again, and one whose run has closed starts another; the worker needs to list "
                "workflows and read their histories",
                safe(exc),
            )
        return None

    async def _still_open(self, workflow_id: str, run_id: str) -> bool:
        """Whether ``run_id`` is still ``workflow_id``'s open run."""
        current = await self.client.get_workflow_handle(workflow_id).describe()
        return current.run_id == run_id and current.status == WorkflowExecutionStatus.RUNNING

    async def _runs_of(self, workflow_id: str) -> tuple[list[str], str | None]:
        """The runs of ``workflow_id`` closed since the batch was scheduled: the current run when
        it is closed (read by id: visibility may not list it yet), the runs it continued as new
        from (read back through their first events, as visibility may not list them yet either),
        then the others visibility lists; and the open run, if one is. An open run is not read:
        sent again, the signal is one it dedupes by its request id."""
        runs: list[str] = []
        open_run: str | None = None
        try:
            current = await self.client.get_workflow_handle(workflow_id).describe()
            if current.status != WorkflowExecutionStatus.RUNNING:
                runs.append(current.run_id)
            else:
                open_run = current.run_id
            run: str | None = current.run_id
            while run and len(runs) < MAX_RUNS_SEARCHED and (run := await self._continued_from(workflow_id, run)):
                runs.append(run)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
        since = search.quoted(self.since.astimezone(UTC).isoformat())
        query = f'WorkflowId = {search.quoted(workflow_id)} AND ExecutionStatus != "Running" AND CloseTime >= {since}'
        async for execution in self.client.list_workflows(query):
            if execution.run_id not in runs:
                runs.append(execution.run_id)
            if len(runs) > MAX_RUNS_SEARCHED:
                log.warning(
                    "%s has over %d runs closed since its batch was scheduled: %d are searched, and a "
                    "signal found in none of them is sent again",
                    safe(workflow_id),
                    MAX_RUNS_SEARCHED,
                    MAX_RUNS_SEARCHED,
                )
                break
        return runs[:MAX_RUNS_SEARCHED], open_run

    async def _continued_from(self, workflow_id: str, run_id: str) -> str | None:
        """The run ``run_id`` continued as new from, when it began since the batch was scheduled
        (the one before closed then): read from its first event, once per attempt."""
        if (workflow_id, run_id) in self._first:
            return self._first[(workflow_id, run_id)]
        self._first[(workflow_id, run_id)] = found = await self._read_continued_from(workflow_id, run_id)
        return found

    async def _read_continued_from(self, workflow_id: str, run_id: str) -> str | None:
        request = GetWorkflowExecutionHistoryRequest(
            namespace=self.client.namespace,
            execution=WorkflowExecution(workflow_id=workflow_id, run_id=run_id),
            maximum_page_size=1,
        )
        page = await self.client.workflow_service.get_workflow_execution_history(request)
        if not page.history.events:
            return None
        first = page.history.events[0]
        if first.event_time.ToDatetime(tzinfo=UTC) < self.since:
            return None
        return first.workflow_execution_started_event_attributes.continued_execution_run_id or None

    async def _read(self, workflow_id: str, run_id: str) -> tuple[set[str], str | None]:
        """The request ids of the signals the run took since the batch was scheduled, and that of
        the signal-with-start that started it (when it started since then); read newest first."""
        if (known := self._runs.get((workflow_id, run_id))) is not None:
            return known
        signals: set[str] = set()
        started_by: str | None = None
        request = GetWorkflowExecutionHistoryReverseRequest(
            namespace=self.client.namespace,
            execution=WorkflowExecution(workflow_id=workflow_id, run_id=run_id),
            maximum_page_size=1000,
        )
        try:
            while True:
                page = await self.client.workflow_service.get_workflow_execution_history_reverse(request)
                older = False
                for event in page.history.events:
                    if event.event_time.ToDatetime(tzinfo=UTC) < self.since:
                        older = True
                        break
                    if event.HasField("workflow_execution_signaled_event_attributes"):
                        header = event.workflow_execution_signaled_event_attributes.header
                        if (rid := request_id_of(header)) is not None:
                            signals.add(rid)
                    elif event.HasField("workflow_execution_started_event_attributes"):
                        started_by = request_id_of(event.workflow_execution_started_event_attributes.header)
                if older or not page.next_page_token:
                    break
                request.next_page_token = page.next_page_token
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:  # gone (deleted, past retention): it holds none
                raise
        self._runs[(workflow_id, run_id)] = (signals, started_by)
        return signals, started_by


def namespace_not_active(exc: RPCError) -> bool:
    """Temporal's answer while a global namespace is active in another cluster (a failover):
    FAILED_PRECONDITION, which is otherwise a signal's permanent refusal, but this one passes."""
    return exc.status == RPCStatusCode.FAILED_PRECONDITION and any(
        d.type_url.endswith("NamespaceNotActiveFailure") for d in exc.grpc_status.details
    )


def signal_span(s: TargetStart, tracing: TracingInterceptor | None) -> contextlib.AbstractContextManager[Header | None]:
    """The client span of a signal to an open run (:func:`dispatcher.spans.client_span`), named
    as the SDK's interceptor names its own: ``SignalWorkflow:{signal}``, or
    ``SignalWithStartWorkflow:{type}`` when a missing run is started."""
    name = f"SignalWithStartWorkflow:{s.workflow_type}" if s.if_missing == "start" else f"SignalWorkflow:{s.signal}"
    return client_span(tracing, name, s.id)


@contextlib.contextmanager
def in_trace_of(s: TargetStart) -> Iterator[None]:
    """A ``dispatch`` span in the trace of the start's event (its ``metadata.traceparent``), made
    current, so the client's tracing interceptor makes the start span under it and puts it in the
    run's headers: the dispatcher's handling of the event, between its receive span and the run."""
    event = s.arg["event"]
    metadata = event.get("metadata") or {}
    carrier = {k: v for k in ("traceparent", "tracestate") if isinstance(v := metadata.get(k), str)}
    parent = TraceContextTextMapPropagator().extract(carrier)
    info = activity.info()
    with trace.get_tracer("signal-bridge").start_as_current_span(
        f"dispatch {event.get('name')}",
        context=parent,
        attributes={
            "signal_bridge.event.id": str(event.get("id")),
            "signal_bridge.dispatcher": info.workflow_id or "",
            "signal_bridge.target": s.id,
            "signal_bridge.workflow_entry": s.arg["workflow_id"],
        },
    ):
        yield
