"""The dispatcher: one long-running workflow per project (per shard) that starts target runs.

Signal handlers only append to a queue; the main loop drains it in batches: it skips recent
duplicates, has the batch's CEL filters evaluated by the EVALUATE_FILTERS activity (within
budgets; its recorded answer spares replays the work), and starts every target with the id
``{workflow_id}-{run_digest(project, source, id)}``, ``ABANDON`` and ``REJECT_DUPLICATE``, waiting
only until each has started (:mod:`dispatcher.starts`). No workflow task runs long whatever the
payloads: a batch stops at budgets of targets, bytes and work, a batch that started nothing ends
its workflow task with a short timer, and a target argument too large for Temporal is a failed
start, never a command that fails every workflow task after it. It continues-as-new before a
server limit bites, carrying its queue (dispatching first, within bounds, what is too large to
carry), recent digests and counters. Its activities are scheduled ones (NO_LOCAL_ACTIVITIES); runs
begun before that patch keep their local ones. Limits: :mod:`dispatcher.contract`; docs/operations.md.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RawValue, RetryPolicy

with workflow.unsafe.imports_passed_through():
    from bridge import templates
    from bridge.event import (
        MAX_KEY_CHARS,
        MAX_SIGNAL_DEPTH,
        EventSignal,
        encoded_size,
        nested_deeper,
        run_digest,
        target_workflow_id,
    )
    from bridge.logsafe import safe
    from bridge.routing import RouteTable, Target
    from dispatcher import search, starts
    from dispatcher.contract import (
        CARRY_LIMIT_BYTES,
        CARRY_RESERVE,
        CHILD_LIMIT,
        DISPATCHER_WORKFLOW,
        DRAIN_HISTORY_BYTES,
        DRAIN_HISTORY_EVENTS,
        DRAIN_SOFT_BYTES,
        DUPLICATE,
        EVALUATE_FILTERS,
        EVENT_COST,
        EVENT_SIGNAL,
        FULL_MARGIN,
        FULL_MARGIN_CARRY,
        FULL_MARGIN_EVENTS,
        LOAD_ROUTES,
        MAX_CARRY_BYTES,
        MAX_SIGNAL_BYTES,
        MAX_SIGNAL_EVENTS,
        MISSING,
        RELOAD_SIGNAL,
        SIGNAL_STARTED,
        SIGNALED,
        START_BATCH_BYTES,
        STARTED,
        STAT_KEYS,
        STATS_QUERY,
        TAKE_WEIGHT,
        TARGET_OVERHEAD,
        TASK_COST_BUDGET,
        TEMPLATE_STEPS,
        YIELD,
        DispatcherInput,
        DispatcherSettings,
        DispatcherStats,
        FilterBatch,
        FilterVerdicts,
        RoutesResult,
        failed,
        wire,
    )
    from dispatcher.starts import Plan


_RUN = "\x00run:"  # marks a signalled run's id among the ordering keys in flight

ONE_RELOAD_PER_LOAD = "one-reload-per-load"
"""The patch from which an event whose name the table lacks has the routes loaded again only if
none was loaded since it was queued: before it, each such event loaded them once, so a burst of
them (two configs that disagree during a deploy) wrote the table into the history once per event."""
FILTERS_RETRIED = "filters-retried"
"""The patch from which a batch whose EVALUATE_FILTERS failed (after its own retries) goes back to
the queue and is evaluated again, up to FILTER_ROUNDS times in a row: before it, its filtered
targets counted as not matched at once, and the events were remembered as done."""
FILTER_ROUNDS = 5
FILTER_RETRY = timedelta(seconds=5)
FILTERS_RETRIED_ALWAYS = "filters-retried-always"
"""The patch from which a batch whose EVALUATE_FILTERS keeps failing is evaluated again for as long
as it fails, as START_TARGETS is started again until it answers: before it, after FILTER_ROUNDS
failures in a row its filtered targets counted as not matched, and the events were lost. The
activity answers for each event alone (one an evaluation cannot take counts as not matched), so
what keeps failing is the worker, not an event: the queue waits for it, as it waits for starts."""
FILTER_RETRY_LONG = timedelta(seconds=30)  # the pause after FILTER_ROUNDS failures in a row
DRAIN_RELOADS = "drain-reloads"
"""The patch from which the drain before continue-as-new loads the routes when a reload is due
(a signal, or an event whose name the table lacks): before it, the drain planned that event with
the old table, counting it unroutable."""
DEEP_EVENTS_MALFORMED = "deep-events-malformed"
"""The patch from which an event nested deeper than MAX_SIGNAL_DEPTH is dropped as malformed."""
CHECKS_IN_SLICES = "checks-in-slices"
"""The patch from which the signal handler checks and queues at most CHECK_TASK_BYTES of events a
workflow task and leaves the rest, unchecked, for the main loop, which checks as much a task (its
own tasks, one after another: a YIELD between them). Before it, every event received since the
last workflow task was checked in the handler, in one activation: a worker back after an outage
met every signal sent meanwhile (16,000 ordinary events, or eight of 1 MiB whose payload is a list
of empty lists) in one activation, over the SDK's 2 s deadlock timeout, on every attempt of it:
the dispatcher stalled for good."""
CHECK_TASK_BYTES = 2 * 1024 * 1024
"""Bytes of events checked in one workflow task (an event that is not valid counts as
CHECK_FAILED_BYTES), once the patch is in: on a 2-core machine about 0.3 s of checks for ordinary
events, 0.5 s for 1 MiB events of nothing but empty lists."""
CHECK_FAILED_BYTES = 64 * 1024
DECODE_SHARE = 4
"""In a run that takes signals raw, a signal's bytes count in its task's checks divided by this."""
RAW_SIGNALS = "raw-signals"
"""The patch from which a run takes its signals raw: asked at its first signal by a run begun so
(``DispatcherInput.raw_signals``), and by a run begun before where a signal first waits after
the upgrade (named ``raw-signals@{history length}`` there). Taken raw, a signal that arrives once
a workflow task's checks are used up (or behind events left unchecked) waits undecoded, and the
main loop decodes it when its turn comes; a quarter of each signal's bytes counts in the checks
of the task that decodes it (DECODE_SHARE); one that is no JSON counts as a signal and as
malformed; one of more than MAX_SIGNAL_EVENTS items is malformed whole (checked a slice a task,
a million items would take the run past the history's bound). Before, the SDK decoded every
signal of an activation before any handler ran, about 20 ms a MiB of ordinary events and 80 ms
for lists of empty lists, so thirty or so 1 MiB signals in one activation passed the 2 s
deadlock timeout whatever the handler left for later; and it dropped one that was no JSON,
uncounted."""
OVERSIZED_SIGNALS_MALFORMED = "oversized-signals-malformed"
"""The patch from which a run that does not take signals raw drops a signal of more than
MAX_SIGNAL_EVENTS items whole, as one that does (RAW_SIGNALS)."""
UNENCODABLE_MALFORMED = "unencodable-malformed"
"""The patch from which an event whose id, name, source or key is no UTF-8 text (a lone surrogate,
which JSON may carry as ``\\ud800``) is dropped as malformed. Before it, the event was queued and
its run digest failed to encode when it was taken, which failed the workflow task on every attempt:
any client of the namespace could stall a shard with one signal (the adapters refuse such text)."""
RESERVED_SIGNAL_IDS = "reserved-signal-ids"
"""The patch from which a signal entry's run id that names a dispatcher, or (``if_missing: start``)
has the shape of a run the bridge starts, is counted failed, not signalled
(bridge.routing.SignalRoute.reserved; the adapters refuse such events first)."""

CARRIED_SIZES = "carried-sizes"
"""The patch from which an event signalled in a shorter form than it is carried in (fields left
out, an id that is no string) is weighed as it is carried: before it, 26,000 bare items weighed
512 KiB by the estimate and 2.1 MB in the continue-as-new input, which the server refused, and the
dispatcher stalled with everything it held."""

EVENT_BOUNDS_MALFORMED = "event-bounds-malformed"
"""The patch from which an event over the bounds the adapters hold events to (an id, name or source
over MAX_KEY_CHARS characters, or over MAX_QUEUED_EVENT_BYTES) is dropped as malformed. Another
client of the namespace may signal one: an id of 1.1 MB was queued, and its start's argument and
memo (each holding the id) took the activity's input past Temporal's 2 MiB, so the server ended
the run with everything it held."""
MAX_QUEUED_EVENT_BYTES = 1024 * 1024
"""The largest event a dispatcher queues (the adapters refuse one over MAX_EVENT_BYTES, 944 KiB):
the filters' or the starts' argument for one larger would pass Temporal's payload limit."""
UNROUTABLE_CHARGED = "unroutable-charged"
"""The patch from which an event no entry takes costs EVENT_COST of the task's work as a batch
takes it: a batch stopped only at the most targets its events could start, so a queue of 100,000
events the table lacks went into one batch, planned in one workflow task of 4 s, past the
deadlock timeout on every attempt."""

NO_RECENT_CLEARS = "no-recent-clears"
"""The patch from which ``recent_ids: 0`` forgets the digests carried from runs that kept some:
before it, they were carried on for good, and an event id among them started nothing, even once
Temporal's retention had let its runs' ids be used again."""

# TEMPLATE_STEPS (dispatcher.contract): from it a run holds each template it renders to
# templates.MAX_STEPS (past it, that start fails, counted), counts the steps in its workflow task's
# work (STEPS_PER_UNIT), and ends a batch's planning once the task's work is spent. Before it, loops
# over an event's lists inside each other cost their product in one workflow task: an event of two
# lists of 250,000 items held it past the deadlock detector on every attempt, and the dispatcher
# stalled for good.
EVENT_STEPS = 2 * templates.MAX_STEPS
"""Template steps all of one event's starts may take together (its ``input:`` for each target, the
ids of the runs it signals): with 100,000 a rendering and nothing more, an event triggering ten
entries could hold a workflow task for ten renderings' worth."""
STEPS_PER_UNIT = 4
"""Template steps in a unit of TASK_COST_BUDGET (about 10 µs): a step took 0.13 µs in a plain loop,
2.2 µs in one that reads ``loop``, 0.75 µs a step of calls."""

ROTATE_WITHOUT_ROUTES = "rotate-without-routes"
"""The patch from which a run whose route table never loaded continues-as-new when due: before it,
it only tried to load the table again, and after hours of failed loads its history reached
Temporal's limit and the run was terminated with its queue."""

NO_LOCAL_ACTIVITIES = "no-local-activities"
"""The patch from which the dispatcher runs no local activity: its routes, filters and starts are
scheduled activities, whose results are events in the history, handed to the workflow at the same
point when it runs and when it replays. A local activity's result is a marker, and two ways it
reached the workflow differed between the two:

- the filters of one batch and the starts of another ran as local activities at once, and a replay
  handed one's result to the other (``FilterVerdicts`` given a list of outcomes);
- a local activity that finished while Temporal answered a query had its result handed over only
  with the next workflow task, after that task's signals; a replay handed it over in the first, so
  the two chose their next batch from different queues.

Either way the replay failed on a nondeterminism error, and after any lost workflow task (a
restart, an eviction, a task refused at continue-as-new) the dispatcher started nothing more."""


@dataclass
class _Queued:
    event: EventSignal
    size: int  # encoded bytes: what it weighs in a continue-as-new input
    cost: int = 0  # bytes its starts will add to the history, as far as the routes tell (_cost)
    digest: str = ""  # set once taken into a batch
    verdicts: dict[str, bool | None] | None = None  # filter source -> EVALUATE_FILTERS' answer
    reloaded: bool = False  # the routes were loaded again for it once: its name named nothing
    loads: int = 0  # route tables loaded before it was queued


def _over_bounds(event: EventSignal, size: int) -> str | None:
    """Why ``event`` is past the bounds the adapters hold events to, or None."""
    for field, text in (("id", event.id), ("name", event.name), ("source", event.source)):
        if len(text) > MAX_KEY_CHARS:
            return f"its {field} is {len(text)} characters, over {MAX_KEY_CHARS}"
    if size > MAX_QUEUED_EVENT_BYTES:
        return f"it is {size} bytes, over {MAX_QUEUED_EVENT_BYTES}"
    return None


def _not_utf8(*texts: str) -> bool:
    """Whether any of ``texts`` cannot be encoded as UTF-8 (a lone surrogate): an event's run
    digest encodes its source and id; its memo and search attributes its name and key too."""
    try:
        for text in texts:
            text.encode()
    except UnicodeEncodeError:
        return True
    return False


# Not sandboxed: the sandbox's import proxies made serialising the continue-as-new input slow
# enough to trip the deadlock detector. This module does no I/O and reads no clock or randomness
# except through `workflow.*`, which is what the sandbox would have enforced.
_MALFORMED = object()  # a signal's argument that could not be decoded


@workflow.defn(name=DISPATCHER_WORKFLOW, sandboxed=False)
class DispatcherWorkflow:
    @workflow.init
    def __init__(self, inp: DispatcherInput) -> None:
        self._queue: deque[_Queued] = deque()
        self._queued_bytes = 0  # the queue's sizes, summed
        self._queued_cost = 0  # and its costs
        self._out_cost = 0  # the costs of the events taken out of it, until their batch is done
        self._routes: RouteTable | None = None
        self._loads = 0  # route tables loaded this run
        self._filter_failures = 0  # EVALUATE_FILTERS calls failed in a row
        self._scheduled = False  # no local activities (NO_LOCAL_ACTIVITIES), set as the run begins
        self._strict = False  # one start's failure is its own (starts.STRICT_STARTS), set as the run begins
        self._metered = False  # templates held to their steps, counted as work (TEMPLATE_STEPS), likewise
        self._each_costs = False  # an event no entry takes costs EVENT_COST (UNROUTABLE_CHARGED), likewise
        self._rendered = 0  # of the work, units of template steps in this batch's planning (_dispatch_batch)
        for raw in inp.pending:
            self._enqueue(_Queued(EventSignal.from_dict(raw), encoded_size(raw)))
        self._recent: OrderedDict[str, None] = OrderedDict.fromkeys(inp.recent)
        self._stats = {k: int(inp.stats.get(k, 0)) for k in STAT_KEYS}
        self._run = inp.run
        self._signals = 0
        self._children = 0  # targets started this run, either way
        self._child_starts = 0  # of which as children: Temporal counts those as pending
        self._spent = 0  # units of work since this workflow task began, as far as we can tell
        self._reload = True
        self._settings = DispatcherSettings()
        self._search_attributes = False  # whether target runs get dispatcher.search's attributes
        self._in_flight: set[asyncio.Task[None]] = set()  # batches being started
        self._local = False  # a batch's starts run in a local activity now
        self._busy: Counter[str] = Counter()  # the ordering keys of the events in those batches
        self._starting = 0  # events in those batches
        self._blocked = False  # the next event signals a run a batch in flight signals too
        self._task_mark = -1  # the history length this workflow task began at
        self._task_bytes = 0  # target arguments sent in this workflow task
        # Events received, not checked yet (or whole signals, undecoded: RawValue), and their weight.
        self._unchecked: deque[tuple[Any, int]] = deque()
        # Those weights, summed: each event at most its signal's bytes (MAX_SIGNAL_BYTES at most)
        # shared among the signal's events. Encoding each as it is left would cost the handler a
        # third of checking it, in the largest activations; weighed as the queue's on average, a
        # few large events behind many small ones told twice the room there was (_accept_bytes).
        self._unchecked_weight = 0
        self._unchecked_signals = 0  # of the unchecked, whole signals not decoded yet
        # Whether this run takes signals raw (RAW_SIGNALS): decided at its first signal when it was
        # begun so (its input), else where a signal first waits after the upgrade.
        self._begun_raw = inp.raw_signals
        self._raw: bool | None = None
        self._ignored = 0  # signals of other names
        self._check_mark = -1  # the history length the workflow task of _checked began at
        self._checked = 0  # bytes of events checked in it

    @workflow.signal(dynamic=True)
    def signals(self, name: str, args: Sequence[RawValue]) -> None:
        """EVENT_SIGNAL: one event or a list of them. Bad items are counted and dropped; the rest
        queue up. Taken as raw payloads (a dynamic handler), so that the SDK decodes none of them:
        one that waits (RAW_SIGNALS) is decoded in its own turn.

        Any number of arguments is taken: a signal sent with none, or several, must not raise
        here (a raising handler fails every workflow task from then on, and the dispatcher stalls).
        A signal of another name is ignored (before, it waited in the SDK for a handler).
        """
        if name != EVENT_SIGNAL:
            self._ignored += 1
            if self._ignored == 1:  # any client of the namespace may send them: one line a run
                workflow.logger.warning("ignored a signal named %s (and any more of other names)", safe(name))
            return
        if self._raw is None:
            # Asked, not taken from the input alone: a worker of the version before, beside this one
            # in a rolling upgrade, may have run this run's first tasks the old way.
            self._raw = self._begun_raw and workflow.patched(RAW_SIGNALS)
        if len(args) != 1:
            # Before the patch the SDK dropped a signal one of whose arguments was no JSON, uncounted.
            if self._raw or all(self._decode(a) is not _MALFORMED for a in args):
                self._signals += 1
                self._stats["malformed"] += 1
                workflow.logger.warning("dropped a signal with %d arguments instead of 1", len(args))
            return
        (raw,) = args
        waits = bool(self._unchecked) or self._checked_now() >= CHECK_TASK_BYTES
        if waits and not self._raw:
            # A run begun before asks where a signal would first wait, so that a worker back after
            # the upgrade takes the backlog that built up meanwhile raw. The patch's name holds the
            # history's length: the SDK keeps a patch's first answer for the run, and replaying a
            # wait from before the upgrade answers no, which would hold for every wait after it.
            self._raw = workflow.patched(f"{RAW_SIGNALS}@{workflow.info().get_current_history_length()}")
        if waits and self._raw and workflow.patched(CHECKS_IN_SLICES):
            self._signals += 1
            self._unchecked.append((raw, MAX_SIGNAL_BYTES))
            self._unchecked_weight += MAX_SIGNAL_BYTES
            self._unchecked_signals += 1
            return
        self._checked_now()
        events = self._decode(raw)
        if events is not _MALFORMED:
            self._signals += 1
            self._take_signal(events)
        elif self._raw:  # before the patch the SDK dropped it, uncounted
            self._signals += 1
            self._stats["malformed"] += 1

    def _decode(self, raw: RawValue) -> Any:
        """A signal's argument, or _MALFORMED when it is no JSON (logged). In a run that takes
        signals raw, a quarter of its bytes counts in this task's checks (decoding costs about a
        quarter of checking the events)."""
        if self._raw:
            self._checked += len(raw.payload.data) // DECODE_SHARE
        try:
            return workflow.payload_converter().from_payload(raw.payload)
        except Exception as exc:
            workflow.logger.warning("dropped a signal whose argument cannot be decoded: %s", safe(exc))
            return _MALFORMED

    def _take_signal(self, events: Any) -> None:
        """Check and queue a signal's events, as many as this task may check; leave the rest."""
        items = events if isinstance(events, list) else [events]
        if len(items) > MAX_SIGNAL_EVENTS and (self._raw or workflow.patched(OVERSIZED_SIGNALS_MALFORMED)):
            # Checked a slice a task, a million non-events took 31,000 tasks: past the history's
            # bound, with continue-as-new held while any waited, Temporal ended the run, queue and all.
            self._stats["malformed"] += 1
            workflow.logger.warning(
                "dropped a signal of %d items (a signal holds %d at most)", len(items), MAX_SIGNAL_EVENTS
            )
            return
        # What one left unchecked weighs in the room: no more than the signal's share of its bytes
        # (a signal is at most MAX_SIGNAL_BYTES), found without encoding it again.
        share = MAX_SIGNAL_BYTES // max(1, len(items))
        for raw in items:
            # Once one waits unchecked, so do those after it: they are queued in their order.
            if self._unchecked or (self._checked_now() >= CHECK_TASK_BYTES and workflow.patched(CHECKS_IN_SLICES)):
                self._unchecked.append((raw, share))
                self._unchecked_weight += share
            else:
                self._check(raw)

    def _check(self, raw: Any) -> None:
        """Queue one event received, or count it malformed; counted in this task's checks (its
        callers have asked :meth:`_checked_now` in this task, which began the count)."""
        try:
            # Patched: on an interpreter whose JSON reads deeper, a run begun before may hold one.
            if nested_deeper(raw, MAX_SIGNAL_DEPTH) and workflow.patched(DEEP_EVENTS_MALFORMED):
                raise ValueError(f"nested deeper than {MAX_SIGNAL_DEPTH}")
            event = EventSignal.from_dict(raw)
            if _not_utf8(event.id, event.name, event.source, event.key or "") and workflow.patched(
                UNENCODABLE_MALFORMED
            ):
                raise ValueError("its id, name, source or key is no UTF-8 text (a lone surrogate)")
            size = encoded_size(raw)
            # What continue-as-new will carry is event.to_dict(): the same size for what the
            # bridge sends, up to 4x more for a bare {"id": 0, "name": "x"} another client
            # of the namespace may send (the fields filled in), which the carry bounds must see.
            carried = encoded_size(event.to_dict())
            if carried > size and workflow.patched(CARRIED_SIZES):
                size = carried
            if (why := _over_bounds(event, max(size, carried))) and workflow.patched(EVENT_BOUNDS_MALFORMED):
                raise ValueError(why)
        except Exception as exc:
            self._checked += CHECK_FAILED_BYTES
            self._stats["malformed"] += 1
            workflow.logger.warning("dropped malformed event: %s", safe(exc))
            return
        self._checked += size
        self._stats["received"] += 1
        self._enqueue(_Queued(event, size))

    def _unchecked_events(self) -> int:
        """Events received and not checked yet: a signal not decoded yet counts as the most it may
        hold (MAX_SIGNAL_EVENTS)."""
        return len(self._unchecked) + self._unchecked_signals * (MAX_SIGNAL_EVENTS - 1)

    def _checked_now(self) -> int:
        """Bytes of events checked in this workflow task (a new task begins with none)."""
        mark = workflow.info().get_current_history_length()
        if mark != self._check_mark:
            self._check_mark = mark
            self._checked = 0
        return self._checked

    async def _check_unchecked(self) -> None:
        """Check the events the handler left, CHECK_TASK_BYTES of them a workflow task: when this
        one has checked as much already, it ends first (a YIELD)."""
        if self._checked_now() >= CHECK_TASK_BYTES:
            await workflow.sleep(YIELD)
        while self._unchecked and self._checked_now() < CHECK_TASK_BYTES:
            raw, share = self._unchecked.popleft()
            self._unchecked_weight -= share
            if not isinstance(raw, RawValue):
                self._check(raw)
            else:
                self._unchecked_signals -= 1
                if (events := self._decode(raw)) is _MALFORMED:
                    self._stats["malformed"] += 1
                    continue
                # Its events go first, in their order, checked as far as this task may check.
                waiting, self._unchecked = self._unchecked, deque()
                self._take_signal(events)
                self._unchecked.extend(waiting)

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
            filter_limited=s["filter_limited"],
            signaled=s["signaled"],
            missing=s["missing"],
            backlog=len(self._queue) + self._starting + self._unchecked_events(),
            history_bytes=workflow.info().get_current_history_size(),
            accept_bytes=self._accept_bytes(),
            starting=self._starting,
            run=self._run,
            signals_this_run=self._signals,
            children_this_run=self._children,
        )

    @workflow.run
    async def run(self, inp: DispatcherInput) -> None:
        self._project = inp.project
        self._shard = inp.shard
        # Asked first, so a run's histories agree on it: runs begun before keep their local activities.
        self._scheduled = workflow.patched(NO_LOCAL_ACTIVITIES)
        self._strict = workflow.patched(starts.STRICT_STARTS)
        self._metered = workflow.patched(TEMPLATE_STEPS)
        self._each_costs = workflow.patched(UNROUTABLE_CHARGED)
        while True:
            if not self._has_work():
                await workflow.wait_condition(self._has_work)
                self._spent = 0  # it waited for a signal: this is a new workflow task
            if self._unchecked:
                await self._check_unchecked()
            if self._reload:
                await self._load_routes()
            if self._routes is None:
                # No table loads: the queue waits for one, and the run still continues-as-new when
                # due, else its history of load attempts grew until Temporal terminated it with
                # everything it held. With a queue it can carry whole (nothing can be drained
                # without a table, and what did not fit would be lost; its intake is held to what
                # fits meanwhile, see _accept_bytes), or else once its history nears Temporal's
                # limit: then it carries what fits, and counts the rest failed, not all of it lost.
                due = self._should_rotate() and (self._carries_all() or self._history_at_drain_bounds())
                if due and not self._unchecked and workflow.patched(ROTATE_WITHOUT_ROUTES):
                    await self._rotate()
                continue
            if self._can_take():
                await self._dispatch_batch()
            if self._should_rotate() and not self._unchecked:
                await self._rotate()

    def _has_work(self) -> bool:
        return self._can_take() or self._reload or self._should_rotate() or bool(self._unchecked)

    def _can_take(self) -> bool:
        """Events are queued, a batch may go in flight, and the first event's key is not in one
        (a later event of a key waits for the earlier one's start: that is per-key order)."""
        if not self._queue or self._blocked or len(self._in_flight) >= self._settings.batches_in_flight:
            return False
        key = self._queue[0].event.key
        return key is None or key not in self._busy

    def _new_task(self) -> None:
        """Reset the per-workflow-task accounts when a new workflow task began (the history grew)."""
        mark = workflow.info().get_current_history_length()
        if mark != self._task_mark:
            self._task_mark = mark
            self._spent = 0
            self._task_bytes = 0

    async def _load_routes(self) -> None:
        """Load (or reload) the route table; on failure keep the old one and never die.

        Without any table yet, events wait in the queue and the load is tried again shortly.
        """
        self._reload = False
        try:
            execute = workflow.execute_activity if self._scheduled else workflow.execute_local_activity
            result: RoutesResult = await execute(
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
                self._spent = 0
                self._reload = True
            return
        self._routes = routes
        self._loads += 1
        self._recost()
        self._settings = result.settings
        self._forget_recent_when_off()
        self._search_attributes = result.search_attributes
        workflow.logger.info("routes loaded run=%d workflows=%d", self._run, len(self._routes.workflows))

    # --- the queue, and what it will cost the history ------------------------------------------

    def _cost(self, item: _Queued) -> int:
        """The history its starts will add, as a scheduled START_TARGETS or a child's arguments: per
        target its event twice (the argument and the envelope) and TARGET_OVERHEAD. Before the
        routes are loaded, one target. With filters for its name, the event once more: the argument
        of the scheduled EVALUATE_FILTERS (NO_LOCAL_ACTIVITIES)."""
        targets = 1 if self._routes is None else self._routes.candidates(item.event.name)
        filtered = self._scheduled and self._routes is not None and bool(self._routes.filters_for(item.event.name))
        return targets * (2 * item.size + TARGET_OVERHEAD) + (item.size if filtered else 0)

    def _enqueue(self, item: _Queued) -> None:
        item.cost = self._cost(item)
        item.loads = self._loads
        self._queue.append(item)
        self._queued_bytes += item.size
        self._queued_cost += item.cost

    def _dequeue(self) -> _Queued:
        item = self._queue.popleft()
        self._queued_bytes -= item.size
        self._queued_cost -= item.cost
        return item

    def _requeue(self, items: list[_Queued]) -> None:
        """Taken ones back at the front of the queue, in their order."""
        self._queue.extendleft(reversed(items))
        self._queued_bytes += sum(i.size for i in items)
        cost = sum(i.cost for i in items)
        self._queued_cost += cost
        self._out_cost -= cost

    def _recost(self) -> None:
        """Each queued event's cost again, with the routes just loaded."""
        self._queued_cost = 0
        for item in self._queue:
            item.cost = self._cost(item)
            self._queued_cost += item.cost

    def _accept_bytes(self) -> int:
        """Bytes of events this run can still take before it could not start what it holds within
        DRAIN_HISTORY_BYTES: what the history holds and its queue will add, FULL_MARGIN kept for the
        signals on their way, and each byte taken weighing as much as the queue's bytes do now (or
        TAKE_WEIGHT with nothing queued). The adapters refuse events (``overloaded``) at 0: a run
        that reached the bound with more queued than it can carry would have to drop them."""
        info = workflow.info()
        # A batch's starts take about ten history events (activity and workflow tasks), a signal one.
        queued = len(self._queue) + self._unchecked_events()
        events = DRAIN_HISTORY_EVENTS - FULL_MARGIN_EVENTS - info.get_current_history_length() - queued // 20
        weight = 1 + self._queued_cost / self._queued_bytes if self._queued_bytes else TAKE_WEIGHT
        # The events out of the queue count until their batch is done: their arguments enter the
        # history only when the workflow task that schedules them completes (then twice, safely).
        # Those not checked yet are in the history once: what their starts will add is the rest.
        unchecked = self._unchecked_weight
        cost = self._queued_cost + self._out_cost + int(unchecked * (weight - 1))
        room = DRAIN_HISTORY_BYTES - FULL_MARGIN - info.get_current_history_size() - cost
        room = int(room / weight)
        if self._routes is None:  # nothing is started or drained until a table loads: at most what it can carry
            room = min(room, self._carry_room() - self._carried_bytes() - unchecked - FULL_MARGIN_CARRY)
        return max(0, room) if events > 0 else 0

    def _history_at_drain_bounds(self) -> bool:
        info = workflow.info()
        return (
            info.get_current_history_length() >= DRAIN_HISTORY_EVENTS
            or info.get_current_history_size() >= DRAIN_HISTORY_BYTES
        )

    def _carried_bytes(self) -> int:
        """The queue as :meth:`_carry` counts it: each event with a separator."""
        return self._queued_bytes + len(self._queue)

    def _carries_all(self) -> bool:
        """Whether continue-as-new would carry the whole queue (:meth:`_carry`)."""
        return self._carried_bytes() <= self._carry_room()

    def _should_rotate(self) -> bool:
        info = workflow.info()
        return (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() >= self._settings.history_events_threshold
            or self._signals >= self._settings.signals_per_run
            or self._children >= self._settings.children_per_run
        )

    async def _dispatch_batch(self) -> None:
        """Take a batch, have its filters evaluated (what the activity did not get to goes back to
        the front of the queue) and put its starts in flight, without waiting for them: up to
        ``batches_in_flight`` batches start at once. At most START_BATCH_BYTES of arguments leave in
        one workflow task, and a batch that starts nothing but used up the work budget ends the
        workflow task with a timer, so the next batch runs in a new one."""
        self._new_task()
        taken = self._take()
        done = await self._evaluate(taken)
        self._requeue(taken[done:])
        plans: list[Plan] = []
        cost = 0  # of the events planned: counted out of the queue until their batch is done
        self._rendered = 0
        for n, item in enumerate(taken[:done]):
            if (
                not item.reloaded
                and self._routes is not None
                and not self._routes.candidates(item.event.name)
                and not (item.loads < self._loads and workflow.patched(ONE_RELOAD_PER_LOAD))
            ):
                # The adapter found a trigger for its name: this table is older than the adapter's
                # (a reload whose signal is behind the event). Load it again first, once, unless a
                # table was loaded since the event came.
                item.reloaded = True
                self._requeue(taken[n:done])
                self._reload = True
                break
            if self._signals_busy(item):  # it and those behind it wait for that batch
                self._requeue(taken[n:done])
                self._blocked = True
                break
            plans.extend(self._plan(item))
            cost += item.cost
            if self._rendered >= TASK_COST_BUDGET and n + 1 < done:
                # Their templates' turn is the next task's; their filters' verdicts go back with them.
                self._requeue(taken[n + 1 : done])
                break
        if plans:
            self._children += len(plans)
            self._launch(plans, cost)
        else:
            self._out_cost -= cost
            if self._spent >= TASK_COST_BUDGET and self._queue:
                await workflow.sleep(YIELD)
                self._spent = 0

    def _signals_busy(self, item: _Queued) -> bool:
        """Whether a run this event may signal is signalled by a batch in flight (its order with
        the events before it would not hold). Filters are not asked: a maybe is a yes."""
        assert self._routes is not None
        with self._rendering():
            for w in self._routes.workflows:
                if w.signal is not None and any(True for _ in w.triggered_by(item.event.name)):
                    try:
                        if _RUN + w.signal.render_id(item.event) in self._busy:
                            return True
                    except Exception:  # counted as failed when planned
                        continue
        return False

    @contextlib.contextmanager
    def _rendering(self) -> Iterator[None]:
        """Templates rendered inside (for one event) are held to MAX_STEPS each and EVENT_STEPS
        together, and their steps count as this task's work, in runs begun since TEMPLATE_STEPS;
        in runs begun before, neither."""
        if not self._metered:
            with templates.metered(None):
                yield
            return
        with templates.metered(templates.MAX_STEPS, EVENT_STEPS) as meter:
            try:
                yield
            finally:
                units = meter.steps // STEPS_PER_UNIT
                self._spent += units
                self._rendered += units

    def _launch(self, plans: list[Plan], cost: int) -> None:
        """Start a batch in the background; its keys, and the runs it signals, are busy until every
        start in it answered, and its events count as starting (and their ``cost`` as out of the
        queue: the arguments may not be in the history yet)."""
        keys = [p.event.key for p in plans if p.event.key is not None]
        keys += [_RUN + p.start.id for p in plans if p.start.signal is not None]
        self._busy.update(keys)
        events = len({id(p.event) for p in plans})  # an event's plans share its EventSignal
        self._starting += events
        task = asyncio.create_task(self._start_batch(plans))
        self._in_flight.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._in_flight.discard(task)
            self._starting -= events
            self._out_cost -= cost
            self._blocked = False  # whatever waited may go now, or finds what it waits for again
            self._busy.subtract(keys)
            for key in keys:
                if self._busy[key] <= 0:
                    del self._busy[key]
            if not task.cancelled() and task.exception() is not None:  # a bug: starts count their own failures
                workflow.logger.error("a batch of %d starts failed: %s", len(plans), safe(task.exception(), 500))

        task.add_done_callback(done)

    async def _start_batch(self, plans: list[Plan]) -> None:
        """The batch's chunks one after another, so its starts keep their order; each chunk leaves
        in a workflow task whose arguments, with other batches' chunks, stay in START_BATCH_BYTES
        (Temporal terminates a run whose one workflow task sends over 4 MiB)."""
        for chunk in starts.chunks(plans):
            await self._task_room(sum(p.size for p in chunk))
            await self._start(chunk)

    async def _task_room(self, size: int) -> None:
        """Wait until ``size`` more bytes of activity arguments fit in this workflow task's
        START_BATCH_BYTES (the first always does), each wait a YIELD that ends the task; then count
        them in it."""
        self._new_task()
        while self._task_bytes and self._task_bytes + size > START_BATCH_BYTES:
            await workflow.sleep(YIELD)  # it leaves in a new workflow task
            self._new_task()
        self._task_bytes += size

    def _take(self) -> list[_Queued]:
        """Events from the front of the queue, skipping recent duplicates, while the most targets
        they may start (and the bytes of their arguments) fit in one batch."""
        assert self._routes is not None
        taken: list[_Queued] = []
        digests: set[str] = set()
        targets = size = skipped = 0
        while self._queue and self._spent < TASK_COST_BUDGET:
            item = self._queue[0]
            if _not_utf8(item.event.source, item.event.id):
                # Queued before UNENCODABLE_MALFORMED (a run's history before it holds no task that
                # took one: its digest failed that task), or carried from a run begun before it. Only
                # the digest's parts: one with a name or key of that kind was taken, and planned.
                self._dequeue()
                self._stats["malformed"] += 1
                workflow.logger.warning("dropped malformed event: its id or source is no UTF-8 text")
                continue
            digest = run_digest(self._project, item.event.source, item.event.id)
            if digest in self._recent or digest in digests:
                self._dequeue()
                self._spent += EVENT_COST
                self._stats["duplicates"] += 1
                skipped += 1
                workflow.logger.debug(
                    "duplicate event skipped id=%s name=%s", safe(item.event.id), safe(item.event.name)
                )
                continue
            if item.event.key is not None and item.event.key in self._busy:
                break  # an earlier event with its key is still being started
            most = self._routes.candidates(item.event.name)
            weight = most * 2 * item.size  # each argument holds the payload twice
            if taken and (targets + most > self._settings.batch_size or size + weight > START_BATCH_BYTES):
                break
            self._dequeue()
            self._out_cost += item.cost
            if self._each_costs and not most:  # one that may start something is bounded by batch_size
                self._spent += EVENT_COST
            item.digest = digest
            digests.add(digest)
            taken.append(item)
            targets += most
            size += weight
        if skipped:
            workflow.logger.info("skipped %d duplicate events (redelivered or resent ids)", skipped)
        return taken

    async def _evaluate(self, taken: list[_Queued]) -> int:
        """Evaluate the batch's filters in EVALUATE_FILTERS; how many events of ``taken`` (from the
        front) are ready to plan: all, or those before the first the activity did not get to."""
        assert self._routes is not None
        need = [(i, item, self._routes.filters_for(item.event.name)) for i, item in enumerate(taken)]
        need = [(i, item, sources) for i, item, sources in need if sources]
        if not need:
            return len(taken)
        every = need
        if self._scheduled:  # its argument is in the history, beside the starts' arguments
            sizes = [item.size + sum(len(src.encode()) + 4 for src in sources) for _, item, sources in need]
            fit, total = 1, sizes[0]
            while fit < len(need) and total + sizes[fit] <= START_BATCH_BYTES:
                total += sizes[fit]
                fit += 1
            need = need[:fit]  # the rest go back to the queue, as those a budget left out
            await self._task_room(total)
        try:
            execute = workflow.execute_activity if self._scheduled else workflow.execute_local_activity
            result: FilterVerdicts = await execute(
                EVALUATE_FILTERS,
                wire(FilterBatch([item.event.to_dict() for _, item, _ in need], [sources for _, _, sources in need])),
                result_type=FilterVerdicts,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=3, maximum_interval=timedelta(seconds=2)),
            )
        except Exception as exc:  # after its retries
            self._filter_failures += 1
            # Back to the queue, and evaluated again after a pause (a worker too busy to answer in
            # time, most likely). The order of the checks keeps the histories of earlier versions.
            if workflow.patched(FILTERS_RETRIED) and (
                self._filter_failures <= FILTER_ROUNDS or workflow.patched(FILTERS_RETRIED_ALWAYS)
            ):
                pause = FILTER_RETRY if self._filter_failures <= FILTER_ROUNDS else FILTER_RETRY_LONG
                workflow.logger.error(
                    "evaluating filters failed for %d events (%d in a row), trying again in %s: %s",
                    len(need),
                    self._filter_failures,
                    pause,
                    safe(exc, 500),
                )
                await workflow.sleep(pause)
                self._spent = 0
                return 0
            workflow.logger.error(
                "evaluating filters failed for %d events, which count as not matched: %s", len(need), safe(exc, 500)
            )
            result = FilterVerdicts([[None] * len(sources) for _, _, sources in need])
        else:
            self._filter_failures = 0
        self._spent += result.cost
        for (_, item, sources), verdicts in zip(need, result.verdicts, strict=False):
            item.verdicts = dict(zip(sources, verdicts, strict=True))
        return every[len(result.verdicts)][0] if len(result.verdicts) < len(every) else len(taken)

    def _plan(self, item: _Queued) -> list[Plan]:
        """The starts one event needs (its work is added to the workflow task's account)."""
        with self._rendering():
            return self._plan_event(item)

    def _plan_event(self, item: _Queued) -> list[Plan]:
        assert self._routes is not None
        event = item.event
        self._remember(item.digest)
        self._spent += EVENT_COST
        try:
            routing = self._routes.route(event, item.verdicts or {})
        except Exception as exc:
            self._stats["failed"] += 1
            workflow.logger.error("routing failed id=%s name=%s: %s", safe(event.id), safe(event.name), safe(exc))
            return []
        if routing.limited:
            self._stats["filter_limited"] += len(routing.limited)
            workflow.logger.warning(
                "filter budget spent, not matched id=%s name=%s workflows=%s",
                safe(event.id),
                safe(event.name),
                safe(",".join(routing.limited)),
            )
        if not routing.targets:
            self._stats["unroutable"] += 1
            workflow.logger.info("no target for event id=%s name=%s", safe(event.id), safe(event.name))
            return []
        plans = []
        for target in routing.targets:
            plan = self._plan_target(item, target)
            if plan is not None:
                plans.append(plan)
                self._spent += plan.size // 1024  # encoding it costs about a unit per KiB
        return plans

    def _plan_target(self, item: _Queued, target: Target) -> Plan | None:
        try:
            info = workflow.info()
            dispatcher = {"dispatcher": info.workflow_id, "dispatcher_run": info.run_id}
            found = search.values(item.event, self._project) if self._search_attributes else None
            if target.signal is not None:
                assert self._routes is not None
                why = target.signal.reserved(target.signal.render_id(item.event), self._routes.starting)
                if why is not None and workflow.patched(RESERVED_SIGNAL_IDS):
                    raise ValueError(why)
            uid = str(workflow.uuid4())
            return starts.plan(item.event, item.size, item.digest, target, uid, dispatcher, found, strict=self._strict)
        except Exception as exc:  # an input template that fails, an argument too large: counted
            self._count(failed(str(exc)), target_workflow_id(target.workflow_id, item.digest), item.event)
            return None

    async def _start(self, plans: list[Plan]) -> None:
        """As children, or (start mode ``activity``, or past CHILD_LIMIT children) by activity.
        Signals always go by activity: only the client sets the request id Temporal dedupes by."""
        children = [p for p in plans if p.start.signal is None]
        if self._settings.start_mode == "child" and children and self._child_starts + len(children) <= CHILD_LIMIT:
            self._child_starts += len(children)
            rest = [p for p in plans if p.start.signal is not None]
            signals = starts.by_activity(rest, self._count, strict=self._strict)
            await asyncio.gather(starts.as_children(children, self._count), signals)
            return
        # In a run begun before NO_LOCAL_ACTIVITIES, a local activity for a small batch with nothing
        # waiting behind it while no other one runs (starts.is_local). The patch is asked where it
        # was when it came in, so that runs begun since replay alike.
        local = not self._scheduled and not self._queue and not self._local and workflow.patched(starts.LOCAL_STARTS)
        local = local and starts.is_local(plans)
        if local and starts.needs_scheduling(plans) and workflow.patched(starts.SIGNAL_STARTS_SCHEDULED):
            local = False
        self._local = self._local or local
        try:
            await starts.by_activity(plans, self._count, local=local, strict=self._strict)
        finally:
            if local:
                self._local = False

    def _count(self, outcome: str, child_id: str, event: EventSignal) -> None:
        if outcome == STARTED:
            self._stats["started"] += 1
        elif outcome in (SIGNALED, SIGNAL_STARTED):
            self._stats["signaled"] += 1
            self._stats["started"] += outcome == SIGNAL_STARTED
        elif outcome == MISSING:
            self._stats["missing"] += 1
            workflow.logger.info(
                "no open run to signal, event dropped workflow_id=%s event=%s name=%s",
                safe(child_id),
                safe(event.id),
                safe(event.name),
            )
        elif outcome == DUPLICATE:
            self._stats["duplicates"] += 1
            workflow.logger.debug("duplicate start refused child=%s event=%s", safe(child_id), safe(event.id))
        else:
            self._stats["failed"] += 1
            workflow.logger.error(
                "start failed child=%s event=%s: %s", safe(child_id), safe(event.id), safe(outcome, 500)
            )

    def _forget_recent_when_off(self) -> None:
        """``recent_ids: 0``: the digests carried from runs that kept some are forgotten as the
        table that says so loads, before any batch is taken (kept, they skipped their ids for good)."""
        if self._settings.recent_ids <= 0 and self._recent and workflow.patched(NO_RECENT_CLEARS):
            self._recent.clear()

    def _remember(self, digest: str) -> None:
        limit = self._settings.recent_ids
        if limit <= 0:
            return
        self._recent[digest] = None
        while len(self._recent) > limit:
            self._recent.popitem(last=False)

    def _must_drain(self) -> bool:
        """Whether to dispatch more before continuing-as-new (see DRAIN_* in the contract)."""
        queued = self._carried_bytes()
        if queued <= CARRY_LIMIT_BYTES or self._history_at_drain_bounds():
            return False
        return workflow.info().get_current_history_size() < DRAIN_SOFT_BYTES or queued > self._carry_room()

    def _carry_room(self) -> int:
        return MAX_CARRY_BYTES - CARRY_RESERVE - sum(len(d) + 3 for d in self._recent)

    async def _rotate(self) -> None:
        """Continue-as-new with the queue, once handlers finished and every start is confirmed.

        A queue over CARRY_LIMIT_BYTES is dispatched first, within the DRAIN_* bounds
        (:meth:`_must_drain`); then it is carried up to MAX_CARRY_BYTES (:meth:`_carry`).
        """
        while True:
            await workflow.wait_condition(lambda: not self._in_flight and workflow.all_handlers_finished())
            if self._unchecked:  # received meanwhile: carried, they would go unchecked into the next run
                await self._check_unchecked()
                continue
            if self._routes is None or not self._must_drain():
                break
            if self._reload and workflow.patched(DRAIN_RELOADS):
                await self._load_routes()
            await self._dispatch_batch()
        pending = self._carry()
        workflow.logger.info(
            "continuing as new run=%d carried=%d signals=%d children=%d history=%d",
            self._run,
            len(pending),
            self._signals,
            self._children,
            workflow.info().get_current_history_length(),
        )
        workflow.continue_as_new(
            wire(
                DispatcherInput(
                    project=self._project,
                    shard=self._shard,
                    run=self._run + 1,
                    pending=pending,
                    recent=list(self._recent),
                    stats=dict(self._stats),
                    raw_signals=True,
                )
            )
        )

    def _carry(self) -> list[dict[str, Any]]:
        """The queue, oldest first, as far as it fits in MAX_CARRY_BYTES beside the recent ids. Only
        a run that hit the DRAIN_* bounds with still more queued leaves the newest behind, each
        counted failed and logged: terminated by Temporal, the run would lose them all."""
        room = self._carry_room()
        pending: list[dict[str, Any]] = []
        for item in self._queue:
            room -= item.size + 1
            if room < 0:
                self._count(failed("the dispatcher could not carry it into its next run"), "-", item.event)
            else:
                pending.append(item.event.to_dict())
        return pending
