"""The shared settle path against in-memory fakes: what is held, dead-lettered, skipped or left
unacknowledged, which errors are retried, the backoff, the dead-letter headers and the header policy."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from bridge import pipeline as pipeline_module
from bridge import settle
from bridge.config import EventFormat
from bridge.deadletter import (
    HEADER_OVERHEAD,
    MAX_HEADER_VALUE,
    MAX_HEADERS,
    byte_size,
    cut_text,
    dead_letter_headers,
    fit_headers,
    is_dead_letter_header,
)
from bridge.decode import KEPT_HEADERS, Message, header_metadata
from bridge.errors import EventRejected, PartlyRefused
from bridge.event import EventSignal
from bridge.pipeline import Pipeline
from bridge.routing import RouteTable
from bridge.settle import Abandoned, Backoff, Disposition, Inbox, Item, Settler, Transport
from tests.fakes import FakeSink
from tests.helpers import config, runner

FAST = Backoff(initial=0.001, cap=0.004)


@dataclass(eq=False)
class Msg:
    id: str
    body: bytes
    alive: bool = True


class FakeTransport(Transport[Msg]):
    """Records what the settle path asks of a transport; can refuse dead letters or give up."""

    def __init__(self, *, dead_letters: bool = True) -> None:
        self.dead_letters = dead_letters
        self.letter_failures: list[Exception] = []  # raised by the next dead_letter calls, in order
        self.drop_letters: set[str] = set()  # ids whose letter cannot be written (marked DROPPED)
        self.letters: list[tuple[str, dict[str, str]]] = []
        self.acked: list[tuple[str, Disposition | None]] = []
        self.waits: list[float] = []
        self.give_up = False
        self.paused = False
        self.pauses = self.resumes = 0

    def to_message(self, message: Msg) -> Message:
        if message.body == b"decoder bug":
            raise RuntimeError("a decoder bug")
        return Message(body=message.body, source="fake:q", fallback_id=message.id)

    def fallback_id(self, message: Msg) -> str:
        return message.id

    def usable(self, message: Msg) -> bool:
        return message.alive

    def can_dead_letter(self) -> bool:
        return self.dead_letters

    async def dead_letter(self, items: Sequence[Item[Msg]]) -> None:
        if self.letter_failures:
            raise self.letter_failures.pop(0)
        for item in items:
            assert item.error is not None
            if item.message.id in self.drop_letters:
                item.disposition = Disposition.DROPPED
            else:
                self.letters.append((item.message.id, dead_letter_headers(item.error, item.event, {"queue": "q"})))

    async def acknowledge(self, items: Sequence[Item[Msg]]) -> None:
        self.acked.extend((i.message.id, i.disposition) for i in items)

    async def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        await asyncio.sleep(0)
        return not self.give_up

    def pause(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume(self) -> None:
        self.paused = False
        self.resumes += 1


def settler(
    sink: FakeSink | None = None,
    transport: FakeTransport | None = None,
    *,
    transient: tuple[type[Exception], ...] = (ConnectionError,),
    **kw: Any,
) -> Settler[Msg]:
    wf = runner("typed", "order.created")
    wf["triggers"][0]["schema"] = {"type": "object", "required": ["orderId"]}
    pipeline = Pipeline(RouteTable.from_config(config("unit", "127.0.0.1:7233", [wf])), sink or FakeSink())
    return Settler(
        pipeline,
        transport or FakeTransport(),
        adapter="fake",
        name="fake:q",
        event=EventFormat(),
        transient=transient,
        backoff=FAST,
        **kw,
    )


def good(i: int) -> Msg:
    return Msg(f"m-{i}", json.dumps({"name": "order.created", "payload": {"orderId": str(i)}, "id": f"e-{i}"}).encode())


def envelope(mid: str, name: str, payload: dict[str, Any]) -> Msg:
    return Msg(mid, json.dumps({"name": name, "payload": payload}).encode())


def metric(s: Settler[Msg], name: str, **labels: str) -> float:
    return s.pipeline.metrics.registry.get_sample_value(name, {"adapter": "fake", **labels}) or 0.0


def transport_of(s: Settler[Msg]) -> FakeTransport:
    assert isinstance(s.transport, FakeTransport)
    return s.transport


POISON = {
    "bad-json": (Msg("bad-json", b"{oops"), "malformed"),
    "no-name": (envelope("no-name", "", {"orderId": "1"}), "no_name"),
    "schema": (envelope("schema", "order.created", {"other": 1}), "schema_invalid"),
    "typo": (envelope("typo", "order.typo", {"orderId": "1"}), "unroutable"),
}


# --- one batch -----------------------------------------------------------------------------------


async def test_a_batch_is_parsed_and_settled_in_parts_and_each_part_let_go_of_before_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch was parsed whole before any of it was submitted: 500 Kafka records of a megabyte of
    tiny containers each took about 12 GB parsed. It goes in parts of DECODE_BYTES of bodies, in
    order, and what a part parsed is let go of before the next part is parsed."""
    batch = [good(i) for i in range(6)]
    monkeypatch.setattr(settle, "DECODE_BYTES", 2 * len(batch[0].body))
    sink = FakeSink()
    s = settler(sink)
    parsed_before: list[list[bool]] = []
    decode_one = s._decode

    def decode(message: Msg) -> Item[Msg]:  # what earlier items still hold as the next is parsed
        parsed_before.append([bool(i.encoded) for i in seen])
        item = decode_one(message)
        seen.append(item)
        return item

    seen: list[Item[Msg]] = []
    monkeypatch.setattr(s, "_decode", decode)
    items = await s.settle(batch)
    assert sink.calls == [["e-0", "e-1"], ["e-2", "e-3"], ["e-4", "e-5"]]
    assert [i.disposition for i in items] == [Disposition.HELD] * 6
    assert parsed_before[2] == [False, False] and parsed_before[4] == [False] * 4  # the parts before, let go of
    assert parsed_before[1] == [True]  # within a part, kept until it is settled
    assert all(i.event is not None and i.event.payload == {} and i.event.id for i in items)


async def test_good_events_are_held_in_one_submission_and_poison_is_dead_lettered_with_its_reason() -> None:
    sink = FakeSink()
    s = settler(sink)
    batch = [good(1), *(m for m, _ in POISON.values()), good(2)]
    items = await s.settle(batch)
    t = transport_of(s)
    assert sink.calls == [["e-1", "e-2"]]
    assert [i.message for i in items] == batch
    assert {i.message.id: i.disposition for i in items} == {
        "m-1": Disposition.HELD,
        "m-2": Disposition.HELD,
        **dict.fromkeys(POISON, Disposition.DEAD_LETTERED),
    }
    # Held ones are acknowledged as soon as Temporal holds them, the poison once its letters are out.
    assert t.acked[:2] == [("m-1", Disposition.HELD), ("m-2", Disposition.HELD)]
    assert sorted(t.acked[2:]) == sorted((mid, Disposition.DEAD_LETTERED) for mid in POISON)
    reasons = {mid: headers["x-dead-letter-reason"] for mid, headers in t.letters}
    assert reasons == {mid: why for mid, (_, why) in POISON.items()}
    letters = dict(t.letters)
    assert letters["schema"]["x-event-name"] == "order.created" and "x-event-id" in letters["schema"]
    assert "x-event-id" not in letters["bad-json"] and letters["bad-json"]["x-original-queue"] == "q"
    assert metric(s, "signal_bridge_events_accepted_total") == 2
    for why in ("malformed", "no_name", "schema_invalid", "unroutable"):
        assert metric(s, "signal_bridge_events_rejected_total", reason=why) == 1
    assert metric(s, "signal_bridge_events_received_total") == 4  # decoded ones, refused by check or not
    assert not s.waiting and t.pauses == 0


async def test_unroutable_skip_acks_without_a_letter_and_no_destination_drops(caplog: pytest.LogCaptureFixture) -> None:
    s = settler(on_unroutable="skip")
    items = await s.settle([POISON["typo"][0], POISON["bad-json"][0]])
    t = transport_of(s)
    assert [i.disposition for i in items] == [Disposition.SKIPPED, Disposition.DEAD_LETTERED]
    assert [mid for mid, _ in t.letters] == ["bad-json"]
    assert metric(s, "signal_bridge_events_dropped_total", reason="unroutable") == 1

    s = settler(transport=FakeTransport(dead_letters=False))
    with caplog.at_level(logging.INFO, logger="bridge.settle"):
        items = await s.settle([m for m, _ in POISON.values()])
    assert {i.disposition for i in items} == {Disposition.DROPPED}
    assert transport_of(s).acked == [(mid, Disposition.DROPPED) for mid in POISON]
    for why in ("malformed", "no_name", "schema_invalid", "unroutable"):
        assert metric(s, "signal_bridge_events_dropped_total", reason=why) == 1
    assert any("fake message dropped" in r.getMessage() and "from=typo" in r.getMessage() for r in caplog.records)


async def test_a_letter_the_transport_could_not_write_stays_dropped() -> None:
    t = FakeTransport()
    t.drop_letters = {"bad-json"}
    s = settler(transport=t)
    [item] = await s.settle([POISON["bad-json"][0]])
    assert item.disposition is Disposition.DROPPED and t.acked == [("bad-json", Disposition.DROPPED)]


async def test_a_decoder_bug_is_dead_lettered_as_malformed(caplog: pytest.LogCaptureFixture) -> None:
    s = settler()
    [item] = await s.settle([Msg("boom", b"decoder bug")])
    assert item.disposition is Disposition.DEAD_LETTERED and item.error is not None
    assert item.error.reason == "malformed" and "a decoder bug" in item.error.message
    assert any(r.levelno == logging.ERROR and "cannot decode or check boom" in r.getMessage() for r in caplog.records)


async def test_a_batch_too_large_for_one_signal_is_halved_and_one_event_too_large_is_poison() -> None:
    sink = FakeSink(max_events=2)
    s = settler(sink)
    batch = [good(i) for i in range(5)]
    items = await s.settle(batch)
    assert {i.disposition for i in items} == {Disposition.HELD}
    assert sorted(e.id for e in sink.held) == [f"e-{i}" for i in range(5)]
    ids = [f"e-{i}" for i in range(5)]
    assert sink.calls == [ids, ids[:2], ids[2:], ids[2:3], ids[3:]]  # each half on its own

    s = settler(FakeSink(max_events=0))
    [item] = await s.settle([good(1)])
    assert item.disposition is Disposition.DEAD_LETTERED and item.error is not None
    assert item.error.reason == "too_large"
    assert metric(s, "signal_bridge_events_rejected_total", reason="too_large") == 1


class PartlyTooLarge(FakeSink):
    """A server whose payload limit is below the bridge's: a submission of more than ``fits``
    events is held for its first ``fits`` (their own signal) and the rest refused as too large in a
    signal of their own, and ``e-big`` is too large even alone."""

    def __init__(self, fits: int) -> None:
        super().__init__()
        self.fits = fits

    async def submit(self, events: Sequence[EventSignal]) -> None:
        self.calls.append([e.id for e in events])
        if [e.id for e in events] == ["e-big"]:
            raise EventRejected("too_large", "Blob data size exceeds limit.")
        if len(events) <= self.fits and all(e.id != "e-big" for e in events):
            self.events.extend(events)
            return
        held = [e for e in events[: self.fits] if e.id != "e-big"]
        self.events.extend(held)
        raise PartlyRefused("held in part", frozenset(range(len(held))))


async def test_a_batch_held_in_part_and_refused_too_large_in_part_is_halved_not_dead_lettered() -> None:
    """A signal refused as too large says nothing of its events alone: halved, every event that
    fits in a signal is held (the held ones again start nothing twice), and only one too large
    alone is poison."""
    sink = PartlyTooLarge(fits=2)
    s = settler(sink)
    big = {"name": "order.created", "payload": {"orderId": "b"}, "id": "e-big"}
    batch = [good(0), good(1), good(2), Msg("m-big", json.dumps(big).encode()), good(3)]
    items = await asyncio.wait_for(s.settle(batch), 10)
    dispositions = [i.disposition for i in items]
    assert dispositions == [Disposition.HELD] * 3 + [Disposition.DEAD_LETTERED, Disposition.HELD]
    assert {e.id for e in sink.held} == {"e-0", "e-1", "e-2", "e-3"}
    assert len(sink.calls) <= 2 * len(batch), sink.calls
    assert metric(s, "signal_bridge_events_rejected_total", reason="too_large") == 1


async def test_messages_the_transport_can_no_longer_acknowledge_are_left_alone() -> None:
    sink = FakeSink()
    s = settler(sink)
    lost, lost_poison = good(1), Msg("lost-poison", b"{oops", alive=False)
    lost.alive = False
    items = await s.settle([lost, good(2), lost_poison])
    assert sink.calls == [["e-2"]]
    assert [i.disposition for i in items] == [None, Disposition.HELD, None]
    t = transport_of(s)
    assert t.acked == [("m-2", Disposition.HELD)] and t.letters == []


# --- outages and bugs ----------------------------------------------------------------------------


async def test_temporal_down_pauses_backs_off_and_acknowledges_only_once_it_holds_the_events() -> None:
    sink = FakeSink(outages=4)
    t = FakeTransport()
    s = settler(sink, t)
    acked_during_outage: list[Any] = []

    async def wait(seconds: float) -> bool:
        acked_during_outage.extend(t.acked)
        assert t.paused and s.waiting
        return await FakeTransport.wait(t, seconds)

    t.wait = wait  # type: ignore[method-assign]
    batch = [good(1), good(2)]
    await s.settle(batch)
    assert len(sink.calls) == 5 and all(call == ["e-1", "e-2"] for call in sink.calls)
    assert acked_during_outage == [] and t.acked == [("m-1", Disposition.HELD), ("m-2", Disposition.HELD)]
    assert t.pauses == 4 and t.resumes == 1 and not t.paused and not s.waiting
    assert len(t.waits) == 4 and all(0 < d <= FAST.cap for d in t.waits)
    assert metric(s, "signal_bridge_temporal_unavailable_total") == 4


async def test_a_transport_that_gives_up_while_waiting_abandons_the_batch_unsettled() -> None:
    t = FakeTransport()
    t.give_up = True
    s = settler(FakeSink(outages=10**6), t)
    with pytest.raises(Abandoned):
        await s.settle([good(1), POISON["bad-json"][0]])
    assert t.acked == [] and t.letters == []
    assert not s.waiting, "the outage ends with the batch: the next one starts unpaused"


async def test_an_unexpected_error_from_temporal_is_a_bug_raised_at_once_not_retried() -> None:
    sink = FakeSink(bugs=1)
    s = settler(sink)
    with pytest.raises(RuntimeError, match="a bug"):
        await s.settle([good(1), POISON["bad-json"][0]])
    t = transport_of(s)
    assert len(sink.calls) == 1 and t.waits == [] and t.acked == [] and t.letters == []


async def test_a_bug_during_an_outage_ends_the_outage_with_the_batch() -> None:
    """Temporal refuses, then fails unexpectedly: the batch is raised to the adapter, and nothing
    is left counting an outage (Kafka would pause the partitions assigned next, AMQP report waiting)."""
    sink = FakeSink(outages=1)
    t = FakeTransport()
    s = settler(sink, t)

    async def wait(seconds: float) -> bool:
        sink.bugs = 1
        return await FakeTransport.wait(t, seconds)

    t.wait = wait  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="a bug"):
        await s.settle([good(1)])
    assert t.pauses == 1 and t.acked == [] and not s.waiting

    del t.wait  # the next outage counts from its own start: its first delay is the initial one
    sink.outages = 1
    await s.settle([good(2)])
    assert len(t.waits) == 2 and t.waits[1] <= FAST.initial and not s.waiting
    assert t.acked == [("m-2", Disposition.HELD)] and t.resumes == 1


async def test_only_the_transports_own_transient_errors_are_retried_when_dead_lettering() -> None:
    t = FakeTransport()
    t.letter_failures = [ConnectionError("broker away"), ConnectionError("still away")]
    s = settler(transport=t, transient=(ConnectionError,))
    [held, poison] = await s.settle([good(1), POISON["bad-json"][0]])
    assert (held.disposition, poison.disposition) == (Disposition.HELD, Disposition.DEAD_LETTERED)
    assert len(t.waits) == 2 and t.resumes == 1
    assert t.acked == [("m-1", Disposition.HELD), ("bad-json", Disposition.DEAD_LETTERED)]

    t = FakeTransport()
    t.letter_failures = [ValueError("a bug in the transport")]
    s = settler(transport=t, transient=(ConnectionError,))
    with pytest.raises(ValueError):
        await s.settle([good(1), POISON["bad-json"][0]])
    assert t.acked == [("m-1", Disposition.HELD)] and t.waits == []  # the poison stays unacknowledged


async def test_a_dead_letter_destination_that_keeps_refusing_makes_the_adapter_unready_until_it_takes() -> None:
    """The queue or partitions read nothing while a batch's letters are refused: /readyz was green
    all along (a deleted exchange, a full queue that rejects publishes). A Temporal outage is
    /readyz's own ``temporal`` check, and leaves this one alone."""
    t = FakeTransport()
    t.letter_failures = [ConnectionError("exchange gone")] * (settle.LETTERS_UNHEALTHY + 1)
    s = settler(transport=t, transient=(ConnectionError,))
    seen: list[bool] = []
    real_wait = t.wait

    async def wait(seconds: float) -> bool:
        seen.append(s.letters_failing())
        return await real_wait(seconds)

    t.wait = wait  # type: ignore[method-assign]
    [poison] = await s.settle([POISON["bad-json"][0]])
    assert poison.disposition == Disposition.DEAD_LETTERED
    unhealthy_from = settle.LETTERS_UNHEALTHY - 1
    assert seen == [False] * unhealthy_from + [True] * (len(seen) - unhealthy_from) and len(seen) > unhealthy_from
    assert not s.letters_failing()  # the letter went out

    t = FakeTransport()
    sink = FakeSink(outages=settle.LETTERS_UNHEALTHY + 1)
    s = settler(transport=t, sink=sink)
    temporal_down: list[bool] = []

    async def wait_down(seconds: float) -> bool:
        temporal_down.append(s.letters_failing())
        return True

    t.wait = wait_down  # type: ignore[method-assign]
    await s.settle([good(1)])
    assert temporal_down and not any(temporal_down)


# --- the shared policies -------------------------------------------------------------------------


def test_backoff_is_capped_exponential_with_jitter() -> None:
    b = Backoff(initial=0.5, cap=10.0, jitter=0.2)
    for attempt, base in ((1, 0.5), (2, 1.0), (3, 2.0), (5, 8.0), (6, 10.0), (1000, 10.0)):
        delays = {b.delay(attempt) for _ in range(50)}
        assert all(base * 0.8 <= d <= base for d in delays), (attempt, delays)
        assert len(delays) > 1  # jittered: replicas do not retry in step
    assert Backoff(jitter=0).delay(2) == 1.0


def test_dead_letter_headers_say_why_where_from_and_which_event() -> None:
    event = EventSignal(id="e-1", name="order.created", payload={}, source="fake:q")
    headers = dead_letter_headers(EventRejected("schema_invalid", "x" * 5000), event, {"topic": "t", "offset": "4"})
    assert headers == {
        "x-dead-letter-reason": "schema_invalid",
        "x-dead-letter-error": "x" * 1000,
        "x-original-topic": "t",
        "x-original-offset": "4",
        "x-event-id": "e-1",
        "x-event-name": "order.created",
    }
    assert all(is_dead_letter_header(h.upper()) for h in headers)
    assert not any(is_dead_letter_header(h) for h in ("traceparent", "x-trace", "x-dead-letter"))


def test_header_metadata_keeps_trace_and_correlation_headers_only() -> None:
    meta = header_metadata(
        {"TraceParent": "00-a-b-01", "tracestate": "k=v", "Correlation-Id": "c-1", "authorization": "Bearer s"}
    )
    assert meta == {
        "headers": {"traceparent": "00-a-b-01", "tracestate": "k=v", "correlation-id": "c-1"},
        "correlation_id": "c-1",
        "traceparent": "00-a-b-01",
    }
    assert header_metadata({"x-correlation-id": "h"}, "property")["correlation_id"] == "property"
    assert header_metadata({"x-correlation-id": "h", "correlation-id": "c"})["correlation_id"] == "h"
    assert set(header_metadata({h: "v" for h in KEPT_HEADERS})["headers"]) == set(KEPT_HEADERS)
    assert header_metadata({}) == {"headers": {}}


# --- the inbox of a push-based transport ---------------------------------------------------------


async def test_inbox_batches_what_arrives_together_up_to_max_batch() -> None:
    inbox: Inbox[int] = Inbox(max_batch=3, linger=0.05)
    for i in range(5):
        inbox.put(i)
    assert await inbox.take() == [0, 1, 2]
    assert await inbox.take() == [3, 4]  # the linger passed with nothing more

    async def later() -> None:
        await asyncio.sleep(0.01)
        inbox.put(6)

    inbox.put(5)
    task = asyncio.create_task(later())
    assert await inbox.take() == [5, 6]  # the second came within the linger
    await task


async def test_a_closed_inbox_wakes_its_reader_and_then_yields_nothing() -> None:
    inbox: Inbox[int] = Inbox(max_batch=10, linger=1.0)
    waiting = asyncio.create_task(inbox.take())
    await asyncio.sleep(0)
    inbox.close()
    assert await asyncio.wait_for(waiting, 1) == []
    inbox.put(1)
    assert await inbox.take() == []  # closed stays closed; what is left is redelivered by the broker

    inbox = Inbox(max_batch=10, linger=1.0)
    inbox.put(1)
    inbox.close()
    assert await asyncio.wait_for(inbox.take(), 1) == [1]  # the batch in hand, without waiting out the linger
    assert await inbox.take() == []


# --- poison that once stalled a queue, overload, and letters that must get out --------------------


async def test_deep_nan_huge_and_undecodable_bodies_are_dead_lettered_and_neighbours_held() -> None:
    sink = FakeSink()
    s = settler(sink)
    poison = {
        "deep": Msg("deep", b'{"name": "order.created", "payload": ' + b"[" * 2_500 + b"]" * 2_500 + b"}"),
        "nan": Msg("nan", b'{"name": "order.created", "payload": {"orderId": NaN}}'),
        "huge-int": Msg("huge-int", b'{"name": "order.created", "payload": {"orderId": ' + b"7" * 5_000 + b"}}"),
        "utf8": Msg("utf8", b'{"name": "order.created", "payload": {"orderId": "\xff"}}'),
    }
    batch = [good(1), *poison.values(), good(2)]
    items = await s.settle(batch)
    assert sink.calls == [["e-1", "e-2"]]
    assert {i.message.id: (i.disposition, i.error.reason if i.error else None) for i in items} == {
        "m-1": (Disposition.HELD, None),
        "m-2": (Disposition.HELD, None),
        **dict.fromkeys(poison, (Disposition.DEAD_LETTERED, "malformed")),
    }
    assert not s.waiting


async def test_an_event_the_checks_fail_on_unexpectedly_is_refused_alone(caplog: pytest.LogCaptureFixture) -> None:
    sink = FakeSink()
    s = settler(sink)
    real_examine = s.pipeline.examine

    def examine(event: EventSignal) -> tuple[EventRejected | None, bytes]:
        if event.id == "e-2":
            raise RecursionError("maximum recursion depth exceeded")
        return real_examine(event)

    s.pipeline.examine = examine  # type: ignore[method-assign]
    items = await s.settle([good(1), good(2), good(3)])
    assert sink.calls == [["e-1", "e-3"]]
    assert [i.disposition for i in items] == [Disposition.HELD, Disposition.DEAD_LETTERED, Disposition.HELD]
    assert items[1].error is not None and items[1].error.reason == "malformed"
    assert any(r.levelno == logging.ERROR and "cannot decode or check m-2" in r.getMessage() for r in caplog.records)


async def test_overloaded_is_waited_out_like_an_outage_paused_and_nothing_acknowledged() -> None:
    """Overloaded (too many events already wait for Temporal in this process) is an Unavailable:
    the transport pauses and fetches nothing more, and the batch goes once the others are through."""
    sink = FakeSink()
    t = FakeTransport()
    s = settler(sink, t)
    s.pipeline.max_pending, s.pipeline.pending = 3, 3  # another adapter's events wait for Temporal

    async def wait(seconds: float) -> bool:
        assert t.paused and s.waiting and t.acked == [] and sink.calls == []
        if len(t.waits) == 2:
            s.pipeline.pending = 0
        return await FakeTransport.wait(t, seconds)

    t.wait = wait  # type: ignore[method-assign]
    await s.settle([good(1), good(2)])
    assert sink.calls == [["e-1", "e-2"]] and t.acked == [("m-1", Disposition.HELD), ("m-2", Disposition.HELD)]
    assert t.pauses == 3 and t.resumes == 1 and not t.paused and not s.waiting
    assert metric(s, "signal_bridge_overloaded_total") == 3
    assert metric(s, "signal_bridge_temporal_unavailable_total") == 0


async def test_a_letter_already_out_is_not_written_again_when_another_is_retried() -> None:
    class HalfOut(FakeTransport):
        async def dead_letter(self, items: Sequence[Item[Msg]]) -> None:
            for item in items:
                if item.message.id == "bad-json" and not self.letters:
                    self.letters.append((item.message.id, {}))
                    item.disposition = Disposition.DEAD_LETTERED  # out; the other one failed
                    raise ConnectionError("broker away")
            await super().dead_letter(items)

    t = HalfOut()
    s = settler(transport=t)
    await s.settle([POISON["bad-json"][0], POISON["typo"][0]])
    assert [mid for mid, _ in t.letters] == ["bad-json", "typo"] and len(t.waits) == 1
    assert sorted(t.acked) == [("bad-json", Disposition.DEAD_LETTERED), ("typo", Disposition.DEAD_LETTERED)]


async def test_a_message_lost_while_its_letter_is_retried_is_left_to_come_back() -> None:
    t = FakeTransport()
    t.letter_failures = [ConnectionError("broker away")]
    lost = Msg("lost", b"{oops")
    real_wait = t.wait

    async def wait(seconds: float) -> bool:
        lost.alive = False  # its channel closed meanwhile
        return await real_wait(seconds)

    t.wait = wait  # type: ignore[method-assign]
    s = settler(transport=t)
    [held, item] = await s.settle([good(1), lost])
    assert held.disposition is Disposition.HELD and item.disposition is None
    assert t.letters == [] and t.acked == [("m-1", Disposition.HELD)] and not s.waiting


async def test_sender_values_are_logged_escaped_and_cut(caplog: pytest.LogCaptureFixture) -> None:
    name = "order.\ninjected line " + "x" * 5_000
    s = settler(transport=FakeTransport(dead_letters=False))
    with caplog.at_level(logging.INFO):
        await s.settle([Msg("id\nwith-newline", json.dumps({"name": name, "payload": {}}).encode())])
    lines = [r.getMessage() for r in caplog.records if r.name == "bridge.settle"]
    assert lines and all("\n" not in line and len(line) < 1_500 for line in lines)
    assert any("from=id\\nwith-newline" in line and "name=order.\\ninjected" in line for line in lines)


# --- dead-letter header sizes ----------------------------------------------------------------------


def test_fit_headers_caps_each_value_and_the_total_ours_first() -> None:
    ours = {"x-dead-letter-reason": "unroutable", "x-event-id": "i" * 10_000, "x-event-name": "é" * 3_000}
    originals = [("small", b"v"), ("big-bytes", b"b" * 9_000), ("big-text", "t" * 9_000), ("table", {"k": "v" * 9_000})]
    headers, trimmed = fit_headers(ours, originals)
    got = dict(headers)
    assert trimmed
    assert len(got["x-event-id"]) == MAX_HEADER_VALUE and got["x-event-name"] == "é" * (MAX_HEADER_VALUE // 2)
    assert got["small"] == b"v" and got["big-bytes"] == b"b" * MAX_HEADER_VALUE
    assert got["big-text"] == "t" * MAX_HEADER_VALUE and "table" not in got  # a table cannot be cut
    assert [name for name, _ in headers][:3] == ["small", "big-bytes", "big-text"]  # the originals' order

    many = [(f"h{i}", b"v" * 1_000) for i in range(100)]
    headers, trimmed = fit_headers(ours, many)
    assert trimmed and sum(len(k) + byte_size(v) for k, v in headers) <= MAX_HEADERS
    assert {"x-dead-letter-reason", "x-event-id", "x-event-name"} <= dict(headers).keys()

    assert fit_headers({"x-dead-letter-reason": "r"}, [("a", b"1"), ("b", None)]) == (
        [("a", b"1"), ("b", None), ("x-dead-letter-reason", "r")],
        False,
    )


def test_fit_headers_counts_each_header_so_a_flood_of_empty_ones_is_cut() -> None:
    """Half a million headers with an empty name and value weigh nothing by their bytes, but a
    letter that kept them all was over 1 MiB: the producer refused it at every retry."""
    flood = [("", b"")] * 524_200
    headers, trimmed = fit_headers({"x-dead-letter-reason": "malformed"}, flood)
    assert trimmed and len(headers) <= MAX_HEADERS // HEADER_OVERHEAD
    assert dict(headers)["x-dead-letter-reason"] == "malformed"


def test_cut_text_keeps_whole_characters() -> None:
    assert cut_text("aé€😀", 5) == "aé"  # 1 + 2 bytes; € (3 more) would pass 5
    assert cut_text("aé€😀", 6) == "aé€"
    assert cut_text("short", 100) == "short"
    assert is_dead_letter_header("X-Dead-Letter-Trimmed")


async def test_a_window_of_bodies_slow_to_decode_gives_the_loop_turns_between_them() -> None:
    """A megabyte of tiny arrays takes about half a second to parse: a window of 200 decoded in one
    go held every other adapter, the Temporal client and the broker's heartbeats meanwhile."""
    ticks = 0
    seen: list[int] = []

    class Slow(FakeTransport):
        def to_message(self, message: Msg) -> Message:
            seen.append(ticks)
            time.sleep(settle.DECODE_TURN)  # a body that takes this long to parse
            return super().to_message(message)

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    running = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    items = await settler(transport=Slow()).settle([good(i) for i in range(5)])
    running.cancel()
    assert [i.disposition for i in items] == [Disposition.HELD] * 5
    assert len(set(seen)) == 5, seen  # the ticker ran between each two decodes


async def test_each_event_is_checked_and_encoded_once_however_often_its_batch_is_submitted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The settle path checked every event when it decoded it, then the pipeline checked and
    encoded it again at each submit, the schema included: twice the work for every event, more in
    an outage, all of a window in one stretch of the event loop."""
    sink = FakeSink(outages=2)
    s = settler(sink)
    encodings = 0
    real_encode = pipeline_module.encode

    def counting(value: Any) -> bytes:
        nonlocal encodings
        encodings += 1
        return real_encode(value)

    monkeypatch.setattr(pipeline_module, "encode", counting)
    items = await s.settle([good(1), good(2), good(3)])
    assert [i.disposition for i in items] == [Disposition.HELD] * 3 and len(sink.calls) == 3
    assert encodings == 3


async def test_a_letter_out_before_its_attempt_failed_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """A letter the broker took before a later one of the attempt failed is marked, so the retry
    does not write it again; the log line came only after an attempt that succeeded, so it had none."""

    class HalfWay(FakeTransport):
        failed = False

        async def dead_letter(self, items: Sequence[Item[Msg]]) -> None:
            items[0].disposition = Disposition.DEAD_LETTERED
            self.letters.append((items[0].message.id, {}))
            if not self.failed:
                self.failed = True
                raise ConnectionError("the broker went away after the first letter")
            for item in items[1:]:
                self.letters.append((item.message.id, {}))

    caplog.set_level(logging.INFO, logger="bridge.settle")
    t = HalfWay()
    s = settler(FakeSink(), t)
    await s.settle([envelope("bad-1", "order.typo", {}), envelope("bad-2", "order.typo", {})])
    assert [m for m, _ in t.letters] == ["bad-1", "bad-2"]
    logged = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert len(logged) == 2 and any("bad-1" in line for line in logged) and any("bad-2" in line for line in logged)


async def test_a_reload_while_a_batch_waits_out_an_outage_is_applied_to_it() -> None:
    """The batch's events are checked once, at decode, and not again at each submit; but a reload
    while the batch waits (here: a schema it no longer passes) must still refuse them, as each
    submit's own check did before: the dispatcher does not check schemas."""
    loose = runner("typed", "order.created")
    strict = runner("typed", "order.created")
    strict["triggers"][0]["schema"] = {"type": "object", "required": ["customer"]}  # good() has only orderId
    tables = {"now": RouteTable.from_config(config("unit", "127.0.0.1:7233", [loose]))}
    sink = FakeSink(outages=1)
    pipeline = Pipeline(lambda: tables["now"], sink)
    transport = FakeTransport()

    async def reload_while_waiting(seconds: float) -> bool:
        tables["now"] = RouteTable.from_config(config("unit", "127.0.0.1:7233", [strict]))  # a SIGHUP meanwhile
        return True

    transport.wait = reload_while_waiting  # type: ignore[method-assign]
    s = Settler(pipeline, transport, adapter="fake", name="fake:q", event=EventFormat(), backoff=Backoff(0.001, 0.002))
    [item] = await s.settle([good(1)])
    assert item.disposition is Disposition.DEAD_LETTERED and sink.held == []
    assert item.error is not None and item.error.reason == "schema_invalid"
