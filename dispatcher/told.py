"""The hand-over's share, told by the adapters of one process to the starts of the others.

The starts of a process give way while its adapters hand events over slowly
(:class:`dispatcher.slots.Handover`). A ``worker`` process has no adapters: the ``ingress``
processes that hand events to its dispatchers are elsewhere, and its starts would not give way to
them. So an adapter process says its share in a header of each signal it sends while the share is
below one, or while the signal carries events a client waits for (HEADER: its identity and its
share), and the worker that runs the dispatcher reads it as the signal arrives
(:class:`TellInterceptor`), never while replaying history. Its starts then keep to their window
while any header came in the last AWAITED_HOLD seconds (:meth:`Told.waiting`), and use at most the
smallest share told in the last HOLD seconds (:meth:`Told.share`); without a new header for that
long (the burst is over), the share is whole again.

A header is advice for the starts' pace, never part of the dispatcher's state: the workflow does
not read it, so a header that is missing, stale or malformed changes nothing but the pace.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from temporalio import workflow
from temporalio.api.common.v1 import Payload
from temporalio.worker import (
    HandleSignalInput,
    Interceptor,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
)

from dispatcher.slots import AWAITED_HOLD, FLOOR

HEADER = "signal-bridge-handover"
"""The signal header: ``{"from": identity, "share": share}`` as JSON."""
HOLD = 0.5
"""Seconds a told share holds. Longer than the hand-over's own QUIET: a header arrives when the
worker takes the signal's workflow task, which a busy worker takes late, and a share that ran out
between two of a burst's tasks would let every waiting start go at once."""
SENDERS = 64
"""The most senders remembered; the stale ones go first."""
MAX_SENDER = 200
"""Characters of a sender's identity kept."""
MAX_BYTES = 1024
"""A larger header is not read: ours are under 300 bytes."""


def header(sender: str, share: float) -> Payload:
    """The header an adapter process puts on its signals while its share is below one."""
    data = json.dumps({"from": sender[:MAX_SENDER], "share": round(share, 4)}, separators=(",", ":"))
    return Payload(metadata={"encoding": b"json/plain"}, data=data.encode())


def read(payload: Payload) -> tuple[str, float] | None:
    """The sender and share of a header; None when it is not one (a share is kept within
    [FLOOR, 1]). Never raises: what any client of the namespace put in a header must not fail the
    dispatcher's workflow task."""
    if len(payload.data) > MAX_BYTES:
        return None
    try:
        told: Any = json.loads(payload.data)
        sender, share = told["from"], told["share"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    if not isinstance(sender, str) or isinstance(share, bool) or not isinstance(share, int | float):
        return None
    if share != share:  # NaN
        return None
    try:
        value = float(share)
    except OverflowError:  # an integer of hundreds of digits: valid JSON, and within MAX_BYTES
        return None
    return sender[:MAX_SENDER], min(1.0, max(FLOOR, value))


class Told:
    """The shares that adapter processes told this process's worker: :meth:`share` is the
    smallest told in the last HOLD seconds, 1.0 when none was."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._shares: dict[str, tuple[float, float]] = {}  # sender -> (share, when told)
        # tell() runs in the workflow activation threads, share() on the event loop and in a
        # metrics scrape: one changing the dict while another iterates it raised.
        self._lock = threading.Lock()

    def tell(self, sender: str, share: float) -> None:
        now = self._clock()
        with self._lock:
            self._shares.pop(sender, None)  # re-inserted last: the dict is in the order of telling
            self._shares[sender] = (share, now)
            while len(self._shares) > SENDERS:
                del self._shares[next(iter(self._shares))]

    def waiting(self) -> bool:
        """Whether an adapter process told, in the last AWAITED_HOLD seconds, that clients wait on
        its signals (any header does: it is sent with every signal carrying such events)."""
        now = self._clock()
        with self._lock:
            return any(now - when <= AWAITED_HOLD for _, when in self._shares.values())

    def share(self) -> float:
        now = self._clock()
        with self._lock:
            for sender in [s for s, (_, when) in self._shares.items() if now - when > max(HOLD, AWAITED_HOLD)]:
                del self._shares[sender]
            return min((share for share, when in self._shares.values() if now - when <= HOLD), default=1.0)


class TellInterceptor(Interceptor):
    """A worker interceptor that passes each signal's HEADER to ``told`` as the signal arrives
    (not while a workflow's history is replayed: that header is old news)."""

    def __init__(self, told: Told) -> None:
        self.told = told

    def workflow_interceptor_class(self, input: WorkflowInterceptorClassInput) -> type[WorkflowInboundInterceptor]:
        told = self.told

        class _Inbound(WorkflowInboundInterceptor):
            async def handle_signal(self, input: HandleSignalInput) -> None:
                payload = input.headers.get(HEADER)
                if payload is not None and not workflow.unsafe.is_replaying():
                    heard = read(payload)
                    if heard is not None:
                        told.tell(*heard)
                await super().handle_signal(input)

        return _Inbound
