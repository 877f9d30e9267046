"""OpenTelemetry tracing, when the config says ``tracing: {enabled: true}``; nothing at all when not.

One trace follows an event from its sender to the runs it starts:

- **receive**: a span per event at the adapter, the child of the ``traceparent`` the event came
  with (HTTP header, Kafka header, AMQP header or property), or the root of a new trace. The
  event's ``metadata.traceparent`` is then the receive span's, so everything after joins it;
- **submit**: the signal-with-start that hands the events to Temporal (one span per signal, linked
  to each event's receive span), with Temporal's own client span under it;
- **the dispatcher's handling** and **the target's start**: ``temporalio.contrib.opentelemetry``
  on the client and the worker; each start of a target is a child of its event's receive span and
  carries the trace in the run's headers, so a user's workflow with the same interceptor
  continues it, and so do the task runner's activities.

The exporter comes from the standard ``OTEL_*`` environment variables: OTLP over HTTP when
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set, the console
with ``OTEL_TRACES_EXPORTER=console``; ``OTEL_SERVICE_NAME`` names the service (default
``signal-bridge``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any, TypeGuard

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from temporalio.contrib.opentelemetry import TracingInterceptor

from bridge.event import EventSignal

log = logging.getLogger(__name__)
PROPAGATOR = TraceContextTextMapPropagator()
TRACER_NAME = "signal-bridge"
MAX_ATTRIBUTE = 1024  # characters of a span name or attribute the bridge makes, or a provider it makes keeps


def exporter_processor() -> SpanProcessor | None:
    """The span processor the ``OTEL_*`` variables ask for, or None (spans are made, not sent)."""
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return BatchSpanProcessor(OTLPSpanExporter())
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "console":
        return BatchSpanProcessor(ConsoleSpanExporter())
    return None


def install(processor: SpanProcessor | None = None) -> TracerProvider:
    """The process's tracer provider, made once: ``processor`` (tests pass an in-memory one), else
    what :func:`exporter_processor` finds. A provider set before (by an embedding application) is
    used as it is."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        if processor is not None:
            current.add_span_processor(processor)
        return current
    provider = TracerProvider(
        resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", TRACER_NAME)}),
        span_limits=SpanLimits(max_attribute_length=MAX_ATTRIBUTE),
    )
    chosen = processor or exporter_processor()
    if chosen is None:
        log.warning("tracing is enabled but no exporter is configured: set OTEL_EXPORTER_OTLP_ENDPOINT")
    else:
        provider.add_span_processor(chosen)
    trace.set_tracer_provider(provider)
    return provider


def interceptors() -> list[TracingInterceptor]:
    """For ``Client.connect``: the client's calls and, through it, the worker's workflows and activities."""
    return [TracingInterceptor(trace.get_tracer(TRACER_NAME))]


def context_of(event: EventSignal) -> Any:
    """The OpenTelemetry context of the event's ``metadata.traceparent`` (an empty one without),
    with its ``tracestate``: the receive span's, else the sender's (``metadata.headers``, where the
    adapters keep it), which the W3C spec asks to pass on. Only values of printable ASCII, as
    the spec has them: OpenTelemetry logs a ``tracestate`` it cannot read as it is, and a
    producer's newline there would write a line of its own choosing into the bridge's log."""
    carrier = {k: v for k in ("traceparent", "tracestate") if _header_like(v := event.metadata.get(k))}
    headers = event.metadata.get("headers")
    if "tracestate" not in carrier and isinstance(headers, dict) and _header_like(state := headers.get("tracestate")):
        carrier["tracestate"] = state
    return PROPAGATOR.extract(carrier)


def _header_like(value: object) -> TypeGuard[str]:
    """A string of printable ASCII (space to ``~``) and tabs, which W3C allows around a
    ``tracestate``'s commas: what a ``traceparent`` or ``tracestate`` may be."""
    return isinstance(value, str) and value.isascii() and value.replace("\t", " ").isprintable()


class EventTracer:
    """What the pipeline calls, when tracing is on (see :class:`bridge.pipeline.Tracer`)."""

    def __init__(self, provider: trace.TracerProvider | None = None) -> None:
        self.tracer = (provider or trace.get_tracer_provider()).get_tracer(TRACER_NAME)

    def received(self, events: Sequence[EventSignal], adapter: str) -> list[EventSignal]:
        """One receive span per event; each event then carries its receive span's traceparent."""
        out = []
        for event in events:
            # Cut here, not only by the provider's limits: the events are traced before they are
            # checked, and a megabyte-long name (refused later) would be a megabyte-long span in
            # the exporter's queue, and an export the collector refuses with others' spans in it.
            span = self.tracer.start_span(
                f"receive {event.name[:MAX_ATTRIBUTE]}",
                context=context_of(event),
                kind=SpanKind.CONSUMER,
                attributes={
                    "signal_bridge.event.id": event.id[:MAX_ATTRIBUTE],
                    "signal_bridge.event.name": event.name[:MAX_ATTRIBUTE],
                    "signal_bridge.source": event.source[:MAX_ATTRIBUTE],
                    "signal_bridge.adapter": adapter,
                },
            )
            carrier: dict[str, str] = {}
            PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
            span.end()
            out.append(dataclasses.replace(event, metadata={**event.metadata, **carrier}))
        return out

    @contextlib.contextmanager
    def submitting(self, events: Sequence[EventSignal]) -> Iterator[None]:
        """The submit span, current while the events are handed to Temporal: in the events' trace
        when they share one (a single request), else a trace of its own linked to each event's."""
        contexts = [trace.get_current_span(context_of(e)).get_span_context() for e in events]
        traces = {c.trace_id for c in contexts if c.is_valid}
        parent = context_of(events[0]) if len(traces) == 1 and contexts[0].is_valid else None
        links = [Link(c) for c in contexts if c.is_valid]
        with self.tracer.start_as_current_span(
            "submit",
            context=parent,
            kind=SpanKind.PRODUCER,
            links=links,
            attributes={"signal_bridge.events": len(events)},
        ):
            yield
