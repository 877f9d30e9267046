"""A worker gives way to the share an adapter process tells in its signals (dispatcher.told),
against the real dev server: the header goes through signal-with-start into the dispatcher's
history, reaches the worker as the signal arrives, and is not heard again when that history is
replayed."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.worker import HandleSignalInput, Interceptor, Replayer, WorkflowInboundInterceptor
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from bridge.event import EventSignal
from bridge.metrics import Metrics
from bridge.snapshot import Snapshot
from dispatcher import told
from dispatcher.client import DispatcherClient
from dispatcher.contract import dispatcher_id
from dispatcher.runner import TaskRunnerWorkflow
from dispatcher.slots import PRESSURE
from dispatcher.worker import PASSTHROUGH, build_worker
from dispatcher.workflow import DispatcherWorkflow
from tests.helpers import config, runner, unique

pytestmark = pytest.mark.temporal


class Recording(told.Told):
    def __init__(self) -> None:
        super().__init__()
        self.heard: list[tuple[str, float]] = []

    def tell(self, sender: str, share: float) -> None:
        self.heard.append((sender, share))
        super().tell(sender, share)


class CountSignals(Interceptor):
    """Counts the signals the workflows handle (replayed ones too)."""

    def __init__(self) -> None:
        self.signals = 0

    def workflow_interceptor_class(self, input: Any) -> type[WorkflowInboundInterceptor]:
        outer = self

        class _Inbound(WorkflowInboundInterceptor):
            async def handle_signal(self, input: HandleSignalInput) -> None:
                outer.signals += 1
                await super().handle_signal(input)

        return _Inbound


def event(event_id: str) -> EventSignal:
    """An event whose client waits for its 202: it counts toward the hand-over's pressure."""
    return EventSignal(id=event_id, name="order.created", payload={}, source="http:t")


async def test_a_worker_without_adapters_gives_way_to_the_share_an_ingress_tells(
    temporal_client: Client, temporal_address: str
) -> None:
    project = unique("told")
    cfg = config(project, temporal_address, [runner(unique("w"), "order.created")])
    metrics = Metrics()  # the worker's: its start share is what its starts may use
    worker = build_worker(temporal_client, Snapshot.compile(cfg), cfg.task_queue, metrics=metrics)

    def share() -> float:
        value = metrics.registry.get_sample_value("signal_bridge_start_share")
        assert value is not None
        return value

    # The ingress: its own client and hand-over, in which every full signal is slow.
    ingress = DispatcherClient(temporal_client, cfg, Metrics(), handover_target=lambda: 0.0)
    async with worker:
        assert share() == 1.0
        lowest, sent = 1.0, 0
        deadline = time.monotonic() + 30
        while lowest > 0.5 and time.monotonic() < deadline:
            await ingress.submit([event(f"e{sent}-{k}") for k in range(PRESSURE)])
            sent += 1
            for _ in range(50):  # the worker hears it when it takes the signal's workflow task
                lowest = min(lowest, share())
                await asyncio.sleep(0.01)
        await ingress.close()
        assert lowest <= 0.5, f"the worker's share stayed at {lowest} over {sent} signals"
        await asyncio.sleep(told.HOLD + 0.1)
        assert share() == 1.0  # told nothing for HOLD: whole again

    history = await temporal_client.get_workflow_handle(dispatcher_id(project, 0, 1)).fetch_history()
    headers = [
        e.workflow_execution_signaled_event_attributes.header.fields
        for e in history.events
        if e.HasField("workflow_execution_signaled_event_attributes")
    ]
    shares = [told.read(h[told.HEADER]) for h in headers if told.HEADER in h]
    assert shares and all(s is not None and s[0] == temporal_client.identity for s in shares), shares
    first = told.read(headers[0][told.HEADER])  # its events are waited on: told, with a whole share
    assert first is not None and first[1] == 1.0

    recording, counting = Recording(), CountSignals()
    sandbox = SandboxedWorkflowRunner(restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH))
    replayer = Replayer(
        workflows=[DispatcherWorkflow, TaskRunnerWorkflow],
        workflow_runner=sandbox,
        interceptors=[told.TellInterceptor(recording), counting],
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, result.replay_failure
    assert counting.signals == len(headers)  # every signal was replayed ...
    assert recording.heard == []  # ... and none of their headers was heard again
