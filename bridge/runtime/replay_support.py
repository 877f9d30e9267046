"""What the replays share (docs/replay.md): the pipeline they submit through, the lookup of the
runs an event would start, and what a replay reports.

:func:`session` builds the pipeline as the bridge does (this config's routes and schemas, a
:class:`dispatcher.client.DispatcherClient`), around a sink that first looks up each event's
target runs by their deterministic ids (:class:`LookingSink`), so a replay can say how many of its
events were duplicates: every run they would start existed already.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal, TextIO

from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from adapters.replay_common import Tally
from bridge.errors import Unavailable
from bridge.event import EventSignal, run_digest, target_workflow_id
from bridge.metrics import Metrics
from bridge.pipeline import Pipeline
from bridge.routing import RouteTable, replay_target
from bridge.runtime.app import connect
from bridge.runtime.progress import ProgressBar
from bridge.snapshot import Snapshot
from dispatcher.client import DispatcherClient

DEFAULT_TEMPORAL = "127.0.0.1:7233"
"""Where a replay looks for Temporal when the config names no address: the port the embedded
dev server of ``signal-bridge serve`` takes when it is free."""
LOOKUPS_IN_FLIGHT = 32
GIVE_UP_AFTER = 120.0


# --- which runs exist already ---------------------------------------------------------------------


@dataclass
class Existing:
    """What the replay learnt, before submitting, of the runs its events would start."""

    events: int = 0  # events looked up
    duplicates: int = 0  # events every one of whose runs existed already: they start nothing
    new_runs: int = 0
    existing_runs: int = 0
    unknown: int = 0  # lookups Temporal did not answer


class LookingSink:
    """The dispatcher client, but each event's target runs are looked up first (describe by their
    deterministic ids), so the summary can say how many events were duplicates."""

    def __init__(self, inner: DispatcherClient, client: Client, routes: RouteTable, project: str) -> None:
        self.inner = inner
        self.client = client
        self.routes = routes
        self.project = project
        self.existing = Existing()
        self._looked: set[tuple[str, str]] = set()
        self._gate = asyncio.Semaphore(LOOKUPS_IN_FLIGHT)

    async def submit(self, events: Sequence[EventSignal]) -> None:
        await self._look(events)
        await self.inner.submit(events)

    async def submit_encoded(self, events: Sequence[EventSignal], encoded: Sequence[bytes]) -> None:
        await self._look(events)
        await self.inner.submit_encoded(events, encoded)

    async def _look(self, events: Sequence[EventSignal]) -> None:
        # Once per event, within the batch too: two copies of one letter (a retried write) are one event.
        todo = list({(e.source, e.id): e for e in events if (e.source, e.id) not in self._looked}.values())
        found = await asyncio.gather(*(self._runs(e) for e in todo))
        for event, (total, existing) in zip(todo, found, strict=True):
            self._looked.add((event.source, event.id))
            self.existing.events += 1
            self.existing.new_runs += total - existing
            self.existing.existing_runs += existing
            if total and existing == total:
                self.existing.duplicates += 1

    async def _runs(self, event: EventSignal) -> tuple[int, int]:
        """(runs the event starts, of which exist already); signalled runs are not counted."""
        try:
            targets = [t for t in self.routes.route(event).targets if t.signal is None]
        except Exception:  # the dispatcher counts a routing failure; the lookup only informs
            return 0, 0
        only = replay_target(event)
        if only is not None:
            targets = [t for t in targets if t.workflow_id == only]
        digest = run_digest(self.project, event.source, event.id)
        found = await asyncio.gather(*(self._exists(target_workflow_id(t.workflow_id, digest)) for t in targets))
        return len(targets), sum(found)

    async def _exists(self, workflow_id: str) -> bool:
        async with self._gate:
            try:
                await self.client.get_workflow_handle(workflow_id).describe(rpc_timeout=timedelta(seconds=5))
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    self.existing.unknown += 1
                return False
            return True


class NoSink:
    """A dry run's sink: it is never reached (a dry run only checks)."""

    async def submit(self, events: Sequence[EventSignal]) -> None:
        raise Unavailable("a dry run submits nothing")


@dataclass
class Session:
    """The pipeline a replay submits through, and what it looked up on the way."""

    snapshot: Snapshot
    pipeline: Pipeline
    client: Client | None = None
    sink: LookingSink | None = None


async def temporal(snapshot: Snapshot) -> Client:
    """A client of the config's Temporal (:data:`DEFAULT_TEMPORAL` when it names none)."""
    cfg = snapshot.config
    address = cfg.temporal.address or DEFAULT_TEMPORAL
    return await connect(
        address, cfg.temporal.namespace, api_key=cfg.temporal.api_key, tls=cfg.temporal.tls, timeout=15
    )


@contextlib.asynccontextmanager
async def session(snapshot: Snapshot, *, dry_run: bool, client: Client | None = None) -> AsyncIterator[Session]:
    """The pipeline as the bridge builds it (routes, schemas and the dispatcher client of this
    config); a dry run's submits nothing, and connects to nothing it was not given."""
    cfg = snapshot.config
    if dry_run:
        yield Session(snapshot, Pipeline(snapshot.routes, NoSink()), client)
        return
    client = client or await temporal(snapshot)
    metrics = Metrics()
    dispatcher = DispatcherClient(client, cfg, metrics)
    sink = LookingSink(dispatcher, client, snapshot.routes, cfg.project)
    pipeline = Pipeline(snapshot.routes, sink, metrics, max_pending=cfg.dispatcher.max_pending_events)
    try:
        yield Session(snapshot, pipeline, client, sink)
    finally:
        await dispatcher.close()


def _note(noun: str, tally: Tally) -> str:
    return f"{noun}: {tally.accepted} accepted, {sum(tally.refused.values())} refused"


def bar_updater(bar: ProgressBar, noun: str) -> Callable[[Tally], None]:
    def update(tally: Tally) -> None:
        bar.update(tally.handled, tally.total, _note(noun, tally))

    return update


def finish(bar: ProgressBar, tally: Tally) -> None:
    bar.finish(tally.handled, tally.total, _note("done", tally))


@dataclass
class Outcome:
    """What one replay did: the tally, what it learnt of existing runs, and why it stopped early."""

    what: str  # e.g. "kafka topic orders.dlq (group signal-bridge-replay-shop)"
    dry_run: bool
    tally: Tally
    kind: Literal["letters", "runs"] = "letters"
    number: int | None = None  # the replay number of a replay of runs
    existing: Existing | None = None
    stopped: str | None = None  # why the replay stopped before the end, if it did
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.stopped is None


def printer(out: TextIO | None, bar: ProgressBar | None = None) -> Callable[[str], None]:
    """Where a dry run says what it would do, one line per message (the bar cleared first)."""
    stream = out if out is not None else sys.stdout

    def write(line: str) -> None:
        if bar is not None:
            bar.clear()
        print(line, file=stream)

    return write
