"""The dispatcher's contract: the names, inputs and settings that cross between processes.

Everything a client, a worker or an operator's tooling must agree on lives here: the workflow
types, the signal and query names, the dispatcher's input and the typed settings it reads from the
config. See docs/operations.md for how they are used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from slugify import slugify

from bridge.config import DispatcherConfig

DISPATCHER_WORKFLOW = "SignalBridgeDispatcher"
RUNNER_WORKFLOW = "SignalBridgeTasks"
EVENT_SIGNAL = "event_channel"
RELOAD_SIGNAL = "reload"
STATS_QUERY = "stats"

START_TARGETS = "signal-bridge.start_targets"
LOAD_ROUTES = "signal-bridge.load_routes"
LOAD_TASKS = "signal-bridge.load_tasks"
HTTP_REQUEST = "signal-bridge.http_request"

STAT_KEYS = ("received", "started", "duplicates", "unroutable", "failed", "malformed")


def dispatcher_id(project: str, shard: int, shards: int) -> str:
    """``dispatcher-{slug}``, with ``-{shard}`` appended when there is more than one shard."""
    base = f"dispatcher-{slugify(project)}"
    return base if shards == 1 else f"{base}-{shard}"


@dataclass(frozen=True)
class DispatcherSettings:
    """What the dispatcher workflow reads from ``dispatcher:`` (see docs/configuration.md)."""

    shards: int = 1
    start_mode: str = "child"
    batch_size: int = 200
    history_events_threshold: int = 4096
    signals_per_run: int = 5000
    children_per_run: int = 1000
    recent_ids: int = 2000

    @classmethod
    def from_config(cls, config: DispatcherConfig) -> DispatcherSettings:
        return cls(**config.model_dump())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DispatcherInput:
    """The dispatcher's one argument; continue-as-new carries the queue and recent ids in it."""

    project: str
    shard: int = 0
    run: int = 1
    pending: list[dict[str, Any]] = field(default_factory=list)
    recent: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)


@dataclass
class RoutesResult:
    """What the dispatcher loads from the worker's current config snapshot."""

    routes: dict[str, Any]
    settings: DispatcherSettings = field(default_factory=DispatcherSettings)


@dataclass
class TargetStart:
    id: str
    workflow_type: str
    task_queue: str
    arg: dict[str, Any]
    memo: dict[str, str]


@dataclass
class StartBatch:
    starts: list[TargetStart]


@dataclass
class HttpRequest:
    url: str
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    timeout_seconds: float = 30.0
