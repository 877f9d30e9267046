"""Dispatcher histories built by hand, as an earlier version of the workflow wrote them, to replay
on this one with temporalio's Replayer: what a run open at an upgrade meets."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from temporalio.api.common.v1 import ActivityType, Payload, Payloads, WorkflowType
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import (
    ActivityTaskCompletedEventAttributes,
    ActivityTaskScheduledEventAttributes,
    ActivityTaskStartedEventAttributes,
    HistoryEvent,
    MarkerRecordedEventAttributes,
    TimerFiredEventAttributes,
    TimerStartedEventAttributes,
    WorkflowExecutionSignaledEventAttributes,
    WorkflowExecutionStartedEventAttributes,
    WorkflowTaskCompletedEventAttributes,
    WorkflowTaskScheduledEventAttributes,
    WorkflowTaskStartedEventAttributes,
)
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.client import WorkflowHistory
from temporalio.common import RawValue
from temporalio.converter import DataConverter, DefaultPayloadConverter, PayloadConverter
from temporalio.worker import Replayer

from bridge.routing import RouteTable
from dispatcher.contract import (
    DISPATCHER_WORKFLOW,
    EVENT_SIGNAL,
    DispatcherInput,
    DispatcherSettings,
    RoutesResult,
    wire,
)
from dispatcher.workflow import DispatcherWorkflow
from tests import helpers

PLAIN = PayloadConverter.default
QUEUE = TaskQueue(name="shop")


class History:
    """One dispatcher run's history, event by event."""

    def __init__(self, inp: DispatcherInput | None = None) -> None:
        self.events: list[HistoryEvent] = []
        self.completed = 0  # the last workflow task completed
        at = Timestamp()
        at.FromDatetime(datetime.now(UTC))
        self.at = at
        self.add(
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED,
            workflow_execution_started_event_attributes=WorkflowExecutionStartedEventAttributes(
                workflow_type=WorkflowType(name=DISPATCHER_WORKFLOW),
                task_queue=QUEUE,
                input=Payloads(payloads=PLAIN.to_payloads([inp or DispatcherInput(project="shop")])),
                original_execution_run_id="r1",
                first_execution_run_id="r1",
                attempt=1,
                workflow_task_timeout=Duration(seconds=10),
            ),
        )

    def add(self, kind: EventType.ValueType, **attributes: Any) -> int:
        self.events.append(
            HistoryEvent(event_id=len(self.events) + 1, event_time=self.at, event_type=kind, **attributes)
        )
        return len(self.events)

    def signal(self, *payloads: Payload, name: str = EVENT_SIGNAL) -> None:
        self.add(
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED,
            workflow_execution_signaled_event_attributes=WorkflowExecutionSignaledEventAttributes(
                signal_name=name, input=Payloads(payloads=payloads)
            ),
        )

    def events_signal(self, value: Any) -> None:
        self.signal(*PLAIN.to_payloads([value]))

    def task(self, complete: bool = True) -> None:
        scheduled = self.add(
            EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
            workflow_task_scheduled_event_attributes=WorkflowTaskScheduledEventAttributes(task_queue=QUEUE, attempt=1),
        )
        started = self.add(
            EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED,
            workflow_task_started_event_attributes=WorkflowTaskStartedEventAttributes(scheduled_event_id=scheduled),
        )
        if complete:
            self.completed = self.add(
                EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED,
                workflow_task_completed_event_attributes=WorkflowTaskCompletedEventAttributes(
                    scheduled_event_id=scheduled, started_event_id=started
                ),
            )

    def patch(self, patch_id: str) -> None:
        details = {"patch-data": Payloads(payloads=PLAIN.to_payloads([{"id": patch_id, "deprecated": False}]))}
        self.add(
            EventType.EVENT_TYPE_MARKER_RECORDED,
            marker_recorded_event_attributes=MarkerRecordedEventAttributes(
                marker_name="core_patch", details=details, workflow_task_completed_event_id=self.completed
            ),
        )

    def activity(self, activity_id: str, name: str, result: Any) -> None:
        scheduled = self.add(
            EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED,
            activity_task_scheduled_event_attributes=ActivityTaskScheduledEventAttributes(
                activity_id=activity_id,
                activity_type=ActivityType(name=name),
                task_queue=QUEUE,
                start_to_close_timeout=Duration(seconds=30),
                workflow_task_completed_event_id=self.completed,
            ),
        )
        started = self.add(
            EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED,
            activity_task_started_event_attributes=ActivityTaskStartedEventAttributes(
                scheduled_event_id=scheduled, attempt=1
            ),
        )
        self.add(
            EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED,
            activity_task_completed_event_attributes=ActivityTaskCompletedEventAttributes(
                result=Payloads(payloads=PLAIN.to_payloads([result])),
                scheduled_event_id=scheduled,
                started_event_id=started,
            ),
        )

    def timer(self, timer_id: str) -> None:
        started = self.add(
            EventType.EVENT_TYPE_TIMER_STARTED,
            timer_started_event_attributes=TimerStartedEventAttributes(
                timer_id=timer_id,
                start_to_fire_timeout=Duration(nanos=1_000_000),
                workflow_task_completed_event_id=self.completed,
            ),
        )
        self.add(
            EventType.EVENT_TYPE_TIMER_FIRED,
            timer_fired_event_attributes=TimerFiredEventAttributes(timer_id=timer_id, started_event_id=started),
        )

    async def replay(self, converter: DataConverter | None = None) -> BaseException | None:
        """The replay's failure, or None. In debug mode: no deadlock timeout, so a test that
        measures what the workflow decodes does not depend on the machine's speed."""
        replayer = Replayer(
            workflows=[DispatcherWorkflow], data_converter=converter or DataConverter.default, debug_mode=True
        )
        history = WorkflowHistory("dispatcher-shop", self.events)
        return (await replayer.replay_workflow(history, raise_on_replay_failure=False)).replay_failure


class CountingConverter(DefaultPayloadConverter):
    """Counts the bytes of the payloads it decodes (a RawValue asked for is handed over undecoded)."""

    decoded = 0

    def from_payloads(self, payloads: Sequence[Payload], type_hints: list[type] | None = None) -> list[Any]:
        hints: list[Any] = list(type_hints or [None] * len(payloads))
        CountingConverter.decoded += sum(len(p.data) for p, h in zip(payloads, hints, strict=True) if h is not RawValue)
        return super().from_payloads(payloads, type_hints)


COUNTING = dataclasses.replace(DataConverter.default, payload_converter_class=CountingConverter)


def routes(**settings: Any) -> Any:
    """LOAD_ROUTES' result, as the activity wires it: one entry triggered by order.created."""
    table = RouteTable.from_config(helpers.config("shop", "127.0.0.1:1", [helpers.runner("w", "order.created")]))
    return wire(RoutesResult(routes=table.spec(), settings=DispatcherSettings(**settings)))
