"""How a signal to an open run (a workflow entry's ``signal:``) answers Temporal's refusals."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest
from temporalio.api.common.v1 import Header, Payload
from temporalio.api.errordetails.v1 import NamespaceNotActiveFailure
from temporalio.client import Client
from temporalio.converter import DataConverter
from temporalio.service import RPCError, RPCStatusCode

from dispatcher.activities import REQUEST_HEADER, deliver_signal, request_id_of
from dispatcher.contract import MISSING, SIGNALED, TargetStart, failed
from tests.unit.test_dispatcher_client import _rpc_error


def refusing(error: RPCError) -> Client:
    async def signal_workflow_execution(request: Any) -> None:
        raise error

    service = SimpleNamespace(signal_workflow_execution=signal_workflow_execution)
    return cast(
        Client,
        SimpleNamespace(
            workflow_service=service, data_converter=DataConverter.default, namespace="default", identity="t"
        ),
    )


START = TargetStart(
    id="order-1",
    workflow_type="Order",
    task_queue="q",
    arg=cast(Any, {"input": {}}),
    memo={},
    signal="paid",
    request_id="r-1",
)


async def test_a_namespace_failing_over_is_retried_not_counted_failed() -> None:
    """FAILED_PRECONDITION is a signal's permanent refusal, but not while a global namespace is
    active in another cluster: counted failed, the event's signal was lost for good."""
    passing = _rpc_error(
        RPCStatusCode.FAILED_PRECONDITION, "namespace is not active", NamespaceNotActiveFailure(namespace="default")
    )
    with pytest.raises(RPCError):
        await deliver_signal(refusing(passing), START)


async def test_other_refusals_answer_failed_or_missing() -> None:
    refused = _rpc_error(RPCStatusCode.FAILED_PRECONDITION, "the run cannot take it")
    assert await deliver_signal(refusing(refused), START) == failed("the run cannot take it")
    gone = _rpc_error(RPCStatusCode.NOT_FOUND, "workflow not found")
    assert await deliver_signal(refusing(gone), START) == MISSING


async def test_every_signal_carries_its_request_id_beside_the_trace_context() -> None:
    """A retry finds an unheard signal in a run's history by this header (delivered_before)."""
    sent: list[Any] = []

    async def signal_workflow_execution(request: Any) -> None:
        sent.append(request)

    service = SimpleNamespace(signal_workflow_execution=signal_workflow_execution)
    client = cast(
        Client,
        SimpleNamespace(workflow_service=service, data_converter=DataConverter.default, namespace="d", identity="t"),
    )
    trace = Header(fields={"_tracer-data": Payload(data=b"{}")})
    assert await deliver_signal(client, START, trace) == SIGNALED
    assert await deliver_signal(client, START) == SIGNALED
    for request in sent:
        assert request_id_of(request.header) == "r-1"
    assert set(sent[0].header.fields) == {"_tracer-data", REQUEST_HEADER}
    assert set(trace.fields) == {"_tracer-data"}  # the caller's header is left as it was
