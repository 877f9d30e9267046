"""The dispatcher's contract: every name, input, result and limit that crosses between processes.

A client that signals the dispatcher, the worker that runs it, the activities it calls, the
target workflows it starts and an operator's tooling all agree through this module and nothing
else: no other module defines a workflow, signal, query or activity name, a payload dataclass or
a default of its own. How the names are used is in docs/operations.md; the ``dispatcher:``
settings are described in docs/configuration.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from datetime import timedelta
from typing import Any, Literal, TypedDict

from slugify import slugify
from temporalio.converter import DataConverter

from bridge.config import DispatcherConfig
from bridge.event import MAX_SIGNAL_BYTES, EventSignal
from bridge.logsafe import safe

__all__ = [
    "BATCH_MEMO",
    "CARRY_LIMIT_BYTES",
    "CARRY_RESERVE",
    "CHILD_LIMIT",
    "DISPATCHER_WORKFLOW",
    "DRAIN_HISTORY_BYTES",
    "DRAIN_HISTORY_EVENTS",
    "DRAIN_SOFT_BYTES",
    "DUPLICATE",
    "EVALUATE_FILTERS",
    "EVENT_COST",
    "EVENT_SIGNAL",
    "FULL_MARGIN",
    "FULL_MARGIN_CARRY",
    "FULL_MARGIN_EVENTS",
    "HTTP_REQUEST",
    "LOAD_ROUTES",
    "LOAD_TASKS",
    "MAX_CARRY_BYTES",
    "MAX_SIGNAL_BYTES",
    "MAX_SIGNAL_EVENTS",
    "MAX_TARGET_BYTES",
    "MISSING",
    "RELOAD_SIGNAL",
    "RUNNER_WORKFLOW",
    "SIGNALED",
    "SIGNAL_STARTED",
    "STARTED",
    "START_BATCH_BYTES",
    "START_TARGETS",
    "STATS_QUERY",
    "STAT_KEYS",
    "TAKE_WEIGHT",
    "TARGET_OVERHEAD",
    "TASK_COST_BUDGET",
    "TEMPLATE_STEPS",
    "YIELD",
    "DispatcherInput",
    "DispatcherSettings",
    "DispatcherStats",
    "FilterBatch",
    "FilterVerdicts",
    "HttpCall",
    "RoutesResult",
    "StartBatch",
    "StartMode",
    "TargetInput",
    "TargetStart",
    "dispatcher_id",
    "encoded_as_sdk",
    "failed",
    "target_memo",
    "wire",
]

# Workflow types, signals and queries.
DISPATCHER_WORKFLOW = "SignalBridgeDispatcher"
RUNNER_WORKFLOW = "SignalBridgeTasks"  # started for a route whose ``workflow_type`` is None
EVENT_SIGNAL = "event_channel"  # argument: one event as a dict, or a list of them
RELOAD_SIGNAL = "reload"  # no argument: load the route table again
STATS_QUERY = "stats"  # answers a DispatcherStats

# Activities. LOAD_ROUTES, LOAD_TASKS and EVALUATE_FILTERS read the worker's current config snapshot;
# the dispatcher schedules its activities ("local" below: as a dispatcher run begun before
# workflow.NO_LOCAL_ACTIVITIES ran them, and the runner still does).
LOAD_ROUTES = "signal-bridge.load_routes"  # () -> RoutesResult, local
LOAD_TASKS = "signal-bridge.load_tasks"  # (workflow id) -> the entry's tasks as dicts, local; each
# http task's timeout_seconds is its effective one (the least of its own and runner.timeout_seconds)
START_TARGETS = "signal-bridge.start_targets"  # (StartBatch) -> one outcome per start
EVALUATE_FILTERS = "signal-bridge.evaluate_filters"  # (FilterBatch) -> FilterVerdicts, local
HTTP_REQUEST = "signal-bridge.http_request"  # (HttpCall) -> {"status", "body"}

# Outcomes of START_TARGETS, one per TargetStart, in order.
STARTED = "started"
DUPLICATE = "duplicate"  # a run with that id exists or existed: Temporal refused the start
SIGNALED = "signaled"  # an open run got the signal (or had it already: Temporal dedupes by request id)
SIGNAL_STARTED = "signaled: started"  # no open run: signal-with-start started one with the signal
MISSING = "missing"  # no open run, and the entry says if_missing: skip


def failed(reason: str) -> str:
    """The outcome of a start Temporal refused for another reason; it is counted, not retried."""
    return f"failed: {reason}"


# Payload bounds, all under Temporal's 2 MiB per payload and 4 MB per workflow task completion.
# MAX_SIGNAL_BYTES is the core's (the pipeline refuses a larger event before it reaches the client).
MAX_SIGNAL_EVENTS = 500  # events in one EVENT_SIGNAL
CARRY_LIMIT_BYTES = 512 * 1024  # the queue a DispatcherInput carries into the next run, normally
MAX_CARRY_BYTES = 1792 * 1024  # the whole DispatcherInput, at most (see DRAIN_* below)
CARRY_RESERVE = 4096  # of it, kept for all but the queue and the recent ids (project, stats, counters)
START_BATCH_BYTES = 1024 * 1024  # target arguments in one StartBatch, and started in one batch
MAX_TARGET_BYTES = 1920 * 1024  # one target's argument; a larger one is a failed start, never sent

# Work in one workflow task, in the units of bridge.filters (about 10 µs each): EVALUATE_FILTERS
# stops past TASK_COST_BUDGET (it answers for the events it got to), a batch stops taking events
# past it, and a batch that started nothing then ends the workflow task with a short timer.
TASK_COST_BUDGET = 40_000
# The patch from which a workflow holds each template it renders to bridge.templates.MAX_STEPS
# (asked as a run begins, so that runs begun before render as they did): the dispatcher's, whose
# start of that target then fails (counted), and the runner's, whose run then fails.
TEMPLATE_STEPS = "template-steps"
EVENT_COST = 20  # each event's own share (digest, dedupe, logging), besides its filters
YIELD = timedelta(milliseconds=1)

# Continue-as-new: when the queue is over CARRY_LIMIT_BYTES, the run dispatches it first, batch by
# batch: while its history is under DRAIN_SOFT_BYTES (a longer one makes every replay slower), and
# past that only what MAX_CARRY_BYTES cannot hold, and never past the DRAIN_HISTORY_* bounds
# (Temporal terminates a run at 51,200 events or 50 MiB). Child starts past CHILD_LIMIT in one run
# (Temporal allows 2,000 pending children) go through START_TARGETS instead.
DRAIN_SOFT_BYTES = 4 * 1024 * 1024
DRAIN_HISTORY_EVENTS = 45_000
DRAIN_HISTORY_BYTES = 40 * 1024 * 1024

# So that no run reaches those bounds with more queued than it can carry, the adapters stop taking
# events for a dispatcher whose STATS_QUERY answers ``accept_bytes: 0`` (see the workflow's
# _accept_bytes). An event queued costs the history its signal's bytes, and each of its targets'
# starts about twice its bytes plus TARGET_OVERHEAD (the memo, the search attributes, the ids:
# measured about 440 bytes on a dev server). FULL_MARGIN is kept for what arrives between two
# looks at the answer; TAKE_WEIGHT is what a byte taken weighs while nothing is queued.
TARGET_OVERHEAD = 512
FULL_MARGIN = 12 * 1024 * 1024
FULL_MARGIN_EVENTS = 10_000
FULL_MARGIN_CARRY = 256 * 1024
"""Without a route table, the carry room kept for the signals already on their way when the
adapters last read the dispatcher's room."""
TAKE_WEIGHT = 6.0
CHILD_LIMIT = 1900

# Counters the stats query reports and continue-as-new carries over.
STAT_KEYS = (
    "received",
    "started",
    "duplicates",
    "unroutable",
    "failed",
    "malformed",
    "filter_limited",
    "signaled",
    "missing",
)

StartMode = Literal["child", "activity"]


def wire(value: Any) -> Any:
    """A dataclass argument as plain dicts, for a workflow to pass to Temporal.

    The JSON converter would encode a dataclass through ``dataclasses.asdict``, which deep-copies
    every payload inside it first (about 100 ms per MiB); plain dicts are encoded as they are, and
    the receiving side still decodes them into the dataclass its signature names.
    """
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: wire(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, list) and value and is_dataclass(value[0]):
        return [wire(v) for v in value]
    return value


def dispatcher_id(project: str, shard: int, shards: int) -> str:
    """``dispatcher-{slug}``, with ``-{shard}`` appended when there is more than one shard."""
    base = f"dispatcher-{slugify(project)}"
    return base if shards == 1 else f"{base}-{shard}"


_DEFAULTS = DispatcherConfig()


@dataclass(frozen=True)
class DispatcherSettings:
    """What the dispatcher reads from ``dispatcher:``; the defaults are the config model's own."""

    shards: int = _DEFAULTS.shards
    start_mode: StartMode = _DEFAULTS.start_mode
    batch_size: int = _DEFAULTS.batch_size
    batches_in_flight: int = _DEFAULTS.batches_in_flight
    history_events_threshold: int = _DEFAULTS.history_events_threshold
    signals_per_run: int = _DEFAULTS.signals_per_run
    children_per_run: int = _DEFAULTS.children_per_run
    recent_ids: int = _DEFAULTS.recent_ids

    @classmethod
    def from_config(cls, config: DispatcherConfig) -> DispatcherSettings:
        # Only what the workflow reads: process-side settings (max_pending_events) stay out.
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DispatcherInput:
    """The dispatcher's one argument; continue-as-new carries the queue and recent ids in it."""

    project: str
    shard: int = 0
    run: int = 1
    pending: list[dict[str, Any]] = field(default_factory=list)  # EventSignal.to_dict() each
    recent: list[str] = field(default_factory=list)  # event digests, oldest first
    stats: dict[str, int] = field(default_factory=dict)  # STAT_KEYS
    # Set by what starts a run from this version on (the client, continue-as-new): the run takes
    # its signals raw from the first (dispatcher.workflow.RAW_SIGNALS). A run begun before reads
    # False, as its replay must, and asks the patch where a signal first waits.
    raw_signals: bool = False


class DispatcherStats(TypedDict):
    """The answer to STATS_QUERY: the STAT_KEYS counters since the first run, and this run's state."""

    received: int
    started: int
    duplicates: int
    unroutable: int
    failed: int
    malformed: int
    filter_limited: int
    signaled: int  # signals delivered to open runs (or that started one: if_missing: start)
    missing: int  # signals not sent: no open run, if_missing: skip
    backlog: int  # events received and not done: queued, or their starts in flight
    history_bytes: int  # this run's history
    accept_bytes: int  # bytes of events it can still take (0: the adapters refuse, overloaded)
    starting: int  # of which their starts are in flight
    run: int
    signals_this_run: int
    children_this_run: int


@dataclass
class RoutesResult:
    """What LOAD_ROUTES answers: ``RouteTable.spec()`` of the current snapshot, and the settings."""

    routes: dict[str, Any]
    settings: DispatcherSettings = field(default_factory=DispatcherSettings)
    search_attributes: bool = False  # the worker found the namespace's SignalBridge* attributes


class TargetInput(TypedDict):
    """The argument every target run gets (seed Step 5); the built-in runner reads it too."""

    workflow_id: str  # the config entry's id
    exec_id: str
    input: Any  # the entry's rendered ``input``, or the payload when it has none
    trigger: dict[str, Any]  # the event's payload
    event: dict[str, Any]  # EventSignal.envelope()


# The memo key START_TARGETS adds to each run it starts: the activity id of its batch, which is the
# same on every attempt and on a re-run of the workflow task that scheduled it (its sequence number).
# A start refused because the run exists is the batch's own earlier start when the memos are equal.
BATCH_MEMO = "dispatcher_batch"


def target_memo(event: EventSignal, dispatcher: dict[str, str], entry: str) -> dict[str, str]:
    """The memo on every target run, so an operator can find which event and workflow entry started
    it, and the dispatcher that did (``dispatcher``: its workflow id, ``dispatcher_run``: the run)."""
    return {
        "event_name": event.name,
        "event_id": event.id,
        "event_source": event.source,
        "workflow_entry": entry,
        **dispatcher,
    }


@dataclass
class TargetStart:
    """One start of a target run from the START_TARGETS activity."""

    id: str
    workflow_type: str
    task_queue: str
    arg: TargetInput
    memo: dict[str, str]
    key: str | None = None  # the event's ordering key: starts with one key are made one by one
    # A signal to the open run ``id`` instead of a start (signal-with-start when ``if_missing`` is
    # "start"), with ``request_id``, which Temporal dedupes for the life of the run.
    signal: str | None = None
    if_missing: str = "skip"
    request_id: str | None = None
    search: dict[str, str] | None = None  # dispatcher.search.values(), when the namespace has them


@dataclass
class StartBatch:
    starts: list[TargetStart]


@dataclass
class FilterBatch:
    """The input of EVALUATE_FILTERS: events, and for each the filter sources to evaluate."""

    events: list[dict[str, Any]]  # EventSignal.to_dict() each
    filters: list[list[str]]


@dataclass
class FilterVerdicts:
    """For the first ``len(verdicts)`` events of a FilterBatch (at least one; the rest did not fit
    the budget), one verdict per filter: True, False, or None when the filter's budget ran out."""

    verdicts: list[list[bool | None]]
    cost: int = 0  # units spent


@dataclass
class HttpCall:
    """The input of HTTP_REQUEST: which task to run, and the names its templates read.

    Not the request itself: the activity reads the task's config (``${VAR}`` references and all)
    from the worker's current snapshot, substitutes the environment, renders the templates against
    ``context`` and only then calls, so no substituted secret is ever in Temporal's history.
    """

    workflow_id: str  # the config entry's id
    task_id: str
    context: dict[str, Any]  # of TargetInput's names and ``tasks``, those the task's templates use
    timeout_seconds: float  # the run's view of the task's effective timeout (see LOAD_TASKS)


def encoded_as_sdk(value: Any, what: str) -> int:
    """Bytes of ``value`` as the SDK's converter writes a payload (keys sorted, its own types: a
    dict's ``keys()`` as an array); ValueError, saying that ``what`` renders a value JSON cannot
    hold, when it cannot (a method, a set, keys of mixed types, an integer past 4,300 digits)."""
    try:
        return len(DataConverter.default.payload_converter.to_payloads([value])[0].data)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{what} renders a value JSON cannot hold: {safe(exc, 300)}") from None
