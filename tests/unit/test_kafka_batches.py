"""Where a producer batch the Kafka client cannot read ends, read from bytes aiokafka itself builds
and parses (adapters.kafka_batches)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.legacy_records import LegacyRecordBatchBuilder
from aiokafka.record.util import calc_crc32c
from hypothesis import given
from hypothesis import strategies as st

from adapters.kafka_batches import FETCH_BYTES, BadSpan, bad_span, fetch_first_batch

TP = TopicPartition("orders", 0)


def producer_batch(base: int, count: int, bad: set[int] = frozenset(), gaps: set[int] = frozenset()) -> bytes:  # type: ignore[assignment]
    """A v2 batch of ``count`` offsets from ``base`` as a producer writes it (``gaps``: offsets
    compaction took), whose records at ``bad`` have a header name that is not UTF-8, as a client
    other than Java's can write it: the name's byte is patched and the CRC set again."""
    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 10_000_000)
    for delta in range(count):
        if base + delta not in gaps:
            name = "x-bad!" if base + delta in bad else "x-ok!!"
            builder.append(delta, timestamp=None, key=None, value=b"v%d" % delta, headers=[(name, b"v")])
    raw = bytearray(builder.build())
    struct.pack_into(">q", raw, 0, base)
    struct.pack_into(">i", raw, 23, count - 1)  # last offset delta: the batch's end, gaps or not
    at = 0
    while (at := raw.find(b"x-bad!", at)) >= 0:
        raw[at + 5] = 0xFF
    struct.pack_into(">I", raw, 17, calc_crc32c(bytes(raw[21:])))  # the v2 batch's CRC covers from byte 21
    return bytes(raw)


def test_the_span_runs_from_the_bad_record_to_the_end_of_its_batch_and_no_further():
    raw = producer_batch(100, 3) + producer_batch(103, 400, bad={105}) + producer_batch(503, 2)
    assert bad_span(raw, 103) is None  # a poll from 103 reads 103 and 104: no span begins there
    span = bad_span(raw, 105)
    assert span is not None and (span.first, span.last) == (105, 502)
    assert span.why.startswith("UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff")


def test_a_position_past_the_bad_record_spans_from_there():
    """After a record-at-a-time read has stubbed a few, the rest of the batch is one span."""
    raw = producer_batch(0, 50, bad={3})
    assert bad_span(raw, 10) == BadSpan(10, 49, bad_span(raw, 3).why)  # type: ignore[union-attr]


def test_a_batch_that_parses_to_its_end_has_no_span_nor_has_the_next_batch_looked_at():
    raw = producer_batch(0, 5) + producer_batch(5, 5, bad={5})
    assert bad_span(raw, 2) is None


def test_a_batch_whose_checksum_fails_has_no_span():
    """Its header may be what is damaged: the records are read one at a time, as before."""
    raw = bytearray(producer_batch(0, 20, bad={4}))
    raw[-1] ^= 0x01
    assert bad_span(bytes(raw), 4) is None


def test_a_batch_compacted_before_the_position_is_skipped_and_a_gap_ends_nowhere_else():
    raw = producer_batch(0, 10) + producer_batch(10, 10, bad={15}, gaps={14, 16, 19})
    span = bad_span(raw, 15)
    assert span is not None and (span.first, span.last) == (15, 19)
    # The position is in a gap compaction left before the bad record: the span begins there.
    gap = producer_batch(20, 10, bad={24}, gaps={21, 22, 23})
    assert (bad_span(gap, 22) or BadSpan(0, 0, "")).first == 22


def test_legacy_batches_have_no_headers_and_no_span():
    builder = LegacyRecordBatchBuilder(1, 0, 10_000)
    builder.append(0, timestamp=None, key=None, value=b"v")
    assert bad_span(bytes(builder.build()), 0) is None


@given(st.binary(max_size=2_000), st.integers(min_value=0, max_value=1_000))
def test_arbitrary_bytes_are_no_span_or_one_from_the_position(raw: bytes, position: int):
    """What a broker sends is parsed by aiokafka; a record set it cannot frame is no span, and
    nothing raises to the read-around."""
    span = bad_span(raw, position)
    assert span is None or span.first == position <= span.last


@given(st.integers(min_value=0, max_value=40), st.integers(min_value=1, max_value=40), st.data())
def test_any_bad_record_spans_its_batch_from_itself_and_only_from_itself(base: int, count: int, data: st.DataObject):
    bad = data.draw(st.integers(min_value=base, max_value=base + count - 1))
    raw = (
        producer_batch(0, base) + producer_batch(base, count, bad={bad})
        if base
        else producer_batch(0, count, bad={bad})
    )
    for position in range(0, base + count):
        span = bad_span(raw, position)
        if bad <= position:
            assert span is not None and (span.first, span.last) == (position, base + count - 1)
        else:
            assert span is None


@dataclass
class FakeCluster:
    leader: int | None = 0

    def leader_for_partition(self, tp: TopicPartition) -> int | None:
        return self.leader


@dataclass
class FakeFetchClient:
    """Answers a fetch of one partition, as a broker does, with the batch that holds the offset and
    the ones after it (``log`` maps a batch's offsets to its bytes)."""

    log: list[tuple[range, bytes]]
    cluster: FakeCluster = field(default_factory=FakeCluster)
    error_code: int = 0
    fail: Exception | None = None
    requests: list[Any] = field(default_factory=list)

    async def send(self, node: int, request: FetchRequest) -> Any:
        self.requests.append((node, request))
        if self.fail is not None:
            raise self.fail
        [(topic, [(partition, offset, _size)])] = request.topics
        raw = b"".join(data for offsets, data in self.log if offsets.stop > offset)
        return FetchResponse([(topic, [(partition, self.error_code, 0, -1, -1, None, raw)])])


@dataclass
class FetchResponse:
    topics: list[Any]


@dataclass
class WithClient:
    _client: Any


async def test_the_fetch_asks_the_leader_for_the_batch_at_the_position_and_gives_its_bytes():
    log = [(range(0, 3), producer_batch(0, 3)), (range(3, 9), producer_batch(3, 6, bad={4}))]
    client = FakeFetchClient(log)
    raw = await fetch_first_batch(WithClient(client), TP, 4)
    assert raw is not None and (bad_span(raw, 4) or BadSpan(0, 0, "")).last == 8
    [(node, request)] = client.requests
    assert node == 0 and request.topics == [("orders", [(0, 4, FETCH_BYTES)])]


@pytest.mark.parametrize(
    "client",
    [
        FakeFetchClient([], cluster=FakeCluster(leader=None)),
        FakeFetchClient([], cluster=FakeCluster(leader=-1)),
        FakeFetchClient([(range(0, 3), producer_batch(0, 3))], error_code=6),  # not the leader
        FakeFetchClient([], fail=KafkaConnectionError("gone")),
        FakeFetchClient([(range(0, 3), producer_batch(0, 3))], fail=TimeoutError()),
        None,  # a consumer without the client this reads through: a newer aiokafka
    ],
    ids=["unknown-leader", "no-leader", "error-code", "connection", "timeout", "no-client"],
)
async def test_a_fetch_that_cannot_give_the_batch_gives_nothing(client: FakeFetchClient | None):
    assert await fetch_first_batch(WithClient(client), TP, 1) is None


def test_a_position_past_a_batch_s_last_record_left_reads_on_in_the_next_batch():
    """Compaction took offsets 8 and 9, the end of the first batch: a poll from 8 reads the next
    batch, whose first record is the bad one, so the span runs from 8 (nothing is between)."""
    raw = producer_batch(0, 10, gaps={8, 9}) + producer_batch(10, 5, bad={10})
    span = bad_span(raw, 8)
    assert span is not None and (span.first, span.last) == (8, 14)


def commit_marker(offset: int, producer_id: int = 7) -> bytes:
    """A transaction's commit marker at ``offset``, as a broker writes it: a control batch of one
    record (the control flag set in its attributes, the CRC set again)."""
    builder = DefaultRecordBatchBuilder(2, 0, 1, producer_id, 0, -1, 10_000)
    builder.append(0, timestamp=None, key=b"\x00\x00\x00\x01", value=b"\x00\x00\x00\x00\x00\x00", headers=[])
    raw = bytearray(builder.build())
    struct.pack_into(">q", raw, 0, offset)
    attributes = struct.unpack_from(">h", raw, 21)[0]
    struct.pack_into(">h", raw, 21, attributes | 0x20)
    struct.pack_into(">I", raw, 17, calc_crc32c(bytes(raw[21:])))
    return bytes(raw)


def test_a_transactions_commit_marker_at_the_position_is_passed_over_as_the_client_does():
    """After the span of one transaction's bad batch, the position is its commit marker, which the
    client passes over to fail on the next bad batch. Read as a record, the marker parsed and the
    span was not found: the marker got a letter of its own, and the next batch was read a record
    at a time."""
    raw = commit_marker(10) + producer_batch(11, 30, bad={11})
    span = bad_span(raw, 10)
    assert span is not None and (span.first, span.last) == (10, 40)
    assert bad_span(commit_marker(10) + producer_batch(11, 3), 10) is None
