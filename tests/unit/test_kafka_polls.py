"""The Kafka adapter's polls without a broker: a poll that fails is undone, so no record it took is
skipped; polls that keep failing show in /readyz, a metric and a rate-limited log; a batch given up
in an outage leaves no partition paused; and every codec a topic may be compressed with is there."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import TopicPartition, codec
from aiokafka.errors import (
    CorruptRecordException,
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    UnsupportedCodecError,
)
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords

from adapters import kafka, kafka_replay, replay_common
from adapters.kafka_batches import FETCH_BYTES
from adapters.kafka_parse import MIN_LETTER_BYTES
from bridge.errors import Unavailable
from bridge.settle import Backoff, Disposition, Item
from tests.fakes import FakeSink
from tests.helpers import assert_eventually
from tests.unit.test_kafka_batches import FakeFetchClient, producer_batch
from tests.unit.test_kafka_parse import (
    TP0,
    TP1,
    FakeConsumer,
    FakeProducer,
    adapter_with,
    batch,
    good,
    offsets_held,
    record,
)
from tests.unit.test_kafka_topics import TopicsConsumer

LZ4 = UnsupportedCodecError("Libraries for lz4 compression codec not found")
BAD_HEADER = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")


class LogConsumer(FakeConsumer):
    """A consumer over one log per partition, positioned as aiokafka's is: a poll takes the records
    after each partition's position, partition by partition, and advances each position as it
    takes them. ``failing[tp] = (error, n)``: the next ``n`` polls that reach ``tp`` raise there,
    after taking the partitions before it, and what they took is lost with the exception. That is
    aiokafka 0.14's ``Fetcher.fetched_records`` meeting a batch in a codec it lacks, or a header
    name that is not UTF-8, on one partition after draining another."""

    def __init__(self, lengths: dict[TopicPartition, int], committed: dict[TopicPartition, int] | None = None) -> None:
        super().__init__(set(lengths))
        self.logs = {
            tp: [record(good(tp.partition * 100 + i), partition=tp.partition, offset=i) for i in range(n)]
            for tp, n in lengths.items()
        }
        self.committed_offsets = dict(committed or {})
        self.positions = {tp: self.committed_offsets.get(tp, 0) for tp in lengths}  # auto_offset_reset: earliest
        self.failing: dict[TopicPartition, tuple[Exception, int]] = {}
        self.unreadable: set[tuple[TopicPartition, int]] = set()  # records every poll fails on
        self.unreadable_error: Exception = BAD_HEADER  # what polls raise on them
        self.failed = 0
        self.taken_then_lost = 0
        self.polled_alone: list[TopicPartition] = []

    def end_offset(self, tp: TopicPartition) -> int:
        return len(self.logs[tp])

    async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> dict:
        await asyncio.sleep(0.001)
        if self._paused == self._assigned:
            self.polls_while_paused += 1
            return {}
        left, taken = max_records or 500, {}
        self.polled_alone.extend(tps)
        for tp in sorted(self._assigned - self._paused):
            if tps and tp not in tps:
                continue
            error, n = self.failing.get(tp, (None, 0))
            if error is not None and n:
                self.failing[tp] = (error, n - 1)
                self.failed += 1
                self.taken_then_lost += sum(len(recs) for recs in taken.values())
                raise error
            start = self.positions[tp]
            recs = self.logs[tp][start : start + left]
            bad = next((i for i, r in enumerate(recs) if (tp, r.offset) in self.unreadable), None)
            if bad is not None:  # the records before it are taken, then lost with the error
                self.positions[tp] = start + bad
                self.failed += 1
                self.taken_then_lost += sum(len(r) for r in taken.values()) + bad
                raise self.unreadable_error
            if recs:
                taken[tp] = recs
                self.positions[tp] = start + len(recs)
                left -= len(recs)
            if not left:
                break
        return taken


def everything(consumer: LogConsumer) -> list[str]:
    return sorted(str(tp.partition * 100 + i) for tp, log in consumer.logs.items() for i in range(len(log)))


def committed(consumer: FakeConsumer) -> dict[TopicPartition, int]:
    out: dict[TopicPartition, int] = {}
    for commit in consumer.commits:
        out.update(commit)
    return out


@contextlib.asynccontextmanager
async def running(consumer: FakeConsumer, sink: FakeSink, **entry: Any) -> AsyncIterator[kafka.KafkaAdapter]:
    adapter, _ = adapter_with(sink, **entry)
    adapter.consumer = consumer  # type: ignore[assignment]
    adapter._task = asyncio.create_task(adapter._run())
    try:
        yield adapter
    finally:
        adapter._stopping.set()
        adapter._arrived.set()
        adapter._room.set()
        await adapter._task


# --- a failed poll is undone -------------------------------------------------------------------


async def test_records_a_poll_took_before_a_codec_error_on_another_partition_are_read_again():
    """UnsupportedCodecError is a KafkaError: it used to be logged and waited out, leaving the other
    partition's position past the records the poll took and dropped; the next commit passed them."""
    sink = FakeSink()
    consumer = LogConsumer({TP0: 5, TP1: 2})
    consumer.failing[TP1] = (LZ4, 2)
    async with running(consumer, sink):
        await assert_eventually(lambda: sorted(offsets_held(sink)) == everything(consumer), timeout=5, interval=0.005)
        await assert_eventually(lambda: committed(consumer) == {TP0: 5, TP1: 2}, timeout=5, interval=0.005)
    assert consumer.failed == 2 and consumer.taken_then_lost == 10


async def test_a_record_the_client_cannot_read_sends_back_partitions_without_a_commit_too():
    """The unreadable-record path sought to the committed offsets, which aiokafka does only for a
    partition whose commit is over 0: one of a new group kept its position past what the poll lost."""
    sink = FakeSink()
    consumer = LogConsumer({TP0: 3, TP1: 2}, committed={TP1: 0})  # TP0: nothing committed yet
    consumer.failing[TP1] = (BAD_HEADER, 1)  # once: read alone, it reads (nothing to skip)
    async with running(consumer, sink) as adapter:
        await assert_eventually(lambda: sorted(offsets_held(sink)) == everything(consumer), timeout=5, interval=0.005)
        await assert_eventually(lambda: committed(consumer) == {TP0: 3, TP1: 2}, timeout=5, interval=0.005)
        assert consumer.resets == [], "every position was known: sought back to it, not reset"
        assert adapter.healthy(), "a record read around is not an outage"
    assert consumer.failed == 1 and consumer.taken_then_lost == 3


async def test_what_was_read_ahead_is_kept_and_the_failed_poll_is_read_again_after_it():
    sink = FakeSink()
    sink.release = asyncio.Event()
    consumer = LogConsumer({TP0: 3, TP1: 0})
    async with running(consumer, sink, max_batch=2) as adapter:
        await asyncio.wait_for(sink.entered.wait(), 5)  # TP0 0-1 in flight
        await assert_eventually(lambda: adapter._ahead_records == 1, timeout=5, interval=0.005)  # TP0 2 ahead
        consumer.logs[TP0].append(record(good(3), partition=0, offset=3))
        consumer.failing[TP1] = (LZ4, 1)  # the next poll takes TP0 3, then fails
        await assert_eventually(lambda: consumer.failed == 1, timeout=5, interval=0.005)
        assert consumer.taken_then_lost == 1 and adapter._ahead_records >= 1
        sink.release.set()
        await assert_eventually(lambda: committed(consumer) == {TP0: 4}, timeout=5, interval=0.005)
    assert offsets_held(sink) == ["0", "1", "2", "3"], "in order, each once"


async def test_a_seek_while_the_poll_is_in_flight_is_where_a_failed_poll_goes_back_to():
    """A batch that fails is rewound (its partitions sought back) while the reader polls: if that
    poll then fails, its partitions go back to the rewind's offsets, not to where the poll began."""
    gate = asyncio.Event()

    class Slow(LogConsumer):
        async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> dict:
            await gate.wait()
            return await super().getmany(*tps, timeout_ms=timeout_ms, max_records=max_records)

    consumer = Slow({TP0: 5, TP1: 1})
    consumer.positions[TP0] = 3
    consumer.failing[TP1] = (LZ4, 1)
    adapter, _ = adapter_with(FakeSink())
    adapter.consumer = consumer  # type: ignore[assignment]
    poll = asyncio.create_task(adapter._getmany(500))
    await assert_eventually(lambda: adapter._polls, timeout=5, interval=0.001)
    adapter._rewind({TP0: [record(good(1), offset=1)]})  # the batch in hand failed
    gate.set()
    with pytest.raises(UnsupportedCodecError):
        await poll
    assert consumer.positions == {TP0: 1, TP1: 0} and not adapter._polls


@pytest.mark.parametrize("reset", ["earliest", "latest"])
async def test_after_a_rebalance_during_a_failed_poll_partitions_go_back_to_the_commit_or_the_reset(reset: str):
    """A rebalance sets every position from the commits (or auto_offset_reset), not from where the
    poll began: a partition the failed poll took records of goes back to its commit or the reset."""
    tp2 = TopicPartition("orders", 2)
    start = {"earliest": 0, "latest": 4}[reset]

    class Rebalancing(LogConsumer):
        async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> dict:
            adapter._generation += 1  # revoked and assigned again meanwhile
            self.positions = {TP0: self.committed_offsets[TP0], TP1: start, tp2: 0}
            return await super().getmany(*tps, timeout_ms=timeout_ms, max_records=max_records)

    consumer = Rebalancing({TP0: 9, TP1: 4, tp2: 0}, committed={TP0: 7})
    consumer.positions = {TP0: 8, TP1: 2, tp2: 0}  # before the poll
    consumer.failing[tp2] = (LZ4, 1)  # TP0 and TP1 are taken first
    adapter, _ = adapter_with(FakeSink(), auto_offset_reset=reset)
    adapter.consumer = consumer  # type: ignore[assignment]
    with pytest.raises(UnsupportedCodecError):
        await adapter._getmany(500)
    assert consumer.taken_then_lost == 2 + 4 - start
    assert consumer.positions == {TP0: 7, TP1: start, tp2: 0}
    assert consumer.resets == [(TP1, reset), (tp2, reset)]


async def test_a_partition_without_a_commit_goes_back_to_where_the_rebalance_started_it_not_to_a_new_reset():
    """With ``latest``, a partition assigned during a poll starts at the end of its log. If the poll
    then fails, a second reset would put it at the end again, past what was written in between and
    taken by the failed poll: the origin noted at assignment is where it goes back to."""

    class Rebalancing(LogConsumer):
        rebalanced = False

        def partitions_for_topic(self, topic: str) -> set[int]:
            return {0, 1}

        async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> dict:
            if not self.rebalanced:
                self.rebalanced = True
                await adapter._on_revoked({TP0})
                self._assigned = {TP0, TP1}
                self.positions = {TP0: self.committed_offsets[TP0], TP1: self.end_offset(TP1)}  # TP1: latest
                adapter._on_assigned({TP0, TP1})
                await adapter._note_origins({TP0, TP1})
                self.logs[TP1] += [record(good(100 + i), partition=1, offset=i) for i in range(4, 7)]  # written since
            return await super().getmany(*tps, timeout_ms=timeout_ms, max_records=max_records)

    consumer = Rebalancing({TP0: 3, TP1: 4}, committed={TP0: 3})
    consumer._assigned = {TP0}
    del consumer.positions[TP1]
    sink = FakeSink()
    adapter, _ = adapter_with(sink, auto_offset_reset="latest")
    adapter.consumer = consumer  # type: ignore[assignment]

    class FailsAfterTaking(Exception):
        pass

    taken = consumer.getmany

    async def getmany(*tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> dict:
        got = await taken(*tps, timeout_ms=timeout_ms, max_records=max_records)
        if got.get(TP1):
            raise FailsAfterTaking  # as a third partition's batch in a codec the client lacks would
        return got

    consumer.getmany = getmany  # type: ignore[method-assign]
    with pytest.raises(FailsAfterTaking):
        await adapter._getmany(500)
    assert consumer.positions == {TP0: 3, TP1: 4} and consumer.resets == []
    assert adapter._origins == {TP0: 3, TP1: 4}


async def test_each_origin_is_noted_as_soon_as_it_is_set_and_the_rebalance_does_not_wait_for_them():
    """The origins were noted all at once when every position was set: a partition slow to get its
    position (its leader slow to answer) left the others without one, and they were reset again.
    And the listener waited for them, while aiokafka sends no heartbeat: a slow broker could cost
    the member its session."""
    tp2 = TopicPartition("orders", 2)
    consumer = Rebalancing({TP0: 3, TP1: 4, tp2: 1}, tp2, at=0)  # partitions_for_topic; never rebalances
    consumer.committed_offsets = {TP0: 3}
    consumer.positions = {TP0: 3, TP1: 0}  # tp2's position is not set (here: ever)
    adapter, _ = adapter_with(FakeSink(), auto_offset_reset="latest")
    adapter.consumer = consumer  # type: ignore[assignment]
    await asyncio.wait_for(kafka._Listener(adapter).on_partitions_assigned({TP0, TP1, tp2}), 1)
    await assert_eventually(lambda: adapter._origins == {TP0: 3, TP1: 0}, timeout=2, interval=0.01)
    assert len(adapter._noting) == 1  # tp2's, still waiting
    await adapter._on_revoked({TP0, TP1, tp2})
    assert adapter._origins == {}
    await assert_eventually(lambda: not adapter._noting, timeout=2, interval=0.01, what="the wait cancelled")


async def test_a_partition_whose_position_was_not_set_before_the_failed_poll_goes_back_to_its_commit():
    class Late(LogConsumer):
        async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> dict:
            self.positions.setdefault(TP0, 2)  # aiokafka sets it from the commit during the poll
            return await super().getmany(*tps, timeout_ms=timeout_ms, max_records=max_records)

    consumer = Late({TP0: 5, TP1: 1}, committed={TP0: 2})
    del consumer.positions[TP0]  # just assigned: aiokafka is still reading its committed offset
    consumer.failing[TP1] = (LZ4, 1)
    adapter, _ = adapter_with(FakeSink())
    adapter.consumer = consumer  # type: ignore[assignment]
    with pytest.raises(UnsupportedCodecError):
        await adapter._getmany(500)
    assert consumer.taken_then_lost == 3 and consumer.positions == {TP0: 2, TP1: 0} and consumer.resets == []


# --- polls that keep failing -------------------------------------------------------------------


async def test_polls_that_keep_failing_turn_readyz_red_count_and_log_once_a_minute(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    caplog.set_level(logging.DEBUG, logger="adapters.kafka")
    sink = FakeSink()
    consumer = LogConsumer({TP0: 1, TP1: 1})
    consumer.failing[TP1] = (LZ4, 1)
    async with running(consumer, sink) as adapter:
        await assert_eventually(lambda: consumer.failed == 1, timeout=5, interval=0.005)
        assert adapter.healthy(), "one failed poll may be a passing broker error"
        consumer.failing[TP1] = (LZ4, 4)
        await assert_eventually(lambda: consumer.failed == 5, timeout=5, interval=0.005)
        assert not adapter.healthy()
        text = adapter.pipeline.metrics.render().decode()
        assert 'signal_bridge_kafka_poll_failures_total{check="kafka:orders",error="UnsupportedCodecError"} 5.0' in text
        lines = [r for r in caplog.records if r.name == "adapters.kafka" and "poll failed" in r.getMessage()]
        assert [r.levelno for r in lines] == [logging.WARNING] + [logging.DEBUG] * 4
        assert "lz4" in lines[0].getMessage() and "docs/kafka.md#compression" in lines[0].getMessage()
        await assert_eventually(lambda: sorted(offsets_held(sink)) == everything(consumer), timeout=5)
        monkeypatch.setattr(kafka, "POLL_RECOVERY", 0.0)  # no failure for that long: a run of them ends
        assert adapter.healthy()


# --- a batch given up in an outage -------------------------------------------------------------


async def test_partitions_assigned_after_a_batch_was_given_up_in_an_outage_are_read():
    """Temporal down, then a rebalance takes the partitions: the batch is abandoned. The outage
    count used to outlive it, so partitions assigned later were paused, and nothing resumed them."""
    sink = FakeSink(outages=10**6)
    adapter, _ = adapter_with(sink)
    consumer = adapter.consumer = TopicsConsumer({TP0}, {"orders": 2})  # type: ignore[assignment]
    consumer.batches = [batch([good(1)])]
    adapter._task = asyncio.create_task(adapter._run())
    try:
        await assert_eventually(lambda: consumer.paused() == {TP0}, timeout=5, interval=0.005)
        await adapter._on_revoked({TP0})  # another member joined and takes every partition
        consumer._assigned, consumer._paused = set(), set()
        adapter._on_assigned(set())
        await assert_eventually(lambda: not adapter._held, timeout=5, interval=0.005)  # given up
        assert not adapter.paused and consumer.commits == []
        sink.outages = 0  # Temporal is back; later the partition comes back too
        await adapter._on_revoked(set())
        consumer._assigned = {TP0}
        adapter._on_assigned({TP0})
        assert consumer.paused() == set() and adapter.readiness()["state"] == "consuming"
        consumer.batches = [batch([good(1), good(2)])]
        await assert_eventually(lambda: consumer.commits, timeout=5, interval=0.005)
        assert consumer.commits == [{TP0: 12}] and offsets_held(sink) == ["1", "2"]
    finally:
        adapter._stopping.set()
        await adapter._task


# --- compression -------------------------------------------------------------------------------


def test_the_client_has_every_codec_a_topic_may_be_compressed_with():
    assert codec.has_gzip() and codec.has_snappy() and codec.has_lz4() and codec.has_zstd()


@pytest.mark.parametrize(
    "compression",
    [
        DefaultRecordBatch.CODEC_GZIP,
        DefaultRecordBatch.CODEC_SNAPPY,
        DefaultRecordBatch.CODEC_LZ4,
        DefaultRecordBatch.CODEC_ZSTD,
    ],
)
def test_a_compressed_record_batch_decodes(compression: int):
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=compression,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    builder.append(0, timestamp=1, key=b"order-1", value=good(1) * 20, headers=[("traceparent", b"00-a-b-01")])
    read = MemoryRecords(bytes(builder.build())).next_batch()
    assert read.compression_type == compression
    assert [(r.key, r.value, r.headers) for r in read] == [(b"order-1", good(1) * 20, [("traceparent", b"00-a-b-01")])]


# --- polls while paused ------------------------------------------------------------------------


async def test_a_poll_that_fails_while_paused_is_undone_counted_and_the_wait_goes_on(
    caplog: pytest.LogCaptureFixture,
):
    """Temporal is down and the batch's partitions are paused; a partition assigned just before the
    pause is still read by the paused wait's polls. An unreadable record there used to escape the
    wait (only KafkaError was caught), and a KafkaError went uncounted with a line per poll."""
    caplog.set_level(logging.DEBUG, logger="adapters.kafka")
    adapter, _ = adapter_with(FakeSink())
    consumer = adapter.consumer = LogConsumer({TP0: 2, TP1: 3})  # type: ignore[assignment]
    consumer.pause(TP0)  # the batch's partition; TP1 came in just before the listener paused it
    consumer.failing[TP1] = (BAD_HEADER, 1)
    assert await adapter.wait(0.3), "the wait ends as asked, not with the poll's error"
    assert consumer.failed == 1
    assert consumer.positions[TP1] == 0 and consumer.paused() == {TP0, TP1}, "read again after the outage"
    text = adapter.pipeline.metrics.render().decode()
    assert 'signal_bridge_kafka_poll_failures_total{check="kafka:orders",error="UnicodeDecodeError"} 1.0' in text
    assert not adapter._polls_failing(), "one failed poll is not an outage"
    lines = [r for r in caplog.records if r.name == "adapters.kafka" and "poll failed" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.ERROR]


# --- a record the client cannot read ------------------------------------------------------------


async def test_a_record_the_client_cannot_read_is_dead_lettered_by_its_offset_and_the_rest_run(
    caplog: pytest.LogCaptureFixture,
):
    """Every poll that reached TP1's offset 2 failed there, for ever: the partition stalled (the
    docs told operators to move the group past it by hand) and /readyz stayed red. Now each
    partition is read alone around it, and the record is dead-lettered by its offset and skipped."""
    caplog.set_level(logging.ERROR, logger="adapters.kafka")
    sink = FakeSink()
    consumer = LogConsumer({TP0: 5, TP1: 5})
    consumer.unreadable = {(TP1, 2)}
    async with running(consumer, sink, dead_letter_topic="orders.dlq") as adapter:
        producer = adapter.producer = FakeProducer()  # type: ignore[assignment]
        readable = sorted(set(everything(consumer)) - {"102"})
        await assert_eventually(lambda: sorted(offsets_held(sink)) == readable, timeout=5, interval=0.005)
        await assert_eventually(lambda: committed(consumer) == {TP0: 5, TP1: 5}, timeout=5, interval=0.005)
    assert consumer.polled_alone and set(consumer.polled_alone) <= {TP0, TP1}
    [(topic, value, key, headers)] = producer.sent
    assert (topic, value, key) == ("orders.dlq", b"", None)
    named = dict(headers)
    assert named["x-original-partition"] == b"1" and named["x-original-offset"] == b"2"
    assert named["x-dead-letter-reason"] == b"malformed" and b"UnicodeDecodeError" in named["x-dead-letter-error"]
    assert named["x-dead-letter-trimmed"] == b"headers,key,value", "none of it is there: a replay keeps it as it is"
    letter = record(value, partition=0, offset=0, headers=headers)
    assert kafka_replay.original(letter) == replay_common.TRIMMED
    assert [r for r in caplog.records if "offset 2 cannot be read" in r.getMessage()]
    text = adapter.pipeline.metrics.render().decode()
    assert 'signal_bridge_events_rejected_total{adapter="kafka",reason="malformed"} 1.0' in text


async def test_records_the_client_cannot_read_keep_the_consumer_ready():
    """Each such record made the consumer unhealthy at once, for POLL_RECOVERY (30 s), and the
    whole bridge's /readyz with it: any producer could keep it out of a load balancer's rotation
    by writing one every 25 s. They are dead-lettered and skipped, which is no outage."""
    sink = FakeSink()
    consumer = LogConsumer({TP0: 6, TP1: 3})
    consumer.unreadable = {(TP0, 1), (TP0, 4), (TP1, 0)}
    async with running(consumer, sink) as adapter:
        await assert_eventually(lambda: committed(consumer) == {TP0: 6, TP1: 3}, timeout=10, interval=0.005)
        assert sorted(offsets_held(sink)) == ["0", "101", "102", "2", "3", "5"]
        assert adapter.healthy()


async def test_a_client_that_fails_on_every_record_is_not_ready_though_each_is_read_around():
    """An error that is no record a producer wrote (a bug in the client or a decoder) turns every
    record into a dead-lettered stub: the consumer must not look ready meanwhile."""
    sink = FakeSink()
    consumer = LogConsumer({TP0: 4})
    consumer.unreadable = {(TP0, i) for i in range(4)}
    consumer.unreadable_error = TypeError("a bug in the client")
    async with running(consumer, sink) as adapter:
        await assert_eventually(lambda: committed(consumer) == {TP0: 4}, timeout=10, interval=0.005)
        assert offsets_held(sink) == [] and not adapter.healthy()


async def test_a_client_failing_on_some_records_is_not_ready_though_it_reads_the_others():
    """Reading around a failed poll ended the run of failures when it read any record: a bug that
    hit only some records (those with headers, one partition's) dead-lettered each of them with
    /readyz green."""
    sink = FakeSink()
    consumer = LogConsumer({TP0: 4, TP1: 3})
    consumer.unreadable = {(TP0, 1)}
    consumer.unreadable_error = TypeError("a bug in the client")
    async with running(consumer, sink) as adapter:
        await assert_eventually(lambda: committed(consumer) == {TP0: 4, TP1: 3}, timeout=10, interval=0.005)
        assert sorted(offsets_held(sink)) == ["0", "100", "101", "102", "2", "3"]
        assert not adapter.healthy()


async def test_a_record_the_client_cannot_read_without_a_dead_letter_topic_is_counted_and_skipped(
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.WARNING)
    sink = FakeSink()
    consumer = LogConsumer({TP0: 3})
    consumer.unreadable = {(TP0, 0)}
    async with running(consumer, sink) as adapter:
        await assert_eventually(lambda: sorted(offsets_held(sink)) == ["1", "2"], timeout=5, interval=0.005)
        await assert_eventually(lambda: committed(consumer) == {TP0: 3}, timeout=5, interval=0.005)
    text = adapter.pipeline.metrics.render().decode()
    assert 'signal_bridge_events_rejected_total{adapter="kafka",reason="malformed"} 1.0' in text
    assert 'signal_bridge_events_dropped_total{adapter="kafka",reason="malformed"} 1.0' in text
    assert [r for r in caplog.records if "offset 0 cannot be read" in r.getMessage()]


async def test_a_poll_error_that_passes_costs_no_record():
    """Read alone, TP1 fails twice more, then reads: an error that passes, not a record the client
    cannot read. Nothing is dead-lettered or skipped."""
    sink = FakeSink()
    consumer = LogConsumer({TP0: 2, TP1: 3})
    consumer.failing[TP1] = (BAD_HEADER, kafka.UNREADABLE_AFTER)  # the poll, then all but the last alone
    async with running(consumer, sink, dead_letter_topic="orders.dlq") as adapter:
        producer = adapter.producer = FakeProducer()  # type: ignore[assignment]
        await assert_eventually(lambda: sorted(offsets_held(sink)) == everything(consumer), timeout=5, interval=0.005)
        await assert_eventually(lambda: committed(consumer) == {TP0: 2, TP1: 3}, timeout=5, interval=0.005)
    assert consumer.failed == kafka.UNREADABLE_AFTER and producer.sent == []


class ProducerBatches(LogConsumer):
    """As a broker and aiokafka do: a fetch from an offset returns the whole producer batch that
    holds it, and aiokafka parses its records one by one from the batch's first, as they are
    taken, so a record it cannot read fails the records after it in its batch too."""

    def __init__(self, lengths: dict[TopicPartition, int], batches: list[range]) -> None:
        super().__init__(lengths)
        self.batches_of = batches

    async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> dict:
        await asyncio.sleep(0.001)
        [tp] = self._assigned
        if tp in self._paused or (tps and tp not in tps) or self.positions[tp] >= len(self.logs[tp]):
            return {}
        start = self.positions[tp]
        taken = []
        for offset in next(b for b in self.batches_of if start in b):
            if (tp, offset) in self.unreadable:
                self.failed += 1
                raise BAD_HEADER
            if offset >= start:
                taken.append(self.logs[tp][offset])
                if len(taken) == (max_records or 500):
                    break
        self.positions[tp] = taken[-1].offset + 1
        return {tp: taken}


async def test_the_records_after_an_unreadable_one_in_its_producer_batch_are_lettered_too_and_the_rest_run():
    """aiokafka cannot read the records after the bad one in its batch either: each is lettered by
    its offset, and the next batch runs."""
    sink = FakeSink()
    consumer = ProducerBatches({TP0: 6}, [range(0, 3), range(3, 6)])
    consumer.unreadable = {(TP0, 1)}
    async with running(consumer, sink, dead_letter_topic="orders.dlq") as adapter:
        producer = adapter.producer = FakeProducer()  # type: ignore[assignment]
        await assert_eventually(lambda: committed(consumer) == {TP0: 6}, timeout=10, interval=0.01)
    assert sorted(offsets_held(sink)) == ["0", "3", "4", "5"]
    assert [dict(headers)["x-original-offset"] for _, _, _, headers in producer.sent] == [b"1", b"2"]


async def test_the_rest_of_a_bad_producer_batch_is_one_letter_found_by_one_fetch():
    """A producer batch of 495 tiny records whose second cannot be read: the adapter fetched the
    batch itself once, read its end, and wrote one letter naming offsets 4 to 497. Record at a time,
    it took two failed polls and a letter for each of the 494 (about an hour for 1 MB of them)."""
    sink = FakeSink()
    consumer = ProducerBatches({TP0: 500}, [range(0, 3), range(3, 498), range(498, 500)])
    consumer.unreadable = {(TP0, 4)}
    fetches = FakeFetchClient([(r, producer_batch(r.start, len(r), bad={4} & set(r))) for r in consumer.batches_of])
    consumer._client = fetches  # type: ignore[attr-defined]
    async with running(consumer, sink, dead_letter_topic="orders.dlq") as adapter:
        producer = adapter.producer = FakeProducer()  # type: ignore[assignment]
        await assert_eventually(lambda: committed(consumer) == {TP0: 500}, timeout=10, interval=0.01)
    assert sorted(offsets_held(sink), key=int) == ["0", "1", "2", "3", "498", "499"]
    [(_, _, _, headers)] = producer.sent
    named = dict(headers)
    assert (named["x-original-offset"], named["x-original-last-offset"]) == (b"4", b"497")
    assert b"offsets 4 to 497" in named["x-dead-letter-error"]
    assert consumer.failed == 2  # the poll of every partition, then one of the partition alone
    assert [request.topics for _, request in fetches.requests] == [[(TP0.topic, [(0, 4, FETCH_BYTES)])]]


async def test_a_bad_batch_the_fetch_cannot_give_is_still_read_a_record_at_a_time():
    """The broker does not answer the fetch (or aiokafka no longer has the client it goes
    through): the records are stubbed one by one, as before, and none is skipped unlettered."""
    sink = FakeSink()
    consumer = ProducerBatches({TP0: 8}, [range(0, 2), range(2, 6), range(6, 8)])
    consumer.unreadable = {(TP0, 3)}
    consumer._client = FakeFetchClient([], fail=KafkaConnectionError("gone"))  # type: ignore[attr-defined]
    async with running(consumer, sink, dead_letter_topic="orders.dlq") as adapter:
        producer = adapter.producer = FakeProducer()  # type: ignore[assignment]
        await assert_eventually(lambda: committed(consumer) == {TP0: 8}, timeout=10, interval=0.01)
    assert sorted(offsets_held(sink), key=int) == ["0", "1", "2", "6", "7"]
    assert [dict(h)["x-original-offset"] for _, _, _, h in producer.sent] == [b"3", b"4", b"5"]
    assert all("x-original-last-offset" not in dict(h) for _, _, _, h in producer.sent)
    # Each record's polls fail again and again before it is stubbed: its batch is fetched once.
    positions = [request.topics[0][1][0][1] for _, request in consumer._client.requests]  # type: ignore[attr-defined]
    assert positions == [3, 4, 5], positions


async def test_the_rest_of_a_bad_producer_batch_is_confirmed_in_fewer_polls_than_a_first_bad_record():
    """Each record after the bad one in its batch fails with the very same complaint: it is stubbed
    after UNREADABLE_FOLLOWING failed polls, not UNREADABLE_AFTER with their pauses, so a batch of
    hundreds passes in seconds. A record that fails otherwise (here: the next producer batch's
    first, with another complaint) is still confirmed as a first one is."""
    other = CorruptRecordException("Record is corrupt (stored crc = 1, computed crc = 2)")

    class TwoComplaints(ProducerBatches):
        async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> dict:
            if tps == (TP0,) and self.positions[TP0] == 40:
                self.failed += 1
                raise other
            return await super().getmany(*tps, timeout_ms=timeout_ms, max_records=max_records)

    sink = FakeSink()
    consumer = TwoComplaints({TP0: 42}, [range(0, 40), range(40, 42)])
    consumer.unreadable = {(TP0, 0)}
    async with running(consumer, sink, dead_letter_topic="orders.dlq") as adapter:
        producer = adapter.producer = FakeProducer()  # type: ignore[assignment]
        await assert_eventually(lambda: committed(consumer) == {TP0: 42}, timeout=20, interval=0.01)
    first_poll = 1  # the poll of every partition that failed and began the read-around
    assert (
        consumer.failed
        == first_poll + kafka.UNREADABLE_AFTER + 39 * kafka.UNREADABLE_FOLLOWING + kafka.UNREADABLE_AFTER
    )
    assert [int(dict(h)["x-original-offset"]) for _, _, _, h in producer.sent] == list(range(41))
    assert offsets_held(sink) == ["41"]


class Rebalancing(LogConsumer):
    """The group rebalances (the same partitions come back, from their commits) while the
    ``at``-th poll of ``tp`` alone waits."""

    def __init__(self, lengths: dict[TopicPartition, int], tp: TopicPartition, at: int) -> None:
        super().__init__(lengths)
        self.adapter: kafka.KafkaAdapter | None = None
        self.tp, self.at, self.alone = tp, at, 0

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {tp.partition for tp in self.logs}

    async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> dict:
        if tps == (self.tp,):
            self.alone += 1
            if self.alone == self.at and self.adapter is not None:
                await self.adapter._on_revoked(set(self._assigned))
                self.positions = {tp: self.committed_offsets.get(tp, 0) for tp in self._assigned}
                self.adapter._on_assigned(set(self._assigned))
        return await super().getmany(*tps, timeout_ms=timeout_ms, max_records=max_records)


@pytest.mark.parametrize(
    ("bad", "tp", "at"), [((TP0, 2), TP1, 1), ((TP0, 0), TP0, 3)], ids=["reading-another", "confirming"]
)
async def test_a_rebalance_while_reading_around_loses_no_record(
    bad: tuple[TopicPartition, int], tp: TopicPartition, at: int
):
    """The read-around threw away what it read when the group rebalanced under it, though the lone
    poll had already read a record of the new generation: the next commit passed it. And one that
    came during the polls confirming a bad record sought past it and dropped its stub."""
    sink = FakeSink()
    consumer = Rebalancing({TP0: 4, TP1: 3}, tp, at)
    consumer.unreadable = {bad}
    async with running(consumer, sink, dead_letter_topic="orders.dlq") as adapter:
        consumer.adapter = adapter
        producer = adapter.producer = FakeProducer()  # type: ignore[assignment]
        await assert_eventually(lambda: committed(consumer) == {TP0: 4, TP1: 3}, timeout=10, interval=0.01)
    assert sorted(offsets_held(sink)) == sorted(set(everything(consumer)) - {str(bad[1])})
    assert [dict(headers)["x-original-offset"] for _, _, _, headers in producer.sent] == [str(bad[1]).encode()]


async def test_a_batch_read_again_while_reading_around_keeps_its_order_and_runs_once():
    """The batch in hand failed (a bug) while the read-around was reading ahead of it: the rewind
    sought back, but the read-around kept what it had read and went on from the rewound position,
    so record 3 started before 0 and 1, and twice."""

    class FailsTheBatch(LogConsumer):
        sink: FakeSink

        async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> dict:
            try:
                return await super().getmany(*tps, timeout_ms=timeout_ms, max_records=max_records)
            except UnicodeDecodeError:
                if tps == (TP0,) and self.sink.release is not None and not self.sink.release.is_set():
                    self.sink.release.set()  # the batch in hand fails now: the adapter rewinds it
                raise

    sink = FakeSink(bugs=1)
    sink.release = asyncio.Event()
    consumer = FailsTheBatch({TP0: 8})
    consumer.sink = sink
    consumer.unreadable = {(TP0, 4)}
    async with running(consumer, sink, max_batch=3):
        await assert_eventually(lambda: committed(consumer) == {TP0: 8}, timeout=10, interval=0.01)
    started = [e.id.rsplit(":", 1)[1] for e in sink.held]
    assert started == ["0", "1", "2", "3", "5", "6", "7"], started


async def test_a_rebalance_in_an_outage_while_reading_around_loses_no_record_read_ahead():
    """Temporal refused the batch in hand and the group rebalanced while the read-around slept
    between lone polls: it returned what it read in the old generation, which was taken as the
    new one's, and the abandoned batch's rewind sought past records read ahead (TP1 0-1)."""

    class Scripted(LogConsumer):
        adapter: kafka.KafkaAdapter
        sink: FakeSink
        fired = False

        def partitions_for_topic(self, topic: str) -> set[int]:
            return {tp.partition for tp in self.logs}

        async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> dict:
            try:
                return await super().getmany(*tps, timeout_ms=timeout_ms, max_records=max_records)
            except UnicodeDecodeError:
                if tps == (TP1,) and not self.fired:  # the first lone poll of TP1 fails at offset 4
                    self.fired = True
                    self.outage = asyncio.get_running_loop().create_task(self.outage_then_rebalance())
                raise

        async def outage_then_rebalance(self) -> None:
            assert self.sink.release is not None
            self.sink.unavailable = Unavailable("Temporal is down", 0.01)
            self.sink.release.set()  # the batch in hand (TP0 0-1) fails now: paused, wait() polls
            await asyncio.sleep(0.05)  # the read-around sleeps between its lone polls
            await self.adapter._on_revoked(set(self._assigned))  # the same partitions come back
            self.positions = {tp: self.committed_offsets.get(tp, 0) for tp in self._assigned}
            self.adapter._on_assigned(set(self._assigned))
            self.sink.unavailable = None

    sink = FakeSink()
    sink.release = asyncio.Event()
    consumer = Scripted({TP0: 2, TP1: 0})
    consumer.sink = sink
    async with running(consumer, sink, max_batch=6, dead_letter_topic="orders.dlq") as adapter:
        consumer.adapter = adapter
        adapter.producer = FakeProducer()  # type: ignore[assignment]
        adapter.settler.backoff = Backoff(initial=0.5, cap=0.5)  # about production's first delay
        await asyncio.wait_for(sink.entered.wait(), 5)  # TP0 0-1 in flight
        consumer.logs[TP1] += [record(good(100 + i), partition=1, offset=i) for i in (0, 1)]
        await assert_eventually(lambda: adapter._ahead_records == 2, timeout=5, interval=0.002)  # read ahead
        consumer.logs[TP1] += [record(good(100 + i), partition=1, offset=i) for i in (2, 3, 4, 5)]
        consumer.unreadable = {(TP1, 4)}
        await assert_eventually(lambda: committed(consumer) == {TP0: 2, TP1: 6}, timeout=10, interval=0.01)
    assert sorted(set(offsets_held(sink))) == ["0", "1", "100", "101", "102", "103", "105"]


async def test_an_outage_that_ends_in_a_refusal_resumes_the_partitions():
    """Temporal was down once, then refused the lone event as too large: the refusal came back as an
    exception, which skipped the resume. With no dead-letter topic nothing else resumed: the
    partition stayed paused and no later record was read."""

    class CommitsWhilePaused(LogConsumer):
        async def commit(self, offsets: dict[TopicPartition, int]) -> None:  # as aiokafka allows
            self.commits.append(dict(offsets))
            self.committed_offsets.update(offsets)

    sink = FakeSink(outages=1, max_events=0)  # down once, then every event is too large
    consumer = CommitsWhilePaused({TP0: 1})
    async with running(consumer, sink) as adapter:
        await assert_eventually(lambda: committed(consumer) == {TP0: 1}, timeout=5, interval=0.01)
        sink.max_events = None
        consumer.logs[TP0] += [record(good(i), partition=0, offset=i) for i in (1, 2)]
        await assert_eventually(lambda: committed(consumer) == {TP0: 3}, timeout=5, interval=0.01)
        assert not adapter._held and consumer.paused() == set()
    assert offsets_held(sink) == ["1", "2"]


@pytest.mark.parametrize(
    ("batches", "at"), [(None, 3), ([range(0, 2), range(2, 6)], 2)], ids=["a-later-record", "the-next-producer-batch"]
)
async def test_a_passing_error_after_a_stub_costs_no_record(batches: list[range] | None, at: int):
    """After a first stub, the next failures of the partition were stubbed at once (records after
    a bad one in its producer batch cannot be read either), though the one at ``at``, a record
    read since or the first of the next producer batch, was readable and its error passed."""
    base = LogConsumer if batches is None else ProducerBatches

    class OnceThere(base):  # type: ignore[valid-type,misc]
        hiccup = True

        async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> dict:
            if tps == (TP0,) and self.positions[TP0] == at and self.hiccup:
                self.hiccup = False
                self.failed += 1
                raise BAD_HEADER
            return await super().getmany(*tps, timeout_ms=timeout_ms, max_records=max_records)

    sink = FakeSink()
    consumer = OnceThere({TP0: 6}) if batches is None else OnceThere({TP0: 6}, batches)
    consumer.unreadable = {(TP0, 1)}
    async with running(consumer, sink, dead_letter_topic="orders.dlq") as adapter:
        producer = adapter.producer = FakeProducer()  # type: ignore[assignment]
        await assert_eventually(lambda: committed(consumer) == {TP0: 6}, timeout=10, interval=0.01)
    assert sorted(offsets_held(sink)) == ["0", "2", "3", "4", "5"]
    assert [dict(headers)["x-original-offset"] for _, _, _, headers in producer.sent] == [b"1"]


@pytest.mark.parametrize(
    ("lengths", "bad", "refetch"),
    [({TP0: 3, TP1: 5}, (TP1, 2), 0.5), ({TP0: 6}, (TP0, 0), 1.0)],
    ids=["half-a-second", "a-second-at-the-start"],
)
async def test_a_partition_slow_to_be_fetched_again_after_a_seek_is_read_around_not_stalled(
    lengths: dict[TopicPartition, int], bad: tuple[TopicPartition, int], refetch: float
):
    """aiokafka drops what it fetched of a partition when it is sought, and the fetch again may wait
    for one in flight to its broker (up to fetch_max_wait_ms, 500 ms). Each lone poll came back
    empty within 200 ms, was taken for the partition's end, and the failures were never counted
    three in a row: every poll failed again, for ever. Then the empty polls allowed were counted
    over the partition's whole read-around, not in a row: a refetch of a second at the bad record
    used them up before its third failure, each time."""

    class SlowAfterSeek(LogConsumer):
        def __init__(self, lengths: dict[TopicPartition, int]) -> None:
            super().__init__(lengths)
            self.ready_at: dict[TopicPartition, float] = {}

        def seek(self, tp: TopicPartition, offset: int) -> None:
            super().seek(tp, offset)
            self.ready_at[tp] = time.monotonic() + self.refetch

        async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> dict:
            want = [tp for tp in sorted(self._assigned - self._paused) if not tps or tp in tps]
            deadline = time.monotonic() + timeout_ms / 1000
            while True:
                now = time.monotonic()
                ready = [
                    tp for tp in want if self.ready_at.get(tp, 0) <= now and self.positions[tp] < len(self.logs[tp])
                ]
                if ready or now >= deadline:
                    break
                await asyncio.sleep(0.01)
            if not ready:
                return {}
            return await super().getmany(*ready, timeout_ms=timeout_ms, max_records=max_records)

    sink = FakeSink()
    consumer = SlowAfterSeek(lengths)
    consumer.refetch = refetch
    consumer.unreadable = {bad}
    async with running(consumer, sink, dead_letter_topic="orders.dlq") as adapter:
        producer = adapter.producer = FakeProducer()  # type: ignore[assignment]
        await assert_eventually(lambda: committed(consumer) == lengths, timeout=30, interval=0.05)
    assert sorted(offsets_held(sink)) == sorted(set(everything(consumer)) - {str(bad[0].partition * 100 + bad[1])})
    assert [dict(headers)["x-original-offset"] for _, _, _, headers in producer.sent] == [str(bad[1]).encode()]


async def test_a_group_error_while_a_poll_reads_the_positions_undoes_nothing():
    """aiokafka's position() raises a pending group error for a partition whose position is not set.
    Read inside the poll's undo, the error sent every partition back to its commit or reset: with
    ``latest`` and no commit yet, TP0 jumped to its end past records not yet read."""

    class PendingGroupError(LogConsumer):
        armed = False

        async def position(self, tp: TopicPartition) -> int:
            if self.armed and tp == TP1:  # no position yet, and the coordinator holds an error
                self.armed = False
                raise GroupAuthorizationFailedError("pending coordinator error")
            return await super().position(tp)

        async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> dict:
            got = await super().getmany(*tps, timeout_ms=timeout_ms, max_records=max_records)
            if any(r.offset == 3 for r in got.get(TP0, [])):  # 2-3 read ahead; 4-9 arrive, not read yet
                self.logs[TP0] += [record(good(i), partition=0, offset=i) for i in range(4, 10)]
                self.armed = True
            return got

    sink = FakeSink()
    sink.release = asyncio.Event()
    consumer = PendingGroupError({TP0: 2, TP1: 0})  # a new group: nothing committed, auto_offset_reset latest
    async with running(consumer, sink, max_batch=8, auto_offset_reset="latest") as adapter:
        await asyncio.wait_for(sink.entered.wait(), 5)  # TP0 0-1 in flight
        consumer.logs[TP0] += [record(good(i), partition=0, offset=i) for i in (2, 3)]
        await assert_eventually(lambda: not consumer.armed and adapter._ahead_records == 2, timeout=5, interval=0.005)
        sink.release.set()
        await assert_eventually(lambda: committed(consumer).get(TP0) == 10, timeout=5, interval=0.01)
    assert consumer.resets == [] and offsets_held(sink) == [str(i) for i in range(10)]


async def test_a_letter_the_client_refuses_before_sending_is_written_again_smaller() -> None:
    """aiokafka's ``send`` raises MessageSizeTooLargeError itself for a letter over the producer's
    ``max_request_size``: that letter was retried at the same size for ever, and the consumer stayed
    paused. It is written again a quarter as large, as one the broker refuses is."""
    items = [Item("first"), Item("too-large"), Item("last")]
    sent: list[tuple[str, int]] = []

    async def produce(item: Item[str], budget: int) -> asyncio.Future[Any]:
        if item.message == "too-large" and budget > 300_000:
            raise MessageSizeTooLargeError("the message is larger than max_request_size")
        sent.append((item.message, budget))
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    await kafka.write_letters(items, produce)
    assert sent == [("first", 1_000_000), ("last", 1_000_000), ("too-large", 250_000)]
    assert [i.disposition for i in items] == [Disposition.DEAD_LETTERED] * 3


async def test_a_letter_is_tried_at_the_smallest_size_before_it_is_given_up() -> None:
    """A quarter at a time went 1,000,000, 250,000, 62,500 and stopped: a dead-letter topic that
    takes 40 KB refused the letter for ever, and the consumer stayed paused."""
    tried: list[int] = []

    async def produce(item: Item[str], budget: int) -> asyncio.Future[Any]:
        tried.append(budget)
        if budget > 40_000:
            raise MessageSizeTooLargeError("over the topic's max.message.bytes")
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    items = [Item("poison")]
    await kafka.write_letters(items, produce)
    assert tried == [1_000_000, 250_000, 62_500, MIN_LETTER_BYTES]
    assert items[0].disposition == Disposition.DEAD_LETTERED
    tried.clear()

    async def refuses_all(item: Item[str], budget: int) -> asyncio.Future[Any]:
        tried.append(budget)
        raise MessageSizeTooLargeError("over the topic's max.message.bytes")

    with pytest.raises(MessageSizeTooLargeError):  # a topic that takes less is misconfigured: raised
        await kafka.write_letters([Item("poison")], refuses_all)
    assert tried == [1_000_000, 250_000, 62_500, MIN_LETTER_BYTES]


async def test_letters_the_broker_acked_before_a_later_send_failed_are_not_written_again() -> None:
    """A send that raised in the middle of a batch of letters skipped the marking of those already
    acked: the retry wrote them a second time."""
    items = [Item(f"letter-{i}") for i in range(3)]
    sent: list[str] = []

    async def produce(item: Item[str], budget: int) -> asyncio.Future[Any]:
        if item.message == "letter-2":
            raise KafkaTimeoutError("the producer's buffer is full")
        sent.append(item.message)
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    with pytest.raises(KafkaTimeoutError):
        await kafka.write_letters(items, produce)
    assert sent == ["letter-0", "letter-1"]
    assert [i.disposition for i in items] == [Disposition.DEAD_LETTERED, Disposition.DEAD_LETTERED, None]


async def test_the_group_waits_for_a_member_longer_than_it_lets_its_batch_finish(monkeypatch: Any) -> None:
    """At a rebalance the adapter lets its batch finish for up to REVOKE_WAIT (15 s), while the
    group waited for members to rejoin only the session timeout (10 s, aiokafka's default for the
    rebalance timeout): a member finishing a slow batch was put out of the group, its commit failed,
    and the partitions' next owner did the batch again."""
    made: dict[str, Any] = {}

    class Recorded:
        def __init__(self, **options: Any) -> None:
            made.update(options)

        async def start(self) -> None:
            raise KafkaConnectionError("no broker here")

        async def stop(self) -> None:
            return None

    monkeypatch.setattr(kafka, "AIOKafkaConsumer", Recorded)
    adapter, _ = adapter_with(FakeSink())
    with contextlib.suppress(Exception):
        await adapter.start()
    assert made["rebalance_timeout_ms"] >= (kafka.REVOKE_WAIT + 10) * 1000
    assert made.get("session_timeout_ms", 10_000) < made["rebalance_timeout_ms"]
    # aiokafka's JoinGroup request waits for the group within its request timeout (40 s by default).
    assert made["rebalance_timeout_ms"] < made.get("request_timeout_ms", 40_000)


async def test_with_latest_where_a_partition_begins_is_committed_before_its_first_batch_settles():
    """A group with no commit for a partition starts it at its end with ``latest``. Until its first
    batch settled nothing was committed: a stop, a crash or a rebalance then (here: during a
    Temporal outage) left it so, and its next owner started at the end again, past every record
    read meanwhile, which started nothing."""
    consumer = LogConsumer({TP0: 5})
    consumer.positions[TP0] = 5  # `latest`: the end
    down = FakeSink(outages=10**6)
    async with running(consumer, down, auto_offset_reset="latest") as adapter:
        adapter._note_origins({TP0})
        consumer.logs[TP0] += [record(good(5 + i), partition=0, offset=5 + i) for i in range(3)]
        await assert_eventually(lambda: adapter._held, timeout=5, interval=0.005, what="records read")
    assert committed(consumer) == {TP0: 5}, "where it began"
    after = LogConsumer({TP0: 0}, committed=committed(consumer))  # the next owner, from the commit
    after.logs = consumer.logs
    sink = FakeSink()
    async with running(after, sink, auto_offset_reset="latest"):
        await assert_eventually(lambda: sorted(offsets_held(sink)) == ["5", "6", "7"], timeout=5, interval=0.005)
