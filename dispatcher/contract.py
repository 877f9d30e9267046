"""The dispatcher's contract: every name, input, result and limit that crosses between processes.

A client that signals the dispatcher, the worker that runs it, the activities it calls, the
target workflows it starts and an operator's tooling all agree through this module and nothing
else: no other module defines a workflow, signal, query or activity name, a payload dataclass or
a default of its own. How the names are used is in docs/operations.md; the ``dispatcher:``
settings are described in docs/configuration.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, TypedDict

from slugify import slugify

from bridge.config import DispatcherConfig
from bridge.event import MAX_SIGNAL_BYTES, EventSignal

__all__ = [
    "CARRY_LIMIT_BYTES",
    "DISPATCHER_WORKFLOW",
    "DUPLICATE",
    "EVENT_SIGNAL",
    "HTTP_REQUEST",
    "LOAD_ROUTES",
    "LOAD_TASKS",
    "MAX_SIGNAL_BYTES",
    "MAX_SIGNAL_EVENTS",
    "RELOAD_SIGNAL",
    "RUNNER_WORKFLOW",
    "STARTED",
    "START_BATCH_BYTES",
    "START_TARGETS",
    "STATS_QUERY",
    "STAT_KEYS",
    "DispatcherInput",
    "DispatcherSettings",
    "DispatcherStats",
    "HttpRequest",
    "RoutesResult",
    "StartBatch",
    "StartMode",
    "TargetInput",
    "TargetStart",
    "dispatcher_id",
    "failed",
    "target_memo",
]

# Workflow types, signals and queries.
DISPATCHER_WORKFLOW = "SignalBridgeDispatcher"
RUNNER_WORKFLOW = "SignalBridgeTasks"  # started for a route whose ``workflow_type`` is None
EVENT_SIGNAL = "event_channel"  # argument: one event as a dict, or a list of them
RELOAD_SIGNAL = "reload"  # no argument: load the route table again
STATS_QUERY = "stats"  # answers a DispatcherStats

# Activities: the local ones read the worker's current config snapshot.
LOAD_ROUTES = "signal-bridge.load_routes"  # () -> RoutesResult, local
LOAD_TASKS = "signal-bridge.load_tasks"  # (workflow id) -> the entry's tasks as dicts, local
START_TARGETS = "signal-bridge.start_targets"  # (StartBatch) -> one outcome per start
HTTP_REQUEST = "signal-bridge.http_request"  # (HttpRequest) -> {"status", "body"}

# Outcomes of START_TARGETS, one per TargetStart, in order.
STARTED = "started"
DUPLICATE = "duplicate"  # a run with that id exists or existed: Temporal refused the start


def failed(reason: str) -> str:
    """The outcome of a start Temporal refused for another reason; it is counted, not retried."""
    return f"failed: {reason}"


# Payload bounds, all well under Temporal's 2 MiB per payload. MAX_SIGNAL_BYTES is the core's
# (the pipeline refuses a larger event before it reaches the client).
MAX_SIGNAL_EVENTS = 500  # events in one EVENT_SIGNAL
CARRY_LIMIT_BYTES = 512 * 1024  # the queue a DispatcherInput carries into the next run
START_BATCH_BYTES = 1024 * 1024  # target arguments in one StartBatch

# Counters the stats query reports and continue-as-new carries over.
STAT_KEYS = ("received", "started", "duplicates", "unroutable", "failed", "malformed")

StartMode = Literal["child", "activity"]


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


class DispatcherStats(TypedDict):
    """The answer to STATS_QUERY: the STAT_KEYS counters since the first run, and this run's state."""

    received: int
    started: int
    duplicates: int
    unroutable: int
    failed: int
    malformed: int
    backlog: int
    run: int
    signals_this_run: int
    children_this_run: int


@dataclass
class RoutesResult:
    """What LOAD_ROUTES answers: ``RouteTable.spec()`` of the current snapshot, and the settings."""

    routes: dict[str, Any]
    settings: DispatcherSettings = field(default_factory=DispatcherSettings)


class TargetInput(TypedDict):
    """The argument every target run gets (seed Step 5); the built-in runner reads it too."""

    workflow_id: str  # the config entry's id
    exec_id: str
    input: Any  # the entry's rendered ``input``, or the payload when it has none
    trigger: dict[str, Any]  # the event's payload
    event: dict[str, Any]  # EventSignal.envelope()


def target_memo(event: EventSignal) -> dict[str, str]:
    """The memo on every target run, so an operator can find which event started it."""
    return {"event_name": event.name, "event_id": event.id, "event_source": event.source}


@dataclass
class TargetStart:
    """One start of a target run from the START_TARGETS activity."""

    id: str
    workflow_type: str
    task_queue: str
    arg: TargetInput
    memo: dict[str, str]


@dataclass
class StartBatch:
    starts: list[TargetStart]


@dataclass
class HttpRequest:
    """The input of HTTP_REQUEST; the runner fills every field from an ``http`` task's config."""

    url: str
    method: str
    timeout_seconds: float
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
