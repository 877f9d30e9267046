"""The ingest pipeline: per-event checks, one submission for the good ones, a bound on what waits."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import pytest

from bridge.config import parse_config
from bridge.errors import Overloaded, SenderOverloaded
from bridge.event import MAX_EVENT_BYTES, MAX_KEY_CHARS, MAX_SIGNAL_BYTES, EventSignal, encode, run_digest
from bridge.metrics import Metrics
from bridge.pipeline import Pipeline
from bridge.routing import RouteTable
from bridge.runtime.replay_runs import replayed
from dispatcher import starts
from tests.fakes import FakeSink

ROUTES = RouteTable.from_config(
    parse_config({"project": "p", "workflows": [{"id": "w", "workflow_type": "W", "triggers": [{"name": "a"}]}]})
)


def events(*ids: str, name: str = "a") -> list[EventSignal]:
    return [EventSignal(id=i, name=name, payload={}, source="test:s") for i in ids]


async def test_rejected_events_do_not_hold_back_the_good_ones() -> None:
    sink = FakeSink()
    outcomes = await Pipeline(ROUTES, sink).submit([*events("1"), *events("2", name="nope"), *events("3")], "test")
    assert [o.rejected.reason if o.rejected else None for o in outcomes] == [None, "unroutable", None]
    assert sink.calls == [["1", "3"]]


async def test_beyond_max_pending_events_submissions_are_refused_as_overloaded() -> None:
    sink = FakeSink()
    sink.release = asyncio.Event()  # Temporal stalls: the first submission waits
    pipeline = Pipeline(ROUTES, sink, max_pending=3, retry_after=7)
    first = asyncio.create_task(pipeline.submit(events("1", "2"), "test"))
    await sink.entered.wait()
    assert pipeline.pending == 2
    with pytest.raises(Overloaded) as exc:
        await pipeline.submit(events("4", "5"), "test")
    assert exc.value.retry_after == 7 and exc.value.reason == "overloaded"
    assert 'signal_bridge_overloaded_total{adapter="test"} 1.0' in pipeline.metrics.render().decode()
    sink.release.set()
    await first
    assert pipeline.pending == 0
    await pipeline.submit(events("4", "5"), "test")  # room again once Temporal took the first
    assert [e.id for e in sink.events] == ["1", "2", "4", "5"]


async def test_one_sender_leaves_the_others_a_share_of_the_waiting_events() -> None:
    """One token's large batches while Temporal was slow filled max_pending_events, and every
    other token, webhook and queue was refused as overloaded until they drained. Alone, a sender
    may use most of the room; past its share it must leave the others a share."""
    sink = FakeSink()
    sink.release = asyncio.Event()  # Temporal stalls
    pipeline = Pipeline(ROUTES, sink, max_pending=8, retry_after=7)
    assert pipeline.pending_share == 2  # a quarter by default
    hog = [asyncio.create_task(pipeline.submit(events(f"a{i}", f"a{i}b"), "test", sender="http:a")) for i in range(3)]
    await sink.entered.wait()
    await asyncio.sleep(0)
    assert pipeline.pending == 6  # alone, past its share: the others still have 2
    with pytest.raises(SenderOverloaded) as exc:
        await pipeline.submit(events("a3"), "test", sender="http:a")
    assert exc.value.retry_after == 7 and "6 events of this sender already wait" in str(exc.value)
    others = [
        asyncio.create_task(pipeline.submit(events("b1"), "test", sender="http:b")),
        asyncio.create_task(pipeline.submit(events("k1"), "test", sender="kafka:orders")),
    ]
    await asyncio.sleep(0)
    assert pipeline.pending == 8
    with pytest.raises(Overloaded) as full:  # the process is full now: no sender's share is left
        await pipeline.submit(events("n1"), "test", sender="http:c")
    assert not isinstance(full.value, SenderOverloaded)
    sink.release.set()
    await asyncio.gather(*hog, *others)
    assert pipeline.pending == 0 and not pipeline._pending_of
    await pipeline.submit(events("a3"), "test", sender="http:a")  # room again
    assert len(sink.events) == 9 and "n1" not in {e.id for e in sink.events}
    assert 'signal_bridge_overloaded_total{adapter="test"} 2.0' in pipeline.metrics.render().decode()


async def test_a_sender_batch_larger_than_its_share_goes_when_none_of_its_own_waits() -> None:
    sink = FakeSink()
    pipeline = Pipeline(ROUTES, sink, max_pending=100, max_pending_per_source=2)
    await pipeline.submit(events("1", "2", "3"), "test", sender="http:a")
    assert len(sink.events) == 3 and pipeline.pending_share == 2


async def test_a_sender_share_is_released_when_temporal_fails() -> None:
    sink = FakeSink(outages=1)
    pipeline = Pipeline(ROUTES, sink, max_pending=8)
    with pytest.raises(Exception, match="Temporal is down"):
        await pipeline.submit(events("1", "2"), "test", sender="http:a")
    assert not pipeline._pending_of
    await pipeline.submit(events("1", "2"), "test", sender="http:a")
    assert len(sink.events) == 2


async def test_one_batch_larger_than_the_cap_still_goes_when_nothing_waits() -> None:
    sink = FakeSink()
    await Pipeline(ROUTES, sink, max_pending=2).submit(events("1", "2", "3"), "test")
    assert len(sink.events) == 3


async def test_pending_count_is_released_when_temporal_fails() -> None:
    sink = FakeSink(outages=1)
    pipeline = Pipeline(ROUTES, sink, max_pending=5)
    with pytest.raises(Exception, match="Temporal is down"):
        await pipeline.submit(events("1"), "test")
    assert pipeline.pending == 0


async def test_a_batch_of_refusals_is_one_log_line_with_counts(caplog: pytest.LogCaptureFixture) -> None:
    sink = FakeSink()
    batch = [*events(*(f"u{i}" for i in range(50)), name="nope"), *events("ok")]
    pipeline = Pipeline(ROUTES, sink)
    with caplog.at_level(logging.WARNING, logger="bridge.pipeline"):
        await pipeline.submit(batch, "test")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "events rejected adapter=test count=50 unroutable=50 first: name=nope id=u0" in lines[0]
    text = pipeline.metrics.render().decode()
    assert 'signal_bridge_events_rejected_total{adapter="test",reason="unroutable"} 50.0' in text
    assert [e.id for e in sink.events] == ["ok"]


async def test_an_event_the_checks_fail_on_is_malformed_and_alone(caplog: pytest.LogCaptureFixture) -> None:
    """A value the encoder cannot take (a cycle, as a buggy decoder might leave) is refused alone,
    logged with its traceback; the event beside it goes through."""
    sink = FakeSink()
    bad, good = events("bad", "good")
    bad.metadata["self"] = bad.metadata  # json.dumps raises ValueError: circular reference
    with caplog.at_level(logging.ERROR, logger="bridge.pipeline"):
        outcomes = await Pipeline(ROUTES, sink).submit([bad, good], "test")
    assert [o.rejected.reason if o.rejected else None for o in outcomes] == ["malformed", None]
    assert [e.id for e in sink.events] == ["good"]
    assert "event could not be checked name=a id=bad" in caplog.text


class EncodingSink(FakeSink):
    """A sink that takes the pipeline's encodings, as the dispatcher client does."""

    def __init__(self) -> None:
        super().__init__()
        self.encoded: list[list[bytes]] = []

    async def submit_encoded(self, events: Sequence[EventSignal], encoded: Sequence[bytes]) -> None:
        self.encoded.append(list(encoded))
        await self.submit(events)


async def test_each_event_is_encoded_once_and_handed_over_with_it() -> None:
    sink = EncodingSink()
    batch = [*events("1"), *events("2", name="nope"), *events("3")]
    await Pipeline(ROUTES, sink).submit(batch, "test")
    assert sink.calls == [["1", "3"]]
    assert sink.encoded == [[encode(batch[0].to_dict()), encode(batch[2].to_dict())]]


async def test_a_sink_without_submit_encoded_gets_the_events_alone() -> None:
    sink = FakeSink()
    await Pipeline(ROUTES, sink).submit(events("1"), "test")
    assert sink.calls == [["1"]]


async def test_an_event_whose_runs_argument_would_be_too_large_is_refused_and_what_fits_is_taken() -> None:
    """Each run's argument carries the payload twice, within the dispatcher's MAX_TARGET_BYTES:
    an event of 983 KB to 1 MiB was accepted (202, committed), then every start of it failed."""
    routes = RouteTable.from_config(
        parse_config(
            {"project": "p", "workflows": [{"id": "w" * 200, "workflow_type": "W", "triggers": [{"name": "a"}]}]}
        )
    )
    pad = MAX_EVENT_BYTES - len(encode(EventSignal(id="e", name="a", payload={"pad": ""}, source="test:s").to_dict()))
    fits = EventSignal(id="e", name="a", payload={"pad": "x" * pad}, source="test:s")
    over = EventSignal(id="f", name="a", payload={"pad": "x" * (pad + 1)}, source="test:s")
    assert len(encode(fits.to_dict())) == MAX_EVENT_BYTES
    sink = EncodingSink()
    outcomes = await Pipeline(routes, sink).submit([fits, over], "test")
    assert [o.rejected.reason if o.rejected else None for o in outcomes] == [None, "too_large"]
    # The largest event taken starts: its argument is within what the dispatcher sends.
    [target] = routes.route(fits, {}).targets
    digest = run_digest("p", fits.source, fits.id)
    starts.plan(fits, MAX_EVENT_BYTES, digest, target, "exec", {"id": "dispatcher-p"}, strict=True)


async def test_an_event_over_the_signal_size_is_too_large_and_alone() -> None:
    sink = EncodingSink()
    big = EventSignal(id="big", name="a", payload={"pad": "x" * MAX_SIGNAL_BYTES}, source="test:s")
    outcomes = await Pipeline(ROUTES, sink).submit([big, *events("1")], "test")
    assert [o.rejected.reason if o.rejected else None for o in outcomes] == ["too_large", None]
    assert sink.calls == [["1"]]


@pytest.mark.parametrize("part", ["id", "name"])
async def test_an_id_or_name_over_max_key_chars_is_malformed_and_alone(part: str) -> None:
    """Each goes into its runs' argument and memo, and a batch of starts is sized by the events:
    an id of hundreds of KB could take a batch past Temporal's 2 MiB and end the dispatcher run."""
    routes = RouteTable.from_config(
        parse_config({"project": "p", "workflows": [{"id": "w", "workflow_type": "W", "triggers": [{"name": "a*"}]}]})
    )
    longest = "a" + "é" * (MAX_KEY_CHARS - 1)
    sink = FakeSink()
    events = [
        EventSignal(**{"id": "x", "name": "a", part: value}, payload={}, source="test:s")
        for value in (longest + "é", longest)
    ]
    outcomes = await Pipeline(routes, sink).submit(events, "test")
    assert outcomes[0].rejected is not None and outcomes[0].rejected.reason == "malformed"
    assert f"the event's {part} has {MAX_KEY_CHARS + 1} characters" in str(outcomes[0].rejected)
    assert outcomes[1].accepted and sink.calls == [[events[1].id]]


async def test_metrics_children_are_looked_up_once_per_label_set() -> None:
    metrics = Metrics()
    first = metrics.child(metrics.rejected, "http", "malformed")
    assert metrics.child(metrics.rejected, "http", "malformed") is first
    assert first is metrics.rejected.labels("http", "malformed")
    assert metrics.child(metrics.rejected, "http", "no_name") is not first
    await Pipeline(ROUTES, FakeSink(), metrics).submit([*events("1"), *events("2", name="nope")], "test")
    text = metrics.render().decode()
    assert 'signal_bridge_events_received_total{adapter="test"} 2.0' in text
    assert 'signal_bridge_events_accepted_total{adapter="test"} 1.0' in text
    assert 'signal_bridge_events_rejected_total{adapter="test",reason="unroutable"} 1.0' in text


async def test_the_loop_does_its_other_work_between_the_checks_of_a_batchs_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each event's schemas may take their whole budget (0.6 s or more): a batch of hundreds was
    checked in one go on the event loop, every other request waiting for all of it."""
    seen: list[str] = []
    pipeline = Pipeline(ROUTES, EncodingSink())
    examine = pipeline.examine

    def recorded(event: EventSignal, routes: RouteTable | None = None) -> Any:
        seen.append(event.id)
        return examine(event, routes)

    monkeypatch.setattr(pipeline, "examine", recorded)

    async def other() -> None:
        seen.append("other")

    batch = asyncio.create_task(pipeline.submit(events("1", "2", "3"), "test"))
    await asyncio.gather(batch, other())
    assert seen.index("other") < seen.index("3"), seen


async def test_ids_a_replay_would_give_are_refused_from_anyone_but_the_replay() -> None:
    """A sender could send, ahead of it, the id `replay runs` of a number (by default the time)
    would give its event: the replay's event was then a repeat of it, and started nothing."""
    original = EventSignal(id="order-1", name="a", payload={}, source="test:s")
    squatted = EventSignal(id="replay:1764500000:order-1", name="a", payload={}, source="test:s")
    spoofed = EventSignal(
        id="replay:1764500000:order-1", name="a", payload={}, source="test:s", metadata={"replay": "yes"}
    )
    sink = FakeSink()
    outcomes = await Pipeline(ROUTES, sink).submit([squatted, spoofed, replayed(original, 1764500000)], "test")
    assert [o.rejected.reason if o.rejected else None for o in outcomes] == ["malformed", "malformed", None]
    assert "kept for `signal-bridge replay runs`" in str(outcomes[0].rejected)
    assert sink.calls == [["replay:1764500000:order-1"]]
