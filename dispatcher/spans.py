"""Client spans for the raw Temporal calls that pass no client interceptor.

The dispatcher client's signal-with-start and the signals to open runs call the workflow service
directly (for their retries and request ids), so the SDK's OpenTelemetry interceptor does not see
them. :func:`client_span` makes the span it would have made, with its name, and the request
header that carries it, with the interceptor's own tracer, header key, propagator and converter:
the workflow side of the same interceptor reads it as it reads its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind, get_current_span
from temporalio.api.common.v1 import Header
from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor


def tracing_interceptor(client: Client) -> TracingInterceptor | None:
    """The OpenTelemetry interceptor ``client`` was built with, if any (look it up once, not per
    call: ``Client.config()`` copies the config at each call)."""
    return next((i for i in client.config()["interceptors"] if isinstance(i, TracingInterceptor)), None)


def current() -> Context:
    """The caller's trace context, to make a span of a later call its child (:func:`client_span`)."""
    return otel_context.get_current()


@contextlib.contextmanager
def client_span(
    tracing: TracingInterceptor | None, name: str, workflow_id: str, parents: Sequence[Context] = ()
) -> Iterator[Header | None]:
    """The client span ``name`` (the SDK's names: ``SignalWorkflow:{signal}``,
    ``SignalWithStartWorkflow:{type}``) for a call to ``workflow_id``, current while the block
    runs, and the header that carries it. None without an interceptor, or with no trace to carry.

    ``parents``: the contexts of the callers the call serves (one signal carries the submissions
    of several requests): the span is the child of the first of them that is sampled (else of the
    first), linked to the others'. Without them it is the current context's child."""
    if tracing is None:
        yield None
        return
    attributes = {"temporalWorkflowID": workflow_id}
    # The first sampled one: under load a sampled request is rarely the first in its signal.
    first = next((p for p in parents if get_current_span(p).get_span_context().trace_flags.sampled), None)
    parent = first if first is not None else (parents[0] if parents else None)
    others = [p for p in parents if p is not parent]
    links = [Link(c) for c in (get_current_span(p).get_span_context() for p in others) if c.is_valid]
    with tracing.tracer.start_as_current_span(
        name, context=parent, kind=SpanKind.CLIENT, attributes=attributes, links=links
    ):
        carrier: dict[str, str] = {}
        tracing.text_map_propagator.inject(carrier)
        if not carrier:
            yield None
        else:
            yield Header(fields={tracing.header_key: tracing.payload_converter.to_payloads([carrier])[0]})
