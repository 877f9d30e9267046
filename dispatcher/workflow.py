"""The dispatcher: one long-running workflow per project (per shard) that starts target runs.

Signal handlers only append to a queue; the main loop drains it in batches. For each event it
resolves the targets from the route table (loaded by a local activity, so a replay sees the
table the run saw) and starts each with the id ``{workflow_id}-{run_digest(project, source, id)}``, ``ABANDON``
and ``REJECT_DUPLICATE``, waiting only until each has *started*: as a child workflow, or (start
mode ``activity``) in batches from the START_TARGETS activity. A second start for the same event
is refused by Temporal and counted as a duplicate; recent event digests catch most before that.

It continues-as-new before any server limit bites (history length, signals per run, pending
children), after every handler finished and every start was confirmed, carrying the unprocessed
queue, the recent digests and its counters. Names, inputs and settings are in
:mod:`dispatcher.contract`; the counters and limits are described in docs/operations.md.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

with workflow.unsafe.imports_passed_through():
    import json

    from bridge import templates
    from bridge.event import EventSignal, run_digest, target_workflow_id
    from bridge.routing import RouteTable, Target
    from dispatcher.contract import (
        CARRY_LIMIT_BYTES,
        DISPATCHER_WORKFLOW,
        DUPLICATE,
        EVENT_SIGNAL,
        LOAD_ROUTES,
        RELOAD_SIGNAL,
        RUNNER_WORKFLOW,
        START_BATCH_BYTES,
        START_TARGETS,
        STARTED,
        STAT_KEYS,
        STATS_QUERY,
        DispatcherInput,
        DispatcherSettings,
        DispatcherStats,
        RoutesResult,
        StartBatch,
        TargetInput,
        TargetStart,
        failed,
        target_memo,
    )


# Not sandboxed: the sandbox's import proxies made serialising the continue-as-new input slow
# enough to trip the deadlock detector. This module does no I/O and reads no clock or randomness
# except through `workflow.*`, which is what the sandbox would have enforced.
@workflow.defn(name=DISPATCHER_WORKFLOW, sandboxed=False)
class DispatcherWorkflow:
    @workflow.init
    def __init__(self, inp: DispatcherInput) -> None:
        self._queue: deque[EventSignal] = deque()
        for raw in inp.pending:
            self._queue.append(EventSignal.from_dict(raw))
        self._recent: OrderedDict[str, None] = OrderedDict.fromkeys(inp.recent)
        self._stats = {k: int(inp.stats.get(k, 0)) for k in STAT_KEYS}
        self._run = inp.run
        self._signals = 0
        self._children = 0
        self._reload = True
        self._routes: RouteTable | None = None
        self._settings = DispatcherSettings()

    @workflow.signal(name=EVENT_SIGNAL)
    def event_channel(self, *args: Any) -> None:
        """One event or a list of them. Bad items are counted and dropped; the rest queue up.

        Variadic on purpose: a signal sent with no argument, or several, must not raise here (a
        raising handler fails every workflow task from then on, and the dispatcher stalls).
        """
        self._signals += 1
        if len(args) != 1:
            self._stats["malformed"] += 1
            workflow.logger.warning("dropped a signal with %d arguments instead of 1", len(args))
            return
        events = args[0]
        for raw in events if isinstance(events, list) else [events]:
            try:
                event = EventSignal.from_dict(raw)
            except (KeyError, TypeError, ValueError) as exc:
                self._stats["malformed"] += 1
                workflow.logger.warning("dropped malformed event: %s", exc)
                continue
            self._stats["received"] += 1
            self._queue.append(event)

    @workflow.signal(name=RELOAD_SIGNAL)
    def reload(self, *_ignored: Any) -> None:
        """Load the route table again before the next batch; any argument is ignored."""
        self._reload = True

    @workflow.query(name=STATS_QUERY)
    def stats(self) -> DispatcherStats:
        s = self._stats
        return DispatcherStats(
            received=s["received"],
            started=s["started"],
            duplicates=s["duplicates"],
            unroutable=s["unroutable"],
            failed=s["failed"],
            malformed=s["malformed"],
            backlog=len(self._queue),
            run=self._run,
            signals_this_run=self._signals,
            children_this_run=self._children,
        )

    @workflow.run
    async def run(self, inp: DispatcherInput) -> None:
        self._project = inp.project
        self._shard = inp.shard
        while True:
            await workflow.wait_condition(lambda: bool(self._queue) or self._reload or self._should_rotate())
            if self._reload:
                await self._load_routes()
            if self._routes is None:
                continue
            if self._queue:
                await self._dispatch_batch()
            if self._should_rotate():
                await self._rotate()

    async def _load_routes(self) -> None:
        """Load (or reload) the route table; on failure keep the old one and never die.

        Without any table yet, events wait in the queue and the load is tried again shortly.
        """
        self._reload = False
        try:
            result: RoutesResult = await workflow.execute_local_activity(
                LOAD_ROUTES,
                result_type=RoutesResult,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=5, maximum_interval=timedelta(seconds=5)),
            )
            routes = RouteTable.from_spec(result.routes)
        except Exception as exc:
            workflow.logger.error("loading routes failed, keeping the previous table: %s", exc)
            if self._routes is None:
                await workflow.sleep(timedelta(seconds=10))
                self._reload = True
            return
        self._routes = routes
        self._settings = result.settings
        workflow.logger.info("routes loaded run=%d workflows=%d", self._run, len(self._routes.workflows))

    def _should_rotate(self) -> bool:
        info = workflow.info()
        return (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() >= self._settings.history_events_threshold
            or self._signals >= self._settings.signals_per_run
            or self._children >= self._settings.children_per_run
        )

    async def _dispatch_batch(self) -> None:
        assert self._routes is not None
        budget = self._settings.batch_size
        plans: list[tuple[EventSignal, str, Target]] = []
        while self._queue and budget > 0:
            event = self._queue.popleft()
            digest = run_digest(self._project, event.source, event.id)
            if digest in self._recent:
                self._stats["duplicates"] += 1
                workflow.logger.info("duplicate event skipped id=%s name=%s", event.id, event.name)
                continue
            self._remember(digest)
            try:
                targets = self._routes.resolve(event)
            except Exception as exc:
                self._stats["failed"] += 1
                workflow.logger.error("routing failed id=%s name=%s: %s", event.id, event.name, exc)
                continue
            if not targets:
                self._stats["unroutable"] += 1
                workflow.logger.info("no target for event id=%s name=%s", event.id, event.name)
                continue
            for target in targets:
                plans.append((event, digest, target))
                budget -= 1
        self._children += len(plans)
        if self._settings.start_mode == "activity":
            await self._start_by_activity(plans)
        else:
            await asyncio.gather(*(self._start_child(*plan) for plan in plans))

    def _arg(self, event: EventSignal, target: Target) -> TargetInput:
        return TargetInput(
            workflow_id=target.workflow_id,
            exec_id=str(workflow.uuid4()),
            input=event.payload if target.input is None else self._render(target, event),
            trigger=event.payload,
            event=event.envelope(),
        )

    def _count(self, outcome: str, child_id: str, event: EventSignal) -> None:
        if outcome == STARTED:
            self._stats["started"] += 1
        elif outcome == DUPLICATE:
            self._stats["duplicates"] += 1
            workflow.logger.info("duplicate start refused child=%s event=%s", child_id, event.id)
        else:
            self._stats["failed"] += 1
            workflow.logger.error("start failed child=%s event=%s: %s", child_id, event.id, outcome)

    async def _start_child(self, event: EventSignal, digest: str, target: Target) -> None:
        child_id = target_workflow_id(target.workflow_id, digest)
        try:
            await workflow.start_child_workflow(
                target.workflow_type or RUNNER_WORKFLOW,
                self._arg(event, target),
                id=child_id,
                task_queue=target.task_queue,
                parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                memo=target_memo(event),
            )
        except WorkflowAlreadyStartedError:
            self._count(DUPLICATE, child_id, event)
        except Exception as exc:
            self._count(failed(str(exc)), child_id, event)
        else:
            self._count(STARTED, child_id, event)

    async def _start_by_activity(self, plans: list[tuple[EventSignal, str, Target]]) -> None:
        """One activity per ~1 MiB of input starts the whole batch; retried until it answers."""
        chunks: list[list[tuple[TargetStart, EventSignal]]] = [[]]
        size = 0
        for event, digest, target in plans:
            try:
                start = TargetStart(
                    id=target_workflow_id(target.workflow_id, digest),
                    workflow_type=target.workflow_type or RUNNER_WORKFLOW,
                    task_queue=target.task_queue,
                    arg=self._arg(event, target),
                    memo=target_memo(event),
                )
            except Exception as exc:
                self._count(failed(str(exc)), target.workflow_id, event)
                continue
            weight = len(json.dumps(start.arg, default=str))
            if chunks[-1] and size + weight > START_BATCH_BYTES:
                chunks.append([])
                size = 0
            chunks[-1].append((start, event))
            size += weight

        async def run(chunk: list[tuple[TargetStart, EventSignal]]) -> None:
            outcomes: list[str] = await workflow.execute_activity(
                START_TARGETS,
                StartBatch([s for s, _ in chunk]),
                result_type=list[str],
                start_to_close_timeout=timedelta(seconds=60),
                heartbeat_timeout=timedelta(seconds=10),
                retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=10)),
            )
            for (start, event), outcome in zip(chunk, outcomes, strict=True):
                self._count(outcome, start.id, event)

        await asyncio.gather(*(run(c) for c in chunks if c))

    @staticmethod
    def _render(target: Target, event: EventSignal) -> Any:
        context = {"trigger": event.payload, "input": event.payload, "event": event.envelope()}
        return templates.render(target.input, context)

    def _remember(self, digest: str) -> None:
        limit = self._settings.recent_ids
        if limit <= 0:
            return
        self._recent[digest] = None
        while len(self._recent) > limit:
            self._recent.popitem(last=False)

    async def _rotate(self) -> None:
        """Continue-as-new with the queue, once handlers finished and every start is confirmed."""
        while True:
            await workflow.wait_condition(workflow.all_handlers_finished)
            pending = [e.to_dict() for e in self._queue]
            if len(json.dumps(pending, default=str)) <= CARRY_LIMIT_BYTES:
                break
            await self._dispatch_batch()
        workflow.logger.info(
            "continuing as new run=%d carried=%d signals=%d children=%d history=%d",
            self._run,
            len(pending),
            self._signals,
            self._children,
            workflow.info().get_current_history_length(),
        )
        workflow.continue_as_new(
            DispatcherInput(
                project=self._project,
                shard=self._shard,
                run=self._run + 1,
                pending=pending,
                recent=list(self._recent),
                stats=dict(self._stats),
            )
        )
