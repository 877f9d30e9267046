"""Routing: which workflows an event starts.

One :class:`RouteTable` serves both sides. Adapters use :meth:`RouteTable.check` to refuse, before
anything enters Temporal, an event no trigger names or whose payload breaks a trigger's schema.
The dispatcher builds the same table from :meth:`RouteTable.spec` (plain data, loaded by the
LOAD_ROUTES activity so replays see the table the run saw; at most ROUTES_LIMIT_BYTES) and calls
:meth:`RouteTable.resolve`, which applies the CEL filters and yields targets in a stable order:
the order of ``workflows:`` in the file.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bridge import templates
from bridge.errors import ConfigError, EventRejected
from bridge.event import REPLAY_KEY, encode
from bridge.filters import Filter, FilterError, Scope, scope
from bridge.schemas import Steps, Uncheckable, compile_schema, described, first_error

if TYPE_CHECKING:
    from bridge.config import BridgeConfig
    from bridge.event import EventSignal

ROUTES_LIMIT_BYTES = 512 * 1024
"""The most :meth:`RouteTable.spec` may weigh as the SDK encodes it. The dispatcher loads it in an
activity whose result each run records (and again at each reload), and an event's filters go with
it in EVALUATE_FILTERS's argument: a table near Temporal's 2 MiB payload limit would fail every
load or every filtered batch, and the dispatcher would start nothing. A config over it is refused
at load (a reload keeps the config before it)."""


def name_matches(pattern: str, name: str) -> bool:
    """Exact name, or a trailing wildcard: ``*`` matches all, ``order.*`` any ``order.``-name."""
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return name.startswith(pattern[:-1])
    return pattern == name


@dataclass(frozen=True)
class TriggerRoute:
    name: str
    filter: Filter | None
    validator: Any | None


# Temporal's default limit on a workflow id (limit.maxIDLength), in characters.
MAX_WORKFLOW_ID = 1000

DISPATCHER_PREFIX = "dispatcher-"
"""Every project's dispatchers are ``dispatcher-{slug}[-k]`` (dispatcher.contract.dispatcher_id)."""
_RUN_SHAPE = re.compile(r"-[0-9a-f]{20}")
"""The end of the id of a run the bridge starts for an event: ``{entry}-{digest}``
(bridge.event.target_workflow_id, run_digest)."""


@dataclass(frozen=True)
class SignalRoute:
    """``signal:`` of an entry: send ``name`` to the open run ``workflow_id`` (a template)."""

    name: str
    workflow_id: str
    if_missing: str  # skip | start

    def render_id(self, event: EventSignal) -> str:
        """The run's id for this event; TemplateError when it renders empty or too long."""
        value = templates.render(self.workflow_id, event_context(event))
        text = "" if value is None else str(value)
        if not text.strip():
            raise templates.TemplateError("signal workflow_id renders empty for this event")
        if len(text) > MAX_WORKFLOW_ID:
            raise templates.TemplateError(
                f"signal workflow_id renders {len(text)} characters; Temporal allows {MAX_WORKFLOW_ID}"
            )
        return text

    def reserved(self, run: str, entries: Collection[str]) -> str | None:
        """Why the bridge will not signal ``run`` (an id :meth:`render_id` gave), or None;
        ``entries``: the ids of the table's entries that start runs (not signal ones).

        The id comes from the event, so its sender picks it. A dispatcher's id is never one: a
        signal there would be taken for events. Nor, with ``if_missing: start``, is the id of a run
        the bridge starts for an event (``{entry}-{digest}``): the digest is of values a sender can
        know, and a run started under it first would make that event's own start a duplicate, so
        the event would never start. Signalling such a run while it is open (``skip``) stays
        possible: a run the bridge started may name itself in a later event.

        The answer does not quote the rendered id: the template may hold ``${VAR}`` values, which
        go back to the sender in the refusal (and into dead letters), and are not the sender's."""
        if run.startswith(DISPATCHER_PREFIX):
            return f"signal workflow_id renders to a dispatcher's id ({DISPATCHER_PREFIX}…), never signalled"
        if self.if_missing == "start" and _RUN_SHAPE.fullmatch(run, max(0, len(run) - 21)) and run[:-21] in entries:
            return (
                f"signal workflow_id renders to the id of a run workflow {run[:-21]!r} starts for an event,"
                " which if_missing: start must not take"
            )
        return None

    def describe(self) -> str:
        return f"signal {self.workflow_id}:{self.name}"


def event_context(event: EventSignal) -> dict[str, Any]:
    """What ``input:`` and ``signal.workflow_id`` templates see: ``trigger``/``input`` (the
    payload) and ``event`` (the envelope)."""
    return {"trigger": event.payload, "input": event.payload, "event": event.envelope()}


@dataclass(frozen=True)
class WorkflowRoute:
    id: str
    workflow_type: str | None  # None: the built-in task runner
    task_queue: str
    input: Any
    triggers: tuple[TriggerRoute, ...]
    signal: SignalRoute | None = None

    def triggered_by(self, name: str) -> Iterator[TriggerRoute]:
        return (t for t in self.triggers if name_matches(t.name, name))


@dataclass(frozen=True)
class Target:
    """One workflow to start, or (``signal``) one open run to signal, for one event."""

    workflow_id: str
    workflow_type: str | None  # None: the built-in task runner
    task_queue: str
    input: Any
    signal: SignalRoute | None = None


@dataclass
class Routing:
    """The targets of one event, the units its filters spent, and the workflows whose filter was
    not evaluated (or not to the end) because the event's filter budget ran out."""

    targets: list[Target] = field(default_factory=list)
    limited: list[str] = field(default_factory=list)
    cost: int = 0


class RouteTable:
    def __init__(self, workflows: list[WorkflowRoute]) -> None:
        self.workflows = workflows
        self.starting = frozenset(w.id for w in workflows if w.signal is None)
        """The ids of the entries that start runs (a signal entry's runs have ids of their own)."""

    @classmethod
    def from_config(cls, config: BridgeConfig, *, origin: str = "config") -> RouteTable:
        seen: set[str] = set()
        routes = []
        for wf in config.workflows:
            where = f"{origin}: workflow {wf.id!r}"
            if wf.id in seen:
                raise ConfigError(f"{where}: another workflow has the same id")
            seen.add(wf.id)
            try:
                templates.check(wf.input)
                for task in wf.tasks:
                    templates.check(task.config.model_dump())
            except templates.TemplateError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            signal = None
            if wf.signal is not None:
                try:
                    templates.check(wf.signal.workflow_id)
                except templates.TemplateError as exc:
                    raise ConfigError(f"{where}: signal.workflow_id: {exc}") from None
                signal = SignalRoute(wf.signal.name, wf.signal.workflow_id, wf.signal.if_missing)
            names: set[str] = set()
            triggers = []
            for trig in wf.triggers:
                here = f"{where}, trigger {trig.name!r}"
                key = f"{trig.type}:{trig.name}"
                if key in names:
                    raise ConfigError(f"{here}: the same trigger is declared twice")
                names.add(key)
                triggers.append(_compile_trigger(trig.name, trig.filter, trig.schema_, here))
            routes.append(
                WorkflowRoute(
                    id=wf.id,
                    workflow_type=wf.workflow_type,
                    task_queue=wf.task_queue or config.task_queue,
                    input=wf.input,
                    triggers=tuple(triggers),
                    signal=signal,
                )
            )
        table = cls(routes)
        size = len(encode(table.spec()))
        if size > ROUTES_LIMIT_BYTES:
            raise ConfigError(
                f"{origin}: the routes the dispatcher loads (each workflow's id, type, task queue, input and "
                f"trigger names and filters) weigh {size} bytes as JSON, over the limit of {ROUTES_LIMIT_BYTES}: "
                "each dispatcher run records them in its history; shorten the inputs or filters, or split the "
                "workflows over projects"
            )
        return table

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> RouteTable:
        routes = [
            WorkflowRoute(
                id=w["id"],
                workflow_type=w.get("workflow_type"),
                task_queue=w["task_queue"],
                input=w.get("input"),
                triggers=tuple(
                    TriggerRoute(t["name"], Filter(t["filter"]) if t.get("filter") else None, None)
                    for t in w["triggers"]
                ),
                signal=_signal_from_spec(w.get("signal")),
            )
            for w in spec["workflows"]
        ]
        return cls(routes)

    def spec(self) -> dict[str, Any]:
        """What the dispatcher needs, as plain data (schemas stay at the adapter)."""
        return {
            "workflows": [
                {
                    "id": w.id,
                    "workflow_type": w.workflow_type,
                    "task_queue": w.task_queue,
                    "input": w.input,
                    "triggers": [{"name": t.name, "filter": t.filter.source if t.filter else None} for t in w.triggers],
                    "signal": None if w.signal is None else dict(vars(w.signal)),
                }
                for w in self.workflows
            ]
        }

    def names(self) -> dict[str, list[str]]:
        """Event name (or pattern) → workflow ids, in file order; an entry that signals open runs
        is shown as ``signal {workflow_id template}:{signal name} ({id})``."""
        out: dict[str, list[str]] = {}
        for w in self.workflows:
            for t in w.triggers:
                out.setdefault(t.name, []).append(w.id if w.signal is None else f"{w.signal.describe()} ({w.id})")
        return out

    def is_routable(self, name: str) -> bool:
        return any(True for w in self.workflows for _ in w.triggered_by(name))

    def check(self, event: EventSignal) -> None:
        """Raise :class:`EventRejected` for an event no trigger names or a schema refuses."""
        matched = False
        only = replay_target(event)
        steps = Steps()  # one budget for all of the event's schemas
        for w in self.workflows:
            if only is not None and w.id != only:
                continue
            signal_checked = False
            for t in w.triggered_by(event.name):
                matched = True
                if w.signal is not None and not signal_checked:
                    signal_checked = True
                    _check_signal_target(w.id, w.signal, event, self.starting)
                if t.validator is None:
                    continue
                try:
                    error = first_error(t.validator, event.payload, steps)
                except Uncheckable as exc:
                    raise EventRejected(
                        "schema_invalid",
                        f"payload could not be checked against the schema of workflow {w.id!r} "
                        f"(trigger {t.name!r}): {exc}",
                        workflow=w.id,
                        trigger=t.name,
                    ) from None
                if error is not None:
                    raise EventRejected(
                        "schema_invalid",
                        f"payload does not match the schema of workflow {w.id!r} (trigger {t.name!r}): "
                        + described(error),
                        workflow=w.id,
                        trigger=t.name,
                        schema_path="/".join(str(p) for p in error.absolute_schema_path),
                        payload_path="/".join(str(p) for p in error.absolute_path),
                    )
        if not matched:
            raise EventRejected("unroutable", f"no workflow is triggered by event {event.name!r}", name=event.name)

    def resolve(self, event: EventSignal) -> list[Target]:
        """Every workflow whose trigger names the event and whose filter (if any) holds."""
        return self.route(event).targets

    def candidates(self, name: str) -> int:
        """How many workflows an event of this name may start: the most its filters allow."""
        return sum(1 for w in self.workflows if any(True for _ in w.triggered_by(name)))

    def filters_for(self, name: str) -> list[str]:
        """The distinct filters an event of this name is evaluated against, in file order."""
        sources = (t.filter.source for w in self.workflows for t in w.triggered_by(name) if t.filter is not None)
        return list(dict.fromkeys(sources))

    def route(self, event: EventSignal, verdicts: Mapping[str, bool | None] | None = None) -> Routing:
        """:meth:`resolve`, with what the filters cost and which ran out of budget.

        ``verdicts`` (filter source → :meth:`bridge.filters.Filter.evaluate`'s answer) are used
        instead of evaluating here: the dispatcher has them evaluated by an activity. A filter
        that ran out of its budget does not match; a workflow none of whose triggers matched, one
        or more of them for that reason, is listed as limited.
        """
        routing = Routing()
        values: Scope | None = None
        only = replay_target(event)
        for w in self.workflows:
            if only is not None and w.id != only:
                continue
            limited = False
            for t in w.triggered_by(event.name):
                if t.filter is not None:
                    if verdicts is not None:
                        verdict = verdicts.get(t.filter.source)
                    else:
                        if values is None:
                            values = scope(event.name, event.payload, event.source, event.metadata, event.id)
                        verdict = t.filter.evaluate(values)
                    if verdict is not True:
                        limited = limited or verdict is None
                        continue
                routing.targets.append(Target(w.id, w.workflow_type, w.task_queue, w.input, w.signal))
                break
            else:
                if limited:
                    routing.limited.append(w.id)
        routing.cost = values.cost if values is not None else 0
        return routing


def replay_target(event: EventSignal) -> str | None:
    """The one workflow entry an event sent by ``signal-bridge replay runs --to`` is for:
    ``metadata.replay.to``. Only the replay sets it: no adapter copies a sender's fields into
    ``metadata`` (they keep named headers only). None: every entry the name triggers (docs/replay.md)."""
    replay = event.metadata.get(REPLAY_KEY)
    to = replay.get("to") if isinstance(replay, dict) else None
    return to if isinstance(to, str) and to else None


def _signal_from_spec(spec: dict[str, Any] | None) -> SignalRoute | None:
    if not spec:
        return None
    return SignalRoute(spec["name"], spec["workflow_id"], spec.get("if_missing", "skip"))


def _check_signal_target(workflow: str, signal: SignalRoute, event: EventSignal, starting: Collection[str]) -> None:
    """Refuse, at the adapter, an event whose run to signal has no usable id."""
    try:
        why = signal.reserved(signal.render_id(event), starting)
    except templates.TemplateError as exc:
        why = str(exc)
    if why is not None:
        raise EventRejected(
            "target_invalid", f"workflow {workflow!r}: {why}", workflow=workflow, field="signal.workflow_id"
        )


def _compile_trigger(name: str, filter_src: str | None, schema: dict[str, Any] | None, where: str) -> TriggerRoute:
    validator = compile_schema(schema, where) if schema is not None else None
    compiled = None
    if filter_src:
        try:
            compiled = Filter(filter_src)
        except FilterError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return TriggerRoute(name, compiled, validator)
