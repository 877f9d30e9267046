"""Which runs an event started: from Temporal's visibility, by the search attributes every target
run carries (:mod:`dispatcher.search`), and, for an event whose source is known, from the run ids
the bridge gives (``{entry}-{run_digest(project, source, id)}``), which need no attribute at all.

Used by ``GET /api/v1/events/{id}`` and ``signal-bridge events show|list``. A run is visible only
for the namespace's retention.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from bridge.errors import BridgeError
from bridge.event import run_digest, target_workflow_id
from bridge.routing import RouteTable
from dispatcher import search

STATUSES = {
    "running": "Running",
    "completed": "Completed",
    "failed": "Failed",
    "canceled": "Canceled",
    "terminated": "Terminated",
    "continued_as_new": "ContinuedAsNew",
    "timed_out": "TimedOut",
}
_SINCE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


@dataclass(frozen=True)
class Run:
    """One run an event started (or signalled into existence), as the look-up answers it."""

    workflow_entry: str | None
    workflow_id: str
    run_id: str | None
    status: str
    start_time: str | None
    close_time: str | None
    event_id: str | None
    event_name: str | None
    source: str | None
    url: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def since(text: str, now: datetime | None = None) -> datetime:
    """``90s``, ``15m``, ``1h``, ``7d`` before now."""
    match = _SINCE.match(text.strip())
    if not match:
        raise BridgeError(f"--since {text!r}: give a number and a unit, like 30m, 1h or 7d")
    delta = timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    return (now or datetime.now(UTC)) - delta


def list_query(
    project: str, *, name: str | None = None, started_after: datetime | None = None, status: str | None = None
) -> str:
    """The visibility query for ``events list``: a trailing ``*`` in ``name`` is a prefix."""
    parts = [f"{search.PROJECT.name} = {search.quoted(search.fit(project))}"]
    if name:
        if name.endswith("*"):
            parts.append(f"{search.EVENT_NAME.name} STARTS_WITH {search.quoted(search.fit_prefix(name[:-1]))}")
        else:
            parts.append(f"{search.EVENT_NAME.name} = {search.quoted(search.fit(name))}")
    if started_after is not None:
        parts.append(f"StartTime > {search.quoted(started_after.astimezone(UTC).isoformat())}")
    if status:
        if status.lower() not in STATUSES:
            raise BridgeError(f"--status {status!r}: one of {', '.join(STATUSES)}")
        parts.append(f"ExecutionStatus = {search.quoted(STATUSES[status.lower()])}")
    return " AND ".join(parts)


def event_query(project: str, event_id: str, source: str | None = None) -> str:
    parts = [
        f"{search.PROJECT.name} = {search.quoted(search.fit(project))}",
        f"{search.EVENT_ID.name} = {search.quoted(search.fit(event_id))}",
    ]
    if source:
        parts.append(f"{search.SOURCE.name} = {search.quoted(search.fit(source))}")
    return " AND ".join(parts)


class Lookup:
    """Look-ups against one namespace; ``ui`` is the Temporal UI's address, for links."""

    def __init__(self, client: Client, project: str, routes: RouteTable, *, ui: str | None = None) -> None:
        self.client = client
        self.project = project
        self.routes = routes
        self.ui = ui.rstrip("/") if ui else None

    async def event(self, event_id: str, source: str | None = None, limit: int = 100) -> list[Run]:
        """The runs one event started: by its attributes, and (with ``source``) by the ids it gives."""
        found: dict[tuple[str, str | None], Run] = {}
        for run in await self._query(event_query(self.project, event_id, source), limit):
            found[(run.workflow_id, run.run_id)] = run
        if source is not None:
            known = {wid for wid, _ in found}
            digest = run_digest(self.project, source, event_id)
            ids = [target_workflow_id(w.id, digest) for w in self.routes.workflows if w.signal is None]
            described = await asyncio.gather(*(self._describe(wid) for wid in ids if wid not in known))
            for seen in described:
                if seen is not None:
                    found[(seen.workflow_id, seen.run_id)] = seen
        return sorted(found.values(), key=lambda r: (r.start_time or "", r.workflow_id))

    async def events(
        self,
        *,
        name: str | None = None,
        started_after: datetime | None = None,
        status: str | None = None,
        limit: int = 100,
    ) -> list[Run]:
        query = list_query(self.project, name=name, started_after=started_after, status=status)
        return await self._query(query, limit)

    async def _query(self, query: str, limit: int) -> list[Run]:
        runs: list[Run] = []
        try:
            async for execution in self.client.list_workflows(query, limit=limit):
                runs.append(self._run(execution))
        except RPCError as exc:
            if exc.status == RPCStatusCode.INVALID_ARGUMENT:  # the attributes are not registered
                return []
            raise
        return runs

    async def _describe(self, workflow_id: str) -> Run | None:
        try:
            return self._run(await self.client.get_workflow_handle(workflow_id).describe())
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return None
            raise

    def _run(self, execution: WorkflowExecution) -> Run:
        attributes = execution.typed_search_attributes
        memo = execution.raw_info.memo.fields if execution.raw_info.HasField("memo") else {}
        entry = _memo_text(memo.get("workflow_entry"))
        status = execution.status.name.lower() if isinstance(execution.status, WorkflowExecutionStatus) else "unknown"
        return Run(
            workflow_entry=entry,
            workflow_id=execution.id,
            run_id=execution.run_id,
            status=status,
            start_time=execution.start_time.isoformat() if execution.start_time else None,
            close_time=execution.close_time.isoformat() if execution.close_time else None,
            # the memo first: it keeps what an attribute may hold cut (search.fit)
            event_id=_memo_text(memo.get("event_id")) or attributes.get(search.EVENT_ID),
            event_name=_memo_text(memo.get("event_name")) or attributes.get(search.EVENT_NAME),
            source=_memo_text(memo.get("event_source")) or attributes.get(search.SOURCE),
            url=self._url(execution.id, execution.run_id),
        )

    def _url(self, workflow_id: str, run_id: str | None) -> str | None:
        if not self.ui:
            return None
        namespace = quote(self.client.namespace, safe="")
        path = f"{self.ui}/namespaces/{namespace}/workflows/{quote(workflow_id, safe='')}"
        return f"{path}/{quote(run_id, safe='')}/history" if run_id else path


def _memo_text(payload: Any) -> str | None:
    """A memo field written as a JSON string (how the SDK encodes ``str``)."""
    if payload is None:
        return None
    try:
        value = json.loads(payload.data)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
