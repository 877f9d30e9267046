"""Where a producer batch the Kafka client cannot read ends.

aiokafka parses a producer batch's records one by one from its first, and fails on a header name
that is not UTF-8 (any client but Java's can write one). Every record after the bad one in its
batch then fails too, as the parse never gets past it. Read one at a time, a batch of 1 MB of tiny
records took about an hour, each fetch parsing the batch again up to the record it wanted.

So the adapter fetches the batch itself, once, and reads where it ends from the batch's header
(which the parse does not touch), and which record fails, by parsing the records just as the
client does. Everything from that record to the batch's end is one range, lettered once."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.default_records import DefaultRecordBatch
from aiokafka.record.memory_records import MemoryRecords

log = logging.getLogger(__name__)

FETCH_TIMEOUT = 10.0  # seconds for the one fetch of a bad batch; the read-around goes on without it
FETCH_BYTES = 2 * 1024 * 1024
"""What the fetch asks for: the batch at the position whole (a broker sends a first batch whole
whatever the size asked, KIP-74), and what follows it up to this, so that a transaction's commit
marker at the position (which the client passes over) comes with the bad batch after it."""
READ_UNCOMMITTED = 0  # the batch holding a position the consumer reached is the same either way


@dataclass(frozen=True)
class BadSpan:
    """Offsets ``first`` to ``last`` of one producer batch cannot be read: the record at ``first``
    (or the first one after it, where compaction left a gap) fails the parse, and with it the rest."""

    first: int
    last: int
    why: str


def bad_span(raw: bytes, position: int) -> BadSpan | None:
    """The unreadable range that the records fetched from ``position`` (``raw``, a fetch
    response's record set) begin with, from ``position`` to the end of its producer batch.

    None when a record of that batch at or after ``position`` parses (a poll from there reads it),
    or the batch parses to its end, fails its checksum (its header is not to be trusted), is not a
    v2 batch (only those have headers), or cannot be framed or decompressed at all: the caller then
    reads the records one at a time, as before. A batch that begins after ``position`` (compaction
    took the records between) is the one a poll from there reads."""
    try:
        return _bad_span(MemoryRecords(raw), position)
    except Exception as exc:  # what the broker sent, parsed by aiokafka: no span, whatever it is
        log.debug("no unreadable span at offset %d in what was fetched: %r", position, exc)
        return None


def _bad_span(records: MemoryRecords, position: int) -> BadSpan | None:
    while records.has_next():
        batch = records.next_batch()
        if not isinstance(batch, DefaultRecordBatch):
            return None
        if batch.next_offset <= position:
            continue  # a batch before the one asked for (a broker may send it whole)
        if not batch.validate_crc():
            return None
        if batch.is_control_batch:
            continue  # a transaction's marker: the client passes over it, as the span does
        read = False  # whether a record from the position on parsed: a poll from there reads it
        try:
            for record in batch:
                read = read or record.offset >= position
        except UnicodeDecodeError as exc:
            return None if read else BadSpan(position, batch.next_offset - 1, f"{type(exc).__name__}: {exc}")
        if read:
            return None
        # Compaction took this batch's records from the position on: a poll reads on in the next.
    return None


async def fetch_first_batch(consumer: Any, tp: TopicPartition, position: int) -> bytes | None:
    """The record set a fetch of ``tp`` from ``position`` returns: at least the whole producer
    batch that holds it, as brokers send a first batch whole whatever the size asked (KIP-74).
    Sent on the consumer's own client, so its security settings apply. None when the partition's
    leader is not known, the broker answers with an error, or it does not answer in time; the
    caller then reads the batch a record at a time, as before."""
    client = getattr(consumer, "_client", None)
    if client is None or not hasattr(client, "cluster"):
        return None
    leader = client.cluster.leader_for_partition(tp)
    if leader is None or leader < 0:
        return None
    request = FetchRequest(0, 1, FETCH_BYTES, READ_UNCOMMITTED, [(tp.topic, [(tp.partition, position, FETCH_BYTES)])])
    try:
        async with asyncio.timeout(FETCH_TIMEOUT):
            response = await client.send(leader, request)
    except (KafkaError, TimeoutError) as exc:
        log.warning("cannot fetch the batch of %s at offset %d to find where it ends: %r", tp, position, exc)
        return None
    for topic, partitions in response.topics:
        for partition, error_code, _highwater, *data in partitions:
            if (topic, partition) == (tp.topic, tp.partition):
                return bytes(data[-1]) if error_code == 0 and data[-1] else None
    return None
