"""Tracing: the trace of an HTTP request's `traceparent` reaches the run the event starts, and the
user's workflow (with the OpenTelemetry interceptor) continues it, against a real Temporal server."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio import workflow
from temporalio.client import Client
from temporalio.worker import Worker

from bridge.runtime import tracing
from tests.helpers import HTTP_SCOPE, TOKEN, assert_eventually, config, result_of, run_id, unique
from tests.integration.test_signals import ORDER_WORKFLOW, OrderWorkflow

pytestmark = pytest.mark.temporal

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


@workflow.defn(name="TracedOrder", sandboxed=False)
class TracedOrder:
    @workflow.run
    async def run(self, arg: dict[str, Any]) -> str:
        return str(arg["trigger"].get("orderId"))


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    """The process's tracer provider, with an in-memory exporter (one provider per process)."""
    exporter = InMemorySpanExporter()
    tracing.install(SimpleSpanProcessor(exporter))
    return exporter


async def test_an_incoming_traceparent_is_continued_by_the_target_run(
    bridge_factory: Any, temporal_address: str, spans: InMemorySpanExporter
) -> None:
    project = unique("trace")
    queue = f"traced-{uuid.uuid4().hex[:8]}"
    cfg = config(
        project,
        temporal_address,
        [
            {
                "id": "traced",
                "workflow_type": "TracedOrder",
                "task_queue": queue,
                "triggers": [{"name": "order.created"}],
            }
        ],
        tracing={"enabled": True},
    )
    # The user's worker, on a client with the interceptor: its run continues the trace.
    user_client = await Client.connect(temporal_address, interceptors=tracing.interceptors())
    async with Worker(user_client, task_queue=queue, workflows=[TracedOrder]):
        bridge = await bridge_factory(cfg, client=None)  # it connects itself, with the interceptor
        async with httpx.AsyncClient(timeout=30) as http:
            resp = await http.post(
                f"http://127.0.0.1:{bridge.http_port}/api/v1/events",
                json={"name": "order.created", "payload": {"orderId": "o-1"}},
                headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": "t-1", "traceparent": TRACEPARENT},
            )
        assert resp.status_code == 202, resp.text
        wid = run_id(project, "traced", "t-1", HTTP_SCOPE)
        assert await result_of(user_client, wid) == "o-1"

        def in_trace() -> set[str]:
            names = {s.name for s in spans.get_finished_spans() if f"{s.context.trace_id:032x}" == TRACE_ID}
            assert {"receive order.created", "StartWorkflow:TracedOrder", "RunWorkflow:TracedOrder"} <= names, names
            return names

        names = await assert_eventually(in_trace, timeout=30, what="the run's spans in the sender's trace")
        # The hand-over and the dispatcher's handling of the event are in the same trace.
        assert {"submit", "SignalWithStartWorkflow:SignalBridgeDispatcher", "dispatch order.created"} <= names, names


async def test_a_signal_to_an_open_run_carries_the_trace(
    bridge_factory: Any, temporal_address: str, spans: InMemorySpanExporter
) -> None:
    """The signal the bridge sends to an open run is a span of the sender's trace, and the run's
    HandleSignal span (the user's interceptor) links to it through the request header. The run
    is test_signals' OrderWorkflow, which records each payment's event."""
    trace_id = uuid.uuid4().hex
    project = unique("trace-signal")
    queue = f"traced-{uuid.uuid4().hex[:8]}"
    account = unique("account")
    cfg = config(
        project,
        temporal_address,
        [
            {
                "id": "deposits",
                "workflow_type": ORDER_WORKFLOW,
                "task_queue": queue,
                "signal": {"name": "payment", "workflow_id": "{{ .trigger.account }}"},
                "triggers": [{"type": "signal", "name": "account.deposit"}],
            }
        ],
        tracing={"enabled": True},
    )
    user_client = await Client.connect(temporal_address, interceptors=tracing.interceptors())
    async with Worker(user_client, task_queue=queue, workflows=[OrderWorkflow]):
        handle = await user_client.start_workflow(OrderWorkflow.run, {}, id=account, task_queue=queue)
        bridge = await bridge_factory(cfg, client=None)
        async with httpx.AsyncClient(timeout=30) as http:
            resp = await http.post(
                f"http://127.0.0.1:{bridge.http_port}/api/v1/events",
                json={"name": "account.deposit", "payload": {"account": account}},
                headers={
                    "Authorization": f"Bearer {TOKEN}",
                    "Idempotency-Key": "d-1",
                    "traceparent": f"00-{trace_id}-b7ad6b7169203331-01",
                },
            )
        assert resp.status_code == 202, resp.text

        async def delivered() -> bool:
            return len(await handle.query(OrderWorkflow.event_ids)) == 1

        await assert_eventually(delivered, timeout=30, what="the deposit signal delivered")

        def traced() -> bool:
            finished = spans.get_finished_spans()
            names = {s.name for s in finished if f"{s.context.trace_id:032x}" == trace_id}
            assert {"receive account.deposit", "dispatch account.deposit", "SignalWorkflow:payment"} <= names, names
            handled = [s for s in finished if s.name == "HandleSignal:payment" and s.attributes is not None]
            linked = [s for s in handled if any(f"{link.context.trace_id:032x}" == trace_id for link in s.links)]
            assert linked, [(s.name, [f"{x.context.trace_id:032x}" for x in s.links]) for s in handled]
            return True

        await assert_eventually(traced, timeout=30, what="the signal's span, and the run's link to it")
        await handle.terminate("test done")


async def test_each_requests_hand_over_is_in_its_own_trace(
    bridge_factory: Any, temporal_address: str, spans: InMemorySpanExporter
) -> None:
    """The client's senders start with the first submission: in its context, every later
    request's signal span was a child of that first request, in its trace (and not recorded at
    all when its sender chose not to sample)."""
    project = unique("trace-each")
    cfg = config(
        project,
        temporal_address,
        [{"id": "w", "workflow_type": "Untraced", "task_queue": unique("nobody"), "triggers": [{"name": "a"}]}],
        tracing={"enabled": True},
    )
    bridge = await bridge_factory(cfg, client=None)
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    async with httpx.AsyncClient(timeout=30) as http:
        for key, (trace_id, flags) in enumerate(((first, "00"), (second, "01"))):
            resp = await http.post(
                f"http://127.0.0.1:{bridge.http_port}/api/v1/events",
                json={"name": "a", "payload": {}},
                headers={
                    "Authorization": f"Bearer {TOKEN}",
                    "Idempotency-Key": f"each-{key}",
                    "traceparent": f"00-{trace_id}-b7ad6b7169203331-{flags}",
                },
            )
            assert resp.status_code == 202, resp.text

    def handed_over() -> bool:
        signals = [
            f"{s.context.trace_id:032x}"
            for s in spans.get_finished_spans()
            if s.name == "SignalWithStartWorkflow:SignalBridgeDispatcher"
            and f"{s.context.trace_id:032x}" in (first, second)
        ]
        assert signals == [second], signals  # the first was not sampled; the second is its own
        return True

    await assert_eventually(handed_over, timeout=10, what="the second request's hand-over span")


def test_a_signal_carrying_several_requests_is_the_child_of_a_sampled_one(spans: InMemorySpanExporter) -> None:
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    from dispatcher.spans import client_span

    def context(trace_id: int, sampled: bool) -> Any:
        flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
        span = NonRecordingSpan(SpanContext(trace_id, 0x1234, is_remote=True, trace_flags=flags))
        return trace.set_span_in_context(span)

    interceptor = tracing.interceptors()[0]
    unsampled, sampled = uuid.uuid4().int >> 64, uuid.uuid4().int >> 64
    parents = [context(unsampled, False), context(sampled, True)]
    with client_span(interceptor, "SignalWithStartWorkflow:X", "w", parents):
        pass
    [made] = [s for s in spans.get_finished_spans() if s.name == "SignalWithStartWorkflow:X"]
    assert made.context.trace_id == sampled and [link.context.trace_id for link in made.links] == [unsampled]
