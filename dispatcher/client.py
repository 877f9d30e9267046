"""The dispatcher's client: signal-with-start to ``dispatcher-{slug}[-k]``, sharded and coalesced.

Concurrent submissions for one shard are coalesced: while one signal is in flight, the next
submissions queue up and leave together as one signal carrying a list of events (at most
MAX_SIGNAL_EVENTS events and MAX_SIGNAL_BYTES, see :mod:`dispatcher.contract`). One signal in
flight per shard keeps per-key order (a key always maps to the same shard) and turns a burst of
N requests into a handful of signals, which is what keeps the dispatcher's lock cool. Sharding and
what the metrics mean are described in docs/operations.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode

from bridge.config import BridgeConfig
from bridge.errors import EventRejected, Unavailable
from bridge.event import EventSignal, encoded_size
from bridge.metrics import Metrics
from dispatcher.contract import (
    DISPATCHER_WORKFLOW,
    EVENT_SIGNAL,
    MAX_SIGNAL_BYTES,
    MAX_SIGNAL_EVENTS,
    RELOAD_SIGNAL,
    STATS_QUERY,
    DispatcherInput,
    DispatcherStats,
    dispatcher_id,
)

log = logging.getLogger(__name__)


def shard_of(event: EventSignal, shards: int) -> int:
    """The event's shard: a hash of its ordering key (or its id), the same in every process."""
    if shards == 1:
        return 0
    key = event.key if event.key is not None else event.id
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % shards


@dataclass
class _Submission:
    events: list[dict[str, Any]]
    size: int
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class DispatcherClient:
    """Sends events to ``dispatcher-{slug}[-k]`` with signal-with-start; returns once held."""

    def __init__(
        self,
        client: Client,
        config: BridgeConfig,
        metrics: Metrics | None = None,
        *,
        rpc_timeout: float = 10.0,
        retry_after: float = 5.0,
    ) -> None:
        self.client = client
        self.project = config.project
        self.task_queue = config.task_queue
        self.shards = config.dispatcher.shards
        self.metrics = metrics or Metrics()
        self.rpc_timeout = timedelta(seconds=rpc_timeout)
        self.retry_after = retry_after
        self._queues: list[asyncio.Queue[_Submission]] = []
        self._senders: list[asyncio.Task[None]] = []
        self._carry: list[_Submission | None] = []

    @property
    def ids(self) -> list[str]:
        return [dispatcher_id(self.project, k, self.shards) for k in range(self.shards)]

    def handle(self, shard: int = 0) -> WorkflowHandle[Any, Any]:
        return self.client.get_workflow_handle(self.ids[shard])

    async def submit(self, events: Sequence[EventSignal]) -> None:
        """Return once Temporal holds every event; raise Unavailable or EventRejected otherwise.

        Nothing is sent when one event is too large on its own. Events are split by shard (and at
        the signal limits) into submissions that the shards' senders coalesce with others.
        """
        placed: list[tuple[int, dict[str, Any], int]] = []
        for event in events:
            item = event.to_dict()
            size = encoded_size(item)
            if size > MAX_SIGNAL_BYTES:
                raise EventRejected(
                    "too_large", f"event {event.id!r} of {size} bytes exceeds the {MAX_SIGNAL_BYTES}-byte limit"
                )
            placed.append((shard_of(event, self.shards), item, size))
        if not self._senders:
            self._start_senders()
        subs: list[_Submission] = []
        open_: dict[int, _Submission] = {}
        for shard, item, size in placed:
            sub = open_.get(shard)
            if sub is None or sub.size + size > MAX_SIGNAL_BYTES or len(sub.events) >= MAX_SIGNAL_EVENTS:
                sub = open_[shard] = _Submission([], 0)
                subs.append(sub)
                self._queues[shard].put_nowait(sub)
            sub.events.append(item)
            sub.size += size
        await asyncio.gather(*(s.done for s in subs))

    async def ensure_started(self) -> None:
        """Start every shard's dispatcher if it is not running (seed Step 4)."""
        for shard, wid in enumerate(self.ids):
            try:
                await self._start(shard, id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING)
            except RPCError as exc:
                raise Unavailable(f"cannot start dispatcher {wid}: {exc}", self.retry_after) from exc

    async def reload(self) -> None:
        for shard in range(self.shards):
            await self.handle(shard).signal(RELOAD_SIGNAL)

    async def stats(self) -> list[DispatcherStats]:
        return [await self.handle(k).query(STATS_QUERY) for k in range(self.shards)]

    async def ping(self) -> bool:
        try:
            await self.client.workflow_service.get_system_info(GetSystemInfoRequest(), timeout=timedelta(seconds=2))
        except Exception:
            return False
        return True

    async def close(self) -> None:
        """Stop the senders once their queues are empty; pending submissions finish first."""
        for q in self._queues:
            await q.join()
        for task in self._senders:
            task.cancel()
        await asyncio.gather(*self._senders, return_exceptions=True)
        self._senders.clear()
        self._queues.clear()

    def _start_senders(self) -> None:
        self._queues = [asyncio.Queue() for _ in range(self.shards)]
        self._carry = [None] * self.shards
        self._senders = [
            asyncio.create_task(self._sender(k), name=f"dispatcher-sender-{k}") for k in range(self.shards)
        ]

    async def _sender(self, shard: int) -> None:
        """Send one shard's submissions, one signal at a time, coalescing whatever queued meanwhile."""
        queue = self._queues[shard]
        while True:
            batch = await self._next_batch(shard)
            try:
                await self._signal(shard, [e for sub in batch for e in sub.events])
            except Exception as exc:
                _answer(batch, exc)
            except BaseException:
                _answer(batch, Unavailable("the dispatcher client is stopping", self.retry_after))
                raise
            else:
                _answer(batch, None)
            finally:
                for _ in batch:
                    queue.task_done()

    async def _next_batch(self, shard: int) -> list[_Submission]:
        """The oldest submission and every queued one after it that still fits in one signal.

        The first that does not fit is carried to the next batch, so the order holds.
        """
        queue = self._queues[shard]
        first = self._carry[shard] or await queue.get()
        self._carry[shard] = None
        batch = [first]
        count, size = len(first.events), first.size
        while not queue.empty():
            nxt = queue.get_nowait()
            if count + len(nxt.events) > MAX_SIGNAL_EVENTS or size + nxt.size > MAX_SIGNAL_BYTES:
                self._carry[shard] = nxt
                break
            batch.append(nxt)
            count += len(nxt.events)
            size += nxt.size
        return batch

    async def _start(self, shard: int, **options: Any) -> None:
        """Start (or, with a start signal, signal) one shard's dispatcher."""
        await self.client.start_workflow(
            DISPATCHER_WORKFLOW,
            DispatcherInput(project=self.project, shard=shard),
            id=self.ids[shard],
            task_queue=self.task_queue,
            rpc_timeout=self.rpc_timeout,
            **options,
        )

    async def _signal(self, shard: int, events: list[dict[str, Any]]) -> None:
        wid = self.ids[shard]
        try:
            await self._start(shard, start_signal=EVENT_SIGNAL, start_signal_args=[events])
        except RPCError as exc:
            log.warning(
                "signal-with-start failed dispatcher=%s events=%d status=%s: %s",
                wid,
                len(events),
                exc.status.name,
                exc.message,
            )
            if exc.status == RPCStatusCode.INVALID_ARGUMENT and "size" in exc.message.lower():
                raise EventRejected("too_large", exc.message) from exc
            raise Unavailable(f"Temporal did not accept the events: {exc.message}", self.retry_after) from exc
        except Exception as exc:
            log.warning("signal-with-start failed dispatcher=%s: %r", wid, exc)
            raise Unavailable(f"Temporal did not accept the events: {exc}", self.retry_after) from exc
        self.metrics.signals.inc()
        self.metrics.batch_size.observe(len(events))


def _answer(batch: list[_Submission], failure: Exception | None) -> None:
    """Answer every submission a signal carried; a submitter that gave up (cancelled) is skipped."""
    for sub in batch:
        if sub.done.done():
            continue
        if failure is None:
            sub.done.set_result(None)
        else:
            sub.done.set_exception(failure)
