"""The receive spans the bridge makes (bridge/runtime/tracing.py), with an in-memory exporter."""

from __future__ import annotations

import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bridge.event import EventSignal
from bridge.runtime.tracing import MAX_ATTRIBUTE, EventTracer, context_of

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def traced(*events: EventSignal) -> tuple[list[EventSignal], InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return EventTracer(provider).received(events, "http"), exporter


def test_a_huge_name_or_id_makes_a_span_of_bounded_size() -> None:
    """Events are traced before they are checked: a 1 MB name, refused later, made a 1 MB span
    held in the exporter's queue."""
    (event,), exporter = traced(EventSignal(id="i" * 100_000, name="n" * 1_000_000, payload={}, source="http:t"))
    (span,) = exporter.get_finished_spans()
    assert len(span.name) == len("receive ") + MAX_ATTRIBUTE
    assert span.attributes is not None
    assert all(len(str(v)) <= MAX_ATTRIBUTE for v in span.attributes.values())
    assert span.attributes["signal_bridge.event.id"] == "i" * MAX_ATTRIBUTE
    assert event.name == "n" * 1_000_000  # the event itself is untouched


def test_the_senders_tracestate_is_passed_on() -> None:
    """The adapters keep ``tracestate`` in ``metadata.headers``; it was read from the top level
    only, so every receive span had an empty one."""
    sent = EventSignal(
        id="e-1",
        name="a",
        payload={},
        source="http:t",
        metadata={"traceparent": PARENT, "headers": {"traceparent": PARENT, "tracestate": "vendor=abc"}},
    )
    (event,), exporter = traced(sent)
    (span,) = exporter.get_finished_spans()
    assert span.context is not None and span.parent is not None
    assert span.parent.span_id == 0xB7AD6B7169203331
    assert span.context.trace_state.get("vendor") == "abc"
    assert event.metadata["tracestate"] == "vendor=abc"
    assert event.metadata["traceparent"] != PARENT  # the receive span's now
    assert context_of(event) is not None


def test_a_trace_header_that_is_not_printable_ascii_is_not_passed_on(caplog: pytest.LogCaptureFixture) -> None:
    """OpenTelemetry logs a tracestate it cannot read as it is: a Kafka or RabbitMQ producer's
    newline there wrote a log line of its choosing, twice per event."""
    hostile = "x\n2030-01-01 00:00:00,000 ERROR bridge.auth token accepted for admin \x1b[2J"
    sent = EventSignal(
        id="e-1",
        name="a",
        payload={},
        source="kafka:t",
        metadata={"traceparent": PARENT, "headers": {"traceparent": PARENT, "tracestate": hostile}},
    )
    with caplog.at_level(logging.DEBUG):
        (event,), exporter = traced(sent)
    (span,) = exporter.get_finished_spans()
    assert span.parent is not None and span.parent.span_id == 0xB7AD6B7169203331  # the parent still counts
    assert span.context is not None and len(span.context.trace_state) == 0
    assert "tracestate" not in event.metadata
    assert not any("\n" in r.getMessage() for r in caplog.records)


def test_a_tracestate_with_tabs_around_its_commas_is_passed_on() -> None:
    """W3C allows tabs around the commas between a tracestate's members."""
    sent = EventSignal(
        id="e-1",
        name="a",
        payload={},
        source="kafka:t",
        metadata={"traceparent": PARENT, "headers": {"tracestate": "a=1\t,\tb=2"}},
    )
    (_event,), exporter = traced(sent)
    (span,) = exporter.get_finished_spans()
    assert span.context is not None
    assert (span.context.trace_state.get("a"), span.context.trace_state.get("b")) == ("1", "2")
