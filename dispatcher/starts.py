"""How the dispatcher starts targets: each start planned and weighed, then a batch of them started
as child workflows or from START_TARGETS.

Workflow code (called from :mod:`dispatcher.workflow`). Either way every start has the id
``{workflow_id}-{digest}``, ``REJECT_DUPLICATE`` and the event's memo, and each outcome (STARTED,
DUPLICATE or failed(why)) is reported to ``count``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

with workflow.unsafe.imports_passed_through():
    from bridge import templates
    from bridge.event import EventSignal, encoded_size, target_workflow_id
    from bridge.routing import Target, event_context
    from dispatcher import search
    from dispatcher.contract import (
        DUPLICATE,
        MAX_TARGET_BYTES,
        RUNNER_WORKFLOW,
        START_BATCH_BYTES,
        START_TARGETS,
        STARTED,
        StartBatch,
        TargetInput,
        TargetStart,
        encoded_as_sdk,
        failed,
        target_memo,
        wire,
    )

Count = Callable[[str, str, EventSignal], None]  # (outcome, start id, event)


@dataclass
class Plan:
    """One target start, its argument built and weighed."""

    event: EventSignal
    start: TargetStart
    size: int


def plan(
    event: EventSignal,
    size: int,
    digest: str,
    target: Target,
    exec_id: str,
    dispatcher: dict[str, str],
    search_attributes: dict[str, str] | None = None,
    *,
    strict: bool = False,
) -> Plan:
    """The start of ``target`` for ``event`` (``size``: its encoded bytes), its argument built and
    weighed; ValueError when the argument would be over MAX_TARGET_BYTES (Temporal would refuse the
    command, and with it every workflow task after), TemplateError when ``input:`` fails.

    ``strict`` (runs begun since STRICT_STARTS): also ValueError when ``input:`` renders a value JSON
    has no type for (``{{ .trigger.items }}`` of a payload without ``items`` is the dict's method):
    before it, the argument failed to encode when the batch was scheduled, and its whole batch was
    lost with it."""
    rendered = None
    if target.input is not None:
        rendered = templates.render(target.input, event_context(event))
    input_size = 0
    if target.input is not None:  # strict: encoded as the SDK will, weighed as encoded_size does ({"":…})
        input_size = encoded_as_sdk(rendered, "its input") + 5 if strict else encoded_size({"": rendered})
    arg = TargetInput(
        workflow_id=target.workflow_id,
        exec_id=exec_id,
        input=event.payload if target.input is None else rendered,
        trigger=event.payload,
        event=event.envelope(),
    )
    # At most: the event (its payload and envelope), the input again, the names and keys.
    weight = size + (size if target.input is None else input_size) + len(target.workflow_id) + 128
    if weight > MAX_TARGET_BYTES:
        raise ValueError(f"its argument is {weight} bytes, over {MAX_TARGET_BYTES}")
    memo = target_memo(event, dispatcher, target.workflow_id)
    kind = target.workflow_type or RUNNER_WORKFLOW
    if target.signal is not None:  # the open run the entry's template names, signalled once per event
        run = target.signal.render_id(event)
        request_id = signal_request_id(digest, target.workflow_id)
        start = TargetStart(
            run, kind, target.task_queue, arg, memo, event.key, target.signal.name, target.signal.if_missing, request_id
        )
    else:
        start = TargetStart(
            target_workflow_id(target.workflow_id, digest), kind, target.task_queue, arg, memo, event.key
        )
    start.search = search_attributes
    return Plan(event, start, weight)


def signal_request_id(digest: str, entry: str) -> str:
    """The request id of the signal of one event (its digest) for one workflow entry: the same
    on every retry, redelivery and dispatcher run, so Temporal delivers it to a run once."""
    return hashlib.blake2b(f"{digest}/{entry}".encode(), digest_size=16).hexdigest()


async def as_children(plans: list[Plan], count: Count) -> None:
    """Child workflows with ``ABANDON``, awaited until each has started, never until it ends."""

    async def one(plan: Plan) -> None:
        s = plan.start
        try:
            handle = await workflow.start_child_workflow(
                s.workflow_type,
                s.arg,
                id=s.id,
                task_queue=s.task_queue,
                parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                memo=s.memo,
                search_attributes=search.typed(s.search),
            )
        except WorkflowAlreadyStartedError:
            count(DUPLICATE, s.id, plan.event)
        except Exception as exc:
            count(failed(str(exc)), s.id, plan.event)
        else:
            handle.add_done_callback(_outcome_not_awaited)
            count(STARTED, s.id, plan.event)

    await asyncio.gather(*(one(p) for p in plans))


def _outcome_not_awaited(handle: asyncio.Future[Any]) -> None:
    """A child's end is its own business: retrieve a failure, so asyncio does not log it as lost."""
    if not handle.cancelled():
        handle.exception()


def chunks(plans: list[Plan]) -> list[list[Plan]]:
    """The plans in order, in chunks of at most START_BATCH_BYTES of arguments (a larger one alone):
    what one workflow task may send, well under Temporal's 4 MiB per transaction (over it, the
    server terminates the run)."""
    out: list[list[Plan]] = [[]]
    size = 0
    for plan in plans:
        if out[-1] and size + plan.size > START_BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(plan)
        size += plan.size
    return [c for c in out if c]


STRICT_STARTS = "strict-starts"
"""The patch from which a target whose ``input:`` renders no JSON value is a failed start of its
own (:func:`plan` with ``strict``), and a chunk of starts whose activity cannot be scheduled (or
fails for good) counts each of its starts failed (:func:`by_activity` with ``strict``). Before it,
either failed the whole batch: its events were remembered as done, and none was counted."""


LOCAL_STARTS = "start-targets-local"
"""The patch from which a small batch's START_TARGETS ran as a local activity, until
workflow.NO_LOCAL_ACTIVITIES. A dispatcher run begun before either replays its history with the
activities it scheduled; one begun between them with its local ones."""
LOCAL_MOST = 64
"""Starts in a batch that runs as a local activity, at most."""
LOCAL_BYTES = 64 * 1024
"""Bytes of arguments in a batch that runs as a local activity, at most."""


def is_local(chunk: list[Plan]) -> bool:
    """Whether a batch is small enough to start from a local activity (when the dispatcher has
    nothing queued behind it and no other one running), in a run begun before
    workflow.NO_LOCAL_ACTIVITIES: a replay of such a run makes the choices it made.

    A local activity runs in the worker that holds the dispatcher's workflow task, and costs the
    server one marker in that task. A scheduled one costs it three history events, a task to hand
    out and the workflow task that follows: at half load, a few events per batch, that work held
    the starts back (docs/benchmarks.md, "What a half load's starts wait for"). But the workflow task
    stays open while the local activity runs, and Temporal closes a task that 100 events (or 2 MiB)
    arrived for meanwhile, losing the results; so only one batch of small starts at a time goes
    that way, which takes a fraction of a second. A batch with others queued behind it (a burst) is
    scheduled as before.
    """
    return len(chunk) <= LOCAL_MOST and sum(p.size for p in chunk) <= LOCAL_BYTES


SIGNAL_STARTS_SCHEDULED = "signal-starts-scheduled"
"""The patch from which a batch with a signal-with-start is scheduled, never local: only a
scheduled activity's retry knows what an earlier attempt sent (its heartbeat details), and a
signal-with-start sent again after the run it reached has closed starts another run."""


def needs_scheduling(chunk: list[Plan]) -> bool:
    """Whether a batch holds a signal-with-start (``if_missing: start``): see SIGNAL_STARTS_SCHEDULED."""
    return any(p.start.signal is not None and p.start.if_missing == "start" for p in chunk)


async def by_activity(plans: list[Plan], count: Count, *, local: bool = False, strict: bool = False) -> None:
    """One START_TARGETS per chunk of arguments, a local activity when ``local`` (the dispatcher
    decided it: the batch :func:`is_local`, so it is one chunk), else a scheduled one; each retried
    until it answers. Either way a worker that dies mid-batch leaves it to another, which makes its
    starts again (each answers DUPLICATE then). ``strict`` (STRICT_STARTS): a chunk that cannot be
    scheduled, or whose activity fails for good, counts each of its starts failed."""

    async def run(chunk: list[Plan]) -> None:
        if not strict:
            await started(chunk)
            return
        try:
            await started(chunk)
        except Exception as exc:  # not CancelledError: the run is going away, and counts nothing
            for plan in chunk:
                count(failed(f"its batch of starts failed: {exc}"), plan.start.id, plan.event)

    async def started(chunk: list[Plan]) -> None:
        arg = wire(StartBatch([p.start for p in chunk]))
        retry = RetryPolicy(maximum_interval=timedelta(seconds=10))
        outcomes: list[str]
        if local:
            outcomes = await workflow.execute_local_activity(
                START_TARGETS,
                arg,
                result_type=list[str],
                start_to_close_timeout=timedelta(minutes=10),
                retry_policy=retry,
            )
        else:
            outcomes = await workflow.execute_activity(
                START_TARGETS,
                arg,
                result_type=list[str],
                # A dead worker is noticed by its heartbeat; a batch may take long when the process's
                # starts give way to its adapters (dispatcher.slots), and a retry would redo the batch.
                start_to_close_timeout=timedelta(minutes=10),
                heartbeat_timeout=timedelta(seconds=10),
                retry_policy=retry,
            )
        for plan, outcome in zip(chunk, outcomes, strict=True):
            count(outcome, plan.start.id, plan.event)

    await asyncio.gather(*(run(c) for c in chunks(plans)))
