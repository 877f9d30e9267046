"""``signal-bridge replay runs``: the events of past target runs, sent again as new events.

Every target run's first argument is a :class:`dispatcher.contract.TargetInput`: ``event`` (the
envelope: id, name, source, time, metadata) and ``trigger`` (the payload). The runs a visibility
query selects are listed, each one's input read from its history (the start event), and each
original event is sent once, however many runs it started (one event fans out to several
entries), as a new event:

- id ``replay:{n}:{original id}`` (``replay:{n}:{ENTRY}:{original id}`` with ``to``), the original
  source, name, payload, time and metadata, plus
  ``metadata.replay = {number: n, of: original id, at: now[, to: ENTRY]}``. ``n`` is
  ``--replay-number``, by default the Unix time when the replay began: the same ``n`` gives the
  same ids, so running a replay again with its number starts nothing new. A run that was itself
  started by a replay counts as its original event (``metadata.replay.of``), so replaying both
  sends the event once, and ids never nest;
- through the pipeline (check, then the dispatcher client), as any adapter's events.

``to`` restricts a replayed event to one workflow entry: it travels as ``metadata.replay.to``, for
the routing to honour (:func:`bridge.routing.replay_target`). docs/replay.md.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from temporalio.client import Client
from temporalio.service import RPCError

from adapters.replay_common import Tally
from bridge.errors import BridgeError, EventRejected, Unavailable
from bridge.event import REPLAY_ID_PREFIX, REPLAY_KEY, EventSignal, run_digest, target_workflow_id, utc_now
from bridge.logsafe import safe
from bridge.pipeline import Outcome as Submitted
from bridge.pipeline import Pipeline
from bridge.routing import RouteTable, WorkflowRoute
from bridge.runtime.progress import ProgressBar
from bridge.runtime.replay_support import (
    GIVE_UP_AFTER,
    NoSink,
    Outcome,
    bar_updater,
    finish,
    printer,
    session,
    temporal,
)
from bridge.settle import Backoff
from bridge.snapshot import Snapshot
from dispatcher import search

log = logging.getLogger(__name__)

CONFIRM_ABOVE = 100
"""More events than this are replayed only once confirmed (``--yes``, or an answer on a terminal)."""
READS_IN_FLIGHT = 16
BATCH = 100
ADAPTER = "replay"
NOT_A_TARGET_RUN = "not_a_target_run"  # its input is no TargetInput
UNREADABLE = "unreadable"  # its history could not be read (gone past retention, no permission)
ELSEWHERE = "not_this_project"  # listed, but not started for an event of the config's project


@dataclass
class Collected:
    """The original events the query's runs carried, each once."""

    events: list[EventSignal]
    runs: int = 0
    duplicates: int = 0  # runs whose event an earlier run carried already
    not_target: int = 0
    unreadable: int = 0
    elsewhere: int = 0  # runs another project's dispatcher started, or no dispatcher at all


def original_of(arg: Any) -> EventSignal | None:
    """The event a target run's first argument carries, or None when it is no TargetInput."""
    if not isinstance(arg, dict):
        return None
    envelope, payload = arg.get("event"), arg.get("trigger")
    if not isinstance(envelope, dict):
        return None
    event_id, name, source = envelope.get("id"), envelope.get("name"), envelope.get("source")
    if not (isinstance(event_id, str) and event_id and isinstance(name, str) and name and isinstance(source, str)):
        return None
    metadata = envelope.get("metadata")
    return EventSignal(
        id=event_id,
        name=name,
        payload=payload if isinstance(payload, dict) else {},
        source=source,
        time=str(envelope.get("time") or ""),
        metadata=dict(metadata) if isinstance(metadata, dict) else {},
    )


def root_id(event: EventSignal) -> str:
    """The id of the event a replayed event was first sent as (itself, when it is no replay)."""
    replay = event.metadata.get(REPLAY_KEY)
    of = replay.get("of") if isinstance(replay, dict) else None
    return of if isinstance(of, str) and of else event.id


def replayed(original: EventSignal, number: int, to: str | None = None, at: str | None = None) -> EventSignal:
    """``original`` as the new event ``replay:{number}:{original id}``, or with ``to``
    ``replay:{number}:{to}:{original id}``: replays of one number to two entries are two events
    (with one id, the dispatcher took the second for the first, and it started nothing)."""
    root = root_id(original)
    marker: dict[str, Any] = {"number": number, "of": root, "at": at or utc_now()}
    if to is not None:
        marker["to"] = to
    return EventSignal(
        id=f"{REPLAY_ID_PREFIX}{number}:{root}" if to is None else f"{REPLAY_ID_PREFIX}{number}:{to}:{root}",
        name=original.name,
        payload=original.payload,
        source=original.source,
        time=original.time or utc_now(),
        metadata={**original.metadata, REPLAY_KEY: marker},
    )


# --- reading the runs -------------------------------------------------------------------------------


async def first_argument(client: Client, workflow_id: str, run_id: str | None) -> Any:
    """The first argument the run's chain was started with, from its history's first event: a run
    that continued-as-new from another was started with what that one passed on, so the chain's
    first run is read instead."""
    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    async for event in handle.fetch_history_events(page_size=1):
        if not event.HasField("workflow_execution_started_event_attributes"):
            return None
        started = event.workflow_execution_started_event_attributes
        first = started.first_execution_run_id
        if started.continued_execution_run_id and first and first != run_id:
            return await first_argument(client, workflow_id, first)
        payloads = started.input.payloads
        values = await client.data_converter.decode(payloads) if payloads else []
        return values[0] if values else None
    return None


def started_for(project: str) -> Callable[[Any, Mapping[str, Any]], bool]:
    """Whether a listed run (and its memo) was started for an event of ``project``: a query may
    list runs of every project in the namespace, and runs an application started with an argument
    of the same shape.

    By its ``SignalBridgeProject`` attribute when it has one; else by its workflow id, which for a
    run a workflow entry started is ``{entry}-{run_digest(project, source, event id)}`` of its
    memo's values. A run a signal entry started (``if_missing: start``) has an id of its own, and
    without the attribute it is not told apart: it is left out."""
    value = search.fit(project)

    def mine(execution: Any, memo: Mapping[str, Any]) -> bool:
        held = execution.typed_search_attributes.get(search.PROJECT)
        if held is not None:
            return bool(held == value)
        entry, source, event_id = memo.get("workflow_entry"), memo.get("event_source"), memo.get("event_id")
        if not (isinstance(entry, str) and isinstance(source, str) and isinstance(event_id, str)):
            return False
        return bool(execution.id == target_workflow_id(entry, run_digest(project, source, event_id)))

    return mine


async def collect(
    client: Client, query: str, progress: Callable[[int], None] = lambda n: None, *, project: str | None = None
) -> Collected:
    """The distinct original events of the runs ``query`` selects, in the order they were listed;
    with ``project``, of the runs started for that project's events only (:func:`started_for`).

    Runs whose memo names an event already seen are not read at all, unless the run read for it
    cannot be, or holds no event (a run that continued-as-new keeps its memo, not its first
    argument): then the next one is. What the memo cannot tell (a replay of an event, and the
    event itself) is deduplicated on the inputs."""
    out = Collected([])
    mine = started_for(project) if project is not None else None
    others: dict[tuple[str, str], list[tuple[str, str | None]]] = {}  # by memo: the runs not read
    to_read: list[tuple[tuple[str, str] | None, str, str | None]] = []
    async for execution in client.list_workflows(query):
        out.runs += 1
        progress(out.runs)
        try:
            memo = await execution.memo()
        except Exception:  # a memo the converter cannot read: the input tells
            memo = {}
        if mine is not None and not mine(execution, memo):
            out.elsewhere += 1
            continue
        source, event_id = memo.get("event_source"), memo.get("event_id")
        key = (source, event_id) if isinstance(source, str) and isinstance(event_id, str) else None
        if key is not None and key in others:
            out.duplicates += 1
            others[key].append((execution.id, execution.run_id))
            continue
        if key is not None:
            others[key] = []
        to_read.append((key, execution.id, execution.run_id))
    gate = asyncio.Semaphore(READS_IN_FLIGHT)

    async def read(workflow_id: str, run_id: str | None) -> Any:
        async with gate:
            try:
                return await first_argument(client, workflow_id, run_id)
            except RPCError as exc:
                log.warning("replay: cannot read the history of %s: %s", safe(workflow_id), safe(exc, 300))
                return exc

    async def read_event(key: tuple[str, str] | None, workflow_id: str, run_id: str | None) -> Any:
        arg = await read(workflow_id, run_id)
        while (isinstance(arg, RPCError) or original_of(arg) is None) and key is not None and others[key]:
            out.duplicates -= 1  # another run of the event is read instead
            arg = await read(*others[key].pop(0))
        return arg

    args = await asyncio.gather(*(read_event(key, wid, rid) for key, wid, rid in to_read))
    seen: set[tuple[str, str]] = set()
    for arg in args:
        if isinstance(arg, RPCError):
            out.unreadable += 1
            continue
        event = original_of(arg)
        if event is None:
            out.not_target += 1
            continue
        key = (event.source, root_id(event))
        if key in seen:
            out.duplicates += 1
            continue
        seen.add(key)
        out.events.append(event)
    return out


# --- sending ----------------------------------------------------------------------------------------


def only_entry(routes: RouteTable, to: str) -> WorkflowRoute:
    entry = next((w for w in routes.workflows if w.id == to), None)
    if entry is None:
        known = ", ".join(w.id for w in routes.workflows) or "none"
        raise BridgeError(f"--to {to}: the config has no workflow entry {to!r} (entries: {known})")
    return entry


async def submit(
    pipeline: Pipeline, events: Sequence[EventSignal], backoff: Backoff, give_up_after: float
) -> list[Submitted]:
    """Through the pipeline until Temporal holds them: retried with backoff while it refuses, for
    at most ``give_up_after`` seconds (then :class:`bridge.errors.Unavailable` is raised); a batch
    too large for one signal is halved."""
    began: float | None = None
    attempt = 0
    while True:
        try:
            return await pipeline.submit(events, ADAPTER)
        except EventRejected as exc:
            if len(events) == 1:
                return [Submitted(events[0], exc)]
            half = len(events) // 2
            return [
                *await submit(pipeline, events[:half], backoff, give_up_after),
                *await submit(pipeline, events[half:], backoff, give_up_after),
            ]
        except Unavailable:
            now = time.monotonic()
            began = now if began is None else began
            attempt += 1
            if now - began >= give_up_after:
                raise
            await asyncio.sleep(min(backoff.delay(attempt), give_up_after - (now - began)))


def ask(count: int) -> bool:
    """Ask on the terminal whether to replay ``count`` events; no terminal means no."""
    if not sys.stdin.isatty():
        print(f"{count} events to replay: pass --yes to replay more than {CONFIRM_ABOVE}", file=sys.stderr)
        return False
    answer = input(f"replay {count} events? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


async def replay_runs(
    snapshot: Snapshot,
    *,
    query: str,
    to: str | None = None,
    number: int | None = None,
    dry_run: bool = False,
    confirm: Callable[[int], bool] | None = ask,
    give_up_after: float = GIVE_UP_AFTER,
    client: Client | None = None,
    bar: ProgressBar | None = None,
    out: TextIO | None = None,
) -> Outcome:
    """Replay the events of the runs ``query`` selects; ``confirm`` is asked above
    :data:`CONFIRM_ABOVE` events (None: do not ask)."""
    entry = only_entry(snapshot.routes, to) if to is not None else None
    number = int(time.time()) if number is None else number
    bar = bar or ProgressBar("replay", enabled=False)
    report = printer(out, bar)
    client = client or await temporal(snapshot)
    with bar.around_logging():
        found = await collect(
            client, query, lambda n: bar.update(n, None, "runs listed"), project=snapshot.config.project
        )
    tally = Tally(read=found.runs, duplicates=found.duplicates, total=len(found.events))
    scope = f"to {to}" if to else "to every matching entry"
    outcome = Outcome(f"runs matching {query!r} {scope}", dry_run, tally, kind="runs", number=number)
    events = [replayed(e, number, to) for e in found.events]
    if entry is not None:
        events = _for_entry(events, entry, tally, report if dry_run else None)
    bar.clear()
    if dry_run:
        _check(Pipeline(snapshot.routes, NoSink()), events, tally, report)
    else:
        # Before anything is sent: a replay killed half-way prints no summary, and run again with
        # another number it would start every target of what it had sent a second time.
        print(
            f"replay number {number}: should this replay stop before its summary, run it again with "
            f"--replay-number {number} (what it sent then starts nothing twice)",
            file=sys.stderr if out is None else out,
        )
        if len(events) > CONFIRM_ABOVE and confirm is not None and not await asyncio.to_thread(confirm, len(events)):
            outcome.stopped = f"not confirmed: {len(events)} events, nothing sent"
        else:
            await _send(snapshot, client, events, outcome, bar, give_up_after)
    for why, n in ((NOT_A_TARGET_RUN, found.not_target), (UNREADABLE, found.unreadable), (ELSEWHERE, found.elsewhere)):
        if n:
            tally.kept[why] = n
    return outcome


async def _send(
    snapshot: Snapshot, client: Client, events: list[EventSignal], outcome: Outcome, bar: ProgressBar, give_up: float
) -> None:
    """Submit ``events`` a batch at a time, counting what became of them in ``outcome``."""
    tally = outcome.tally
    async with session(snapshot, dry_run=False, client=client) as s:
        update = bar_updater(bar, "events")
        backoff = Backoff()
        try:
            with bar.around_logging():
                for i in range(0, len(events), BATCH):
                    for done in await submit(s.pipeline, events[i : i + BATCH], backoff, give_up):
                        if done.rejected is None:
                            tally.accepted += 1
                        else:
                            tally.refused[done.rejected.reason] += 1
                    update(tally)
        except Unavailable as exc:
            outcome.stopped = (
                f"Temporal refused for {give_up:.0f}s: {exc}; run it again with --replay-number {outcome.number}"
            )
        outcome.existing = s.sink.existing if s.sink else None
    finish(bar, tally)


def _for_entry(
    events: list[EventSignal], entry: WorkflowRoute, tally: Tally, report: Callable[[str], None] | None
) -> list[EventSignal]:
    """The events ``entry`` is triggered by; the others are refused here (``unroutable``)."""
    kept = []
    for event in events:
        if any(True for _ in entry.triggered_by(event.name)):
            kept.append(event)
            continue
        tally.refused["unroutable"] += 1
        if report is not None:
            report(
                f"still refused id={safe(event.id)} name={safe(event.name)}: entry {entry.id} is not triggered by it"
            )
    return kept


def _check(pipeline: Pipeline, events: list[EventSignal], tally: Tally, report: Callable[[str], None]) -> None:
    for event in events:
        error = pipeline.check(event)
        what = f"id={safe(event.id)} name={safe(event.name)} source={safe(event.source)}"
        if error is None:
            tally.accepted += 1
            report(f"would send    {what}")
        else:
            tally.refused[error.reason] += 1
            report(f"still refused {what} reason={error.reason}: {safe(error.message, 300)}")
