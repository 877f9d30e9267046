"""The Kafka adapter against a real broker and a real Temporal: each record starts its targets once,
through crashes, outages, poison records and consumer-group rebalances."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from aiokafka.protocol.group import MemberAssignment
from aiokafka.record.util import calc_crc32c
from temporalio.client import Client
from temporalio.service import RPCError

from adapters import kafka
from bridge.config import project_slug
from bridge.event import run_digest, target_workflow_id
from bridge.runtime.embedded import free_port
from dispatcher.contract import RUNNER_WORKFLOW
from tests import services
from tests.helpers import assert_eventually, config, count_workflows, result_of, runner, unique, workflow_ids

pytestmark = [pytest.mark.kafka, pytest.mark.temporal]

Record = tuple[bytes, bytes | None, list[tuple[str, bytes]]]  # value, key, headers


# --- helpers --------------------------------------------------------------------------------


async def create_topic(
    bootstrap: str, partitions: int = 3, *, name: str | None = None, configs: dict[str, str] | None = None
) -> str:
    """A new topic (``name``, else a unique one), with ``configs`` (``max.message.bytes``, …)."""
    topic = name or unique("orders")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1, topic_configs=configs or {})]
        )
    finally:
        await admin.close()
    return topic


async def produce(bootstrap: str, topic: str, records: Iterable[Record]) -> list[tuple[int, int]]:
    """Publish in order; returns (partition, offset) of each record."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value=v, key=k, headers=h) for v, k, h in records]
        metas = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [(m.partition, m.offset) for m in metas]


def envelope(name: str, payload: dict[str, Any], key: str | None = None, **extra: Any) -> Record:
    body = json.dumps({"name": name, "payload": payload, **extra}).encode()
    return body, key.encode() if key else None, []


def kafka_child(project: str, wid: str, topic: str, partition: int, offset: int) -> str:
    """The target id of a record without an id of its own: ``kafka:{topic}:{partition}:{offset}``."""
    return target_workflow_id(wid, run_digest(project, f"kafka:{topic}", f"kafka:{topic}:{partition}:{offset}"))


def runs_query(project: str) -> str:
    return f'WorkflowType="{RUNNER_WORKFLOW}" AND TaskQueue="{project_slug(project)}"'


async def assert_runs_exactly(client: Client, project: str, expected: set[str], timeout: float = 90.0) -> None:
    """Every expected target run exists, and no other run of the project's runner does."""
    query = runs_query(project)

    async def counted() -> bool:
        try:
            n = await count_workflows(client, query)
        except RPCError as exc:  # a busy dev server's visibility store may time out; ask again
            raise AssertionError(f"count failed: {exc}") from exc
        assert n <= len(expected), f"{n} runs for {len(expected)} events: something ran twice"
        assert n == len(expected), f"{n} of {len(expected)} runs so far"
        return True

    await assert_eventually(counted, timeout=timeout, interval=1.0, what=f"{len(expected)} target runs")
    assert set(await workflow_ids(client, query)) == expected


async def committed(bootstrap: str, group: str) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp: meta.offset for tp, meta in offsets.items()}


async def end_offsets(bootstrap: str, topic: str) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        await consumer.topics()  # loads the metadata partitions_for_topic reads
        partitions = consumer.partitions_for_topic(topic) or set()
        return await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
    finally:
        await consumer.stop()


async def assert_all_committed(bootstrap: str, group: str, topic: str, timeout: float = 60.0) -> None:
    ends = await end_offsets(bootstrap, topic)

    async def done() -> bool:
        try:
            got = await committed(bootstrap, group)
        except KafkaError as exc:  # e.g. the group coordinator is still loading
            raise AssertionError(f"offsets unavailable: {exc!r}") from exc
        return all(got.get(tp, 0) == end for tp, end in ends.items())

    await assert_eventually(done, timeout=timeout, what=f"group {group} committed up to {ends}")


async def group_members(bootstrap: str, group: str) -> dict[str, set[int]]:
    """member id → assigned partitions, once the group is Stable (else empty)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [resp] = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    [desc] = resp.groups
    state, members = desc[2], desc[5]
    if state != "Stable":
        return {}
    out = {}
    for member in members:
        member_id, assignment = member[0], member[-1]
        decoded = MemberAssignment.decode(assignment) if assignment else None
        out[member_id] = {p for _, parts in (decoded.assignment if decoded else []) for p in parts}
    return out


def kafka_entry(bootstrap: str, topic: str, **extra: Any) -> dict[str, Any]:
    return {"bootstrap_servers": bootstrap, "topics": [topic], **extra}


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}}") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- bridge processes -----------------------------------------------------------------------


class BridgeProcess:
    """``signal-bridge serve`` in its own process group, so it can be SIGKILLed whole."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BridgeProcess:
        exe = shutil.which("signal-bridge", path=str(Path(sys.executable).parent))
        cmd = [exe] if exe else [sys.executable, "-m", "bridge.runtime.cli"]
        cmd += ["serve", "--config", str(self.config_path), "--insecure", "--http-port", str(self.port)]
        env = {**os.environ, "SIGNAL_BRIDGE_DATA_DIR": str(self.log_path.parent / ".signal-bridge")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        return self

    async def metrics(self) -> str:
        async with httpx.AsyncClient(timeout=5) as http:
            return (await http.get(f"http://127.0.0.1:{self.port}/metrics")).text

    async def wait_ready(self, timeout: float = 60.0) -> None:
        async def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"bridge exited\n{self.tail()}"
            try:
                async with httpx.AsyncClient(timeout=2) as http:
                    return (await http.get(f"http://127.0.0.1:{self.port}/readyz")).status_code == 200
            except httpx.HTTPError:
                return False

        await assert_eventually(ready, timeout=timeout, interval=0.3, what="bridge ready")

    def kill(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    async def terminate(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 40)
        except TimeoutError:
            self.kill()

    def tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


@pytest.fixture
async def bridge_processes(tmp_path: Path) -> AsyncIterator[list[BridgeProcess]]:
    procs: list[BridgeProcess] = []
    yield procs
    await asyncio.gather(*(p.terminate() for p in procs))


def write_config(tmp_path: Path, project: str, temporal: str, workflows: list[Any], kafka: list[Any]) -> Path:
    path = tmp_path / f"{project}.yaml"
    data = {"project": project, "temporal": {"address": temporal}, "workflows": workflows, "kafka": kafka}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
async def own_temporal() -> AsyncIterator[services.LocalTemporal]:
    """A Temporal of this test's own, to stop and restart (same port and database)."""
    try:
        server = services.LocalTemporal()
        await asyncio.to_thread(server.start)
    except services.ServiceUnavailable as exc:
        if os.environ.get("SIGNAL_BRIDGE_REQUIRE_SERVICES") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    yield server
    await asyncio.to_thread(server.close)


# --- the tests ------------------------------------------------------------------------------


@pytest.mark.timeout(600)
async def test_2000_envelopes_over_3_partitions_run_exactly_once(
    bridge_factory, temporal_client, temporal_address, kafka_bootstrap
):
    topic = await create_topic(kafka_bootstrap)
    project = unique("kthru")
    cfg = config(
        project,
        temporal_address,
        [runner("count", "order.created")],
        kafka=[kafka_entry(kafka_bootstrap, topic)],
        # The adapter is done within seconds; starting 2,000 runs is the dispatcher's part, and
        # activity mode is the one made for volume (child mode is what the other tests use).
        dispatcher={"start_mode": "activity"},
    )
    bridge = await bridge_factory(cfg)
    n = 2000
    began = time.monotonic()
    placed = await produce(
        kafka_bootstrap, topic, [envelope("order.created", {"n": i}, key=f"customer-{i % 97}") for i in range(n)]
    )
    produced = time.monotonic()
    assert {p for p, _ in placed} == {0, 1, 2}
    adapter = bridge.adapters[0]
    await assert_all_committed(kafka_bootstrap, adapter.group_id, topic, timeout=90)
    consumed = time.monotonic()
    await assert_runs_exactly(
        temporal_client, project, {kafka_child(project, "count", topic, p, o) for p, o in placed}, timeout=480
    )
    finished = time.monotonic()
    accepted = metric(bridge.metrics.render().decode(), "signal_bridge_events_accepted_total", adapter="kafka")
    assert accepted >= n
    print(
        f"\n2000 records: produced in {produced - began:.1f}s, committed by the adapter after "
        f"{consumed - began:.1f}s, all target runs visible after {finished - began:.1f}s; "
        f"signals sent: {metric(bridge.metrics.render().decode(), 'signal_bridge_signals_sent_total'):.0f}"
    )


async def test_cloudevents_binary_and_structured_and_raw_route_by_name(
    bridge_factory, temporal_client, temporal_address, kafka_bootstrap
):
    ce_topic = await create_topic(kafka_bootstrap)
    raw_topic = await create_topic(kafka_bootstrap)
    project = unique("kce")
    cfg = config(
        project,
        temporal_address,
        [
            runner("on-created", "com.example.order.created", template="created {{ .trigger.orderId }}"),
            runner("on-shipped", "com.example.order.shipped", template="shipped {{ .trigger.orderId }}"),
            runner("on-raw", "order.refunded", template="refunded {{ .trigger.orderId }}"),
        ],
        kafka=[
            kafka_entry(kafka_bootstrap, ce_topic, group_id=f"{project}-ce", event={"format": "cloudevents"}),
            kafka_entry(
                kafka_bootstrap, raw_topic, group_id=f"{project}-raw", event={"format": "raw", "name_from": "key"}
            ),
        ],
    )
    await bridge_factory(cfg)
    binary: Record = (
        json.dumps({"orderId": "b-1"}).encode(),
        b"order-b-1",
        [
            ("ce_specversion", b"1.0"),
            ("ce_id", b"evt-1"),
            ("ce_source", b"/shop/orders"),
            ("ce_type", b"com.example.order.created"),
            ("content-type", b"application/json"),
            ("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ],
    )
    structured: Record = (
        json.dumps(
            {
                "specversion": "1.0",
                "id": "evt-2",
                "source": "/shop/shipping",
                "type": "com.example.order.shipped",
                "time": "2024-05-01T10:00:00Z",
                "datacontenttype": "application/json",
                "data": {"orderId": "s-2"},
            }
        ).encode(),
        b"order-s-2",
        [("content-type", b"application/cloudevents+json; charset=utf-8")],
    )
    await produce(kafka_bootstrap, ce_topic, [binary, structured])
    [(raw_partition, raw_offset)] = await produce(
        kafka_bootstrap, raw_topic, [(json.dumps({"orderId": "r-3"}).encode(), b"order.refunded", [])]
    )

    created = target_workflow_id("on-created", run_digest(project, f"kafka:{ce_topic}", "/shop/orders#evt-1"))
    shipped = target_workflow_id("on-shipped", run_digest(project, f"kafka:{ce_topic}", "/shop/shipping#evt-2"))
    refunded = kafka_child(project, "on-raw", raw_topic, raw_partition, raw_offset)
    assert (await result_of(temporal_client, created))["tasks"]["render"] == "created b-1"
    assert (await result_of(temporal_client, shipped))["tasks"]["render"] == "shipped s-2"
    assert (await result_of(temporal_client, refunded))["tasks"]["render"] == "refunded r-3"
    await assert_runs_exactly(temporal_client, project, {created, shipped, refunded})

    desc = await temporal_client.get_workflow_handle(created).describe()
    event = (await temporal_client.get_workflow_handle(created).fetch_history()).events[0]
    assert desc.workflow_type == RUNNER_WORKFLOW
    started_input = json.loads(event.workflow_execution_started_event_attributes.input.payloads[0].data)
    assert started_input["event"]["metadata"]["traceparent"].startswith("00-0af7651916cd43dd")
    assert started_input["event"]["metadata"]["cloudevents"]["type"] == "com.example.order.created"


async def test_poison_records_are_dead_lettered_or_counted_and_good_ones_around_them_run(
    bridge_factory, temporal_client, temporal_address, kafka_bootstrap
):
    topic = await create_topic(kafka_bootstrap)
    dlq = f"{topic}.dlq"
    project = unique("kdlq")
    schema = {"type": "object", "required": ["orderId"]}
    cfg = config(
        project,
        temporal_address,
        [runner("orders", "order.created", schema=schema)],
        kafka=[
            # The same topic read by two groups: one dead-letters, one only logs and counts.
            kafka_entry(kafka_bootstrap, topic, group_id=f"{project}-dlq", dead_letter_topic=dlq),
            kafka_entry(kafka_bootstrap, topic, group_id=f"{project}-skip"),
        ],
    )
    bridge = await bridge_factory(cfg)
    poison: dict[int, tuple[Record, str]] = {
        3: ((b"{not json", b"p-1", [("x-trace", b"keep-me")]), "malformed"),
        7: (envelope("", {"orderId": "x"}, key="p-2"), "no_name"),
        11: (envelope("order.created", {"amount": 5}, key="p-3"), "schema_invalid"),
        15: (envelope("order.unheard-of", {"orderId": "x"}, key="p-4"), "unroutable"),
        19: ((b"[1, 2, 3]", None, []), "malformed"),
    }
    records = [poison[i][0] if i in poison else envelope("order.created", {"orderId": f"o-{i}"}) for i in range(40)]
    placed = await produce(kafka_bootstrap, topic, records)
    good = {kafka_child(project, "orders", topic, *placed[i]) for i in range(40) if i not in poison}

    letters = await read_letters(kafka_bootstrap, dlq, len(poison))

    by_origin = {}
    for letter in letters:
        headers = {k: v.decode() for k, v in letter.headers}
        by_origin[(int(headers["x-original-partition"]), int(headers["x-original-offset"]))] = (letter, headers)
    for i, ((value, key, orig_headers), reason) in poison.items():
        letter, headers = by_origin[placed[i]]
        assert headers["x-dead-letter-reason"] == reason
        assert headers["x-original-topic"] == topic
        assert headers["x-dead-letter-error"]
        assert (letter.value, letter.key) == (value, key)
        for name, raw in orig_headers:
            assert headers[name] == raw.decode()
    assert by_origin[placed[11]][1]["x-event-name"] == "order.created"

    await assert_runs_exactly(temporal_client, project, good)
    await assert_all_committed(kafka_bootstrap, f"{project}-dlq", topic)
    await assert_all_committed(kafka_bootstrap, f"{project}-skip", topic)
    text = bridge.metrics.render().decode()
    dropped = {
        reason: metric(text, "signal_bridge_events_dropped_total", adapter="kafka", reason=reason)
        for reason in ("malformed", "no_name", "schema_invalid", "unroutable")
    }
    assert dropped == {"malformed": 2, "no_name": 1, "schema_invalid": 1, "unroutable": 1}
    assert metric(text, "signal_bridge_events_rejected_total", adapter="kafka", reason="malformed") == 4


async def test_a_letter_the_dead_letter_topic_refuses_as_too_large_is_written_smaller_and_the_partition_moves_on(
    bridge_factory, temporal_client, temporal_address, kafka_bootstrap
):
    """A dead-letter topic whose ``max.message.bytes`` is below a poison record's size refuses its
    letter; the letter is written again a quarter as large. With an idempotent producer that retry
    (and every letter after it to that partition) was refused as ``OutOfOrderSequenceNumber`` for
    good: the consumer stayed paused, and the good record behind the poison never ran."""
    topic = await create_topic(kafka_bootstrap, partitions=1)
    dlq = await create_topic(kafka_bootstrap, partitions=1, name=f"{topic}.dlq", configs={"max.message.bytes": "70000"})
    project = unique("kdlqsize")
    cfg = config(
        project,
        temporal_address,
        [runner("orders", "order.created")],
        kafka=[kafka_entry(kafka_bootstrap, topic, group_id=f"{project}-g", dead_letter_topic=dlq)],
    )
    await bridge_factory(cfg)
    records: list[Record] = [
        (b"{small poison", None, []),  # a letter the topic takes: the producer's first on the partition
        (b"{" + b"x" * 100_000, None, []),  # its letter (100 KB) is refused; a quarter of the budget fits
        envelope("order.created", {"orderId": "after"}),
    ]
    placed = await produce(kafka_bootstrap, topic, records)
    await assert_runs_exactly(temporal_client, project, {kafka_child(project, "orders", topic, *placed[2])})
    letters = await read_letters(kafka_bootstrap, dlq, 2)
    by_offset = {int(dict(r.headers)["x-original-offset"]): r for r in letters}
    assert by_offset[placed[0][1]].value == records[0][0]
    big = by_offset[placed[1][1]]
    assert len(big.value) < 62_500 and dict(big.headers)["x-dead-letter-trimmed"] == b"value"
    await assert_all_committed(kafka_bootstrap, f"{project}-g", topic)


async def produce_unreadable(bootstrap: str, topic: str, partition: int, value: bytes, *after: bytes) -> int:
    """One producer batch whose first record has a header name that is not UTF-8, as a client
    other than Java's can write it (aiokafka's own producer cannot: the batch is built, then its
    byte patched and its CRC set again), then the records ``after`` it in that batch. Returns the
    bad record's offset."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_batch_size=1_000_000)
    await producer.start()
    try:
        batch = producer.create_batch()
        batch.append(key=None, value=value, timestamp=None, headers=[("x-bad!", b"v")])
        for more in after:
            assert batch.append(key=None, value=more, timestamp=None, headers=[]) is not None
        raw = bytearray(batch._build())
        raw[raw.find(b"x-bad!") + 5] = 0xFF
        struct.pack_into(">I", raw, 17, calc_crc32c(bytes(raw[21:])))  # the v2 batch's CRC covers from byte 21
        batch._buffer = bytes(raw)
        meta = await (await producer.send_batch(batch, topic, partition=partition))
    finally:
        await producer.stop()
    return int(meta.offset)


async def lettered_orders(
    bootstrap: str, temporal_address: str, prefix: str, partitions: int
) -> tuple[str, str, str, Any]:
    """A new topic, its dead-letter topic, a project named from ``prefix``, and its config: one
    runner for order.created, one consumer that dead-letters. Returns (topic, dlq, project, cfg)."""
    topic = await create_topic(bootstrap, partitions=partitions)
    dlq = f"{topic}.dlq"
    project = unique(prefix)
    cfg = config(
        project,
        temporal_address,
        [runner("orders", "order.created")],
        kafka=[kafka_entry(bootstrap, topic, group_id=f"{project}-g", dead_letter_topic=dlq)],
    )
    return topic, dlq, project, cfg


async def test_a_record_the_client_cannot_read_is_dead_lettered_by_its_offset_and_the_partition_moves_on(
    bridge_factory, temporal_client, temporal_address, kafka_bootstrap
):
    """aiokafka refuses a header name that is not UTF-8: every poll that reached the record failed,
    the partition stalled and /readyz stayed red until an operator moved the group past it."""
    topic, dlq, project, cfg = await lettered_orders(kafka_bootstrap, temporal_address, "kunread", partitions=2)
    before = [envelope("order.created", {"orderId": f"a-{i}"}) for i in range(6)]
    placed = await produce(kafka_bootstrap, topic, before)
    bad = await produce_unreadable(kafka_bootstrap, topic, 0, json.dumps({"name": "order.created"}).encode())
    after = [envelope("order.created", {"orderId": f"b-{i}"}) for i in range(6)]
    placed += await produce(kafka_bootstrap, topic, after)
    await bridge_factory(cfg)
    good = {kafka_child(project, "orders", topic, *where) for where in placed}
    await assert_runs_exactly(temporal_client, project, good)
    [letter] = await read_letters(kafka_bootstrap, dlq, 1)
    headers = {k: v.decode() for k, v in letter.headers}
    assert (headers["x-original-partition"], headers["x-original-offset"]) == ("0", str(bad))
    assert headers["x-dead-letter-reason"] == "malformed" and "UnicodeDecodeError" in headers["x-dead-letter-error"]
    assert letter.value == b"" and headers["x-dead-letter-trimmed"] == "headers,key,value"
    await assert_all_committed(kafka_bootstrap, f"{project}-g", topic)


async def test_the_rest_of_an_unreadable_producer_batch_is_one_dead_letter_and_the_partition_moves_on(
    bridge_factory, temporal_client, temporal_address, kafka_bootstrap
):
    """A producer batch of 2,000 tiny records whose first cannot be read: aiokafka cannot read the
    rest either. They used to be lettered one at a time, each after two polls that parsed the batch
    again up to it (about an hour for 1 MB of them). Now one fetch finds the batch's end, and one
    letter names the range; the records before and after the batch run."""
    topic, dlq, project, cfg = await lettered_orders(kafka_bootstrap, temporal_address, "kbatch", partitions=1)
    placed = await produce(kafka_bootstrap, topic, [envelope("order.created", {"orderId": f"a-{i}"}) for i in range(3)])
    rest = [json.dumps({"name": "order.created", "payload": {"n": i}}).encode() for i in range(1, 2_000)]
    bad = await produce_unreadable(kafka_bootstrap, topic, 0, json.dumps({"name": "order.created"}).encode(), *rest)
    placed += await produce(
        kafka_bootstrap, topic, [envelope("order.created", {"orderId": f"b-{i}"}) for i in range(3)]
    )
    assert [offset for _, offset in placed] == [0, 1, 2, bad + 2_000, bad + 2_001, bad + 2_002]
    await bridge_factory(cfg)
    await assert_runs_exactly(temporal_client, project, {kafka_child(project, "orders", topic, *w) for w in placed})
    await assert_all_committed(kafka_bootstrap, f"{project}-g", topic)
    [letter] = await read_letters(kafka_bootstrap, dlq, 1)
    headers = {k: v.decode() for k, v in letter.headers}
    assert (headers["x-original-offset"], headers["x-original-last-offset"]) == (str(bad), str(bad + 1_999))
    assert headers["x-dead-letter-reason"] == "malformed" and "UnicodeDecodeError" in headers["x-dead-letter-error"]
    assert f"offsets {bad} to {bad + 1_999}" in headers["x-dead-letter-error"]


async def test_a_new_group_with_latest_reads_only_what_comes_after_and_notes_where_it_began(
    bridge_factory, temporal_client, temporal_address, kafka_bootstrap
):
    """``auto_offset_reset: latest``: records written before the group first joined start nothing,
    every one after starts once, and the adapter noted where each partition began (the end of its
    log then), which is where a poll that fails before its positions are noted goes back to."""
    topic = await create_topic(kafka_bootstrap, partitions=2)
    project = unique("klatest")
    cfg = config(
        project,
        temporal_address,
        [runner("orders", "order.created")],
        kafka=[kafka_entry(kafka_bootstrap, topic, group_id=f"{project}-g", auto_offset_reset="latest")],
    )
    old = await produce(kafka_bootstrap, topic, [envelope("order.created", {"orderId": f"old-{i}"}) for i in range(4)])
    ends = {TopicPartition(topic, p): 1 + max((o for q, o in old if q == p), default=-1) for p in range(2)}
    bridge = await bridge_factory(cfg)
    adapter = bridge.adapters[0]
    assert isinstance(adapter, kafka.KafkaAdapter)
    await assert_eventually(lambda: adapter._origins == ends, timeout=30, what="origins noted at assignment")
    placed = await produce(
        kafka_bootstrap, topic, [envelope("order.created", {"orderId": f"new-{i}"}) for i in range(4)]
    )
    await assert_runs_exactly(temporal_client, project, {kafka_child(project, "orders", topic, *w) for w in placed})
    await assert_all_committed(kafka_bootstrap, f"{project}-g", topic)


async def test_temporal_down_15s_pauses_partitions_then_resumes_without_loss_or_doubles(
    own_temporal, bridge_factory, kafka_bootstrap
):
    topic = await create_topic(kafka_bootstrap)
    project = unique("kout")
    client = await Client.connect(own_temporal.address)
    cfg = config(
        project,
        own_temporal.address,
        [runner("orders", "order.created")],
        kafka=[kafka_entry(kafka_bootstrap, topic)],
    )
    bridge = await bridge_factory(cfg, client=client)
    adapter = bridge.adapters[0]
    per_phase = 60

    def batch(phase: str) -> list[Record]:
        return [envelope("order.created", {"n": f"{phase}{i}"}, key=f"k{i % 7}") for i in range(per_phase)]

    placed = await produce(kafka_bootstrap, topic, batch("before"))
    await assert_runs_exactly(client, project, {kafka_child(project, "orders", topic, p, o) for p, o in placed})

    await asyncio.to_thread(own_temporal.stop)
    down_since = time.monotonic()
    placed += await produce(kafka_bootstrap, topic, batch("during"))

    async def paused() -> bool:
        assigned = adapter.consumer.assignment()
        assert adapter.paused, "adapter not paused"
        assert assigned and adapter.consumer.paused() == assigned, f"paused {adapter.consumer.paused()} of {assigned}"
        return True

    await assert_eventually(paused, timeout=30, what="partitions paused while Temporal is down")
    # Nothing read during the outage is committed: the group stays where Temporal stopped taking events.
    assert sum((await committed(kafka_bootstrap, adapter.group_id)).values()) == per_phase
    await asyncio.sleep(max(0.0, 15 - (time.monotonic() - down_since)))  # the outage itself, not a wait
    assert adapter.paused and adapter.healthy()
    assert sum((await committed(kafka_bootstrap, adapter.group_id)).values()) == per_phase

    await asyncio.to_thread(own_temporal.start)

    async def resumed() -> bool:
        assert not adapter.paused and not adapter.consumer.paused()
        return True

    await assert_eventually(resumed, timeout=60, what="partitions resumed")
    placed += await produce(kafka_bootstrap, topic, batch("after"))
    await assert_runs_exactly(client, project, {kafka_child(project, "orders", topic, p, o) for p, o in placed})
    await assert_all_committed(kafka_bootstrap, adapter.group_id, topic)
    assert metric(bridge.metrics.render().decode(), "signal_bridge_temporal_unavailable_total", adapter="kafka") >= 1


async def _produce_stream(
    bootstrap: str, topic: str, records: list[Record], per_second: int = 50
) -> list[tuple[int, int]]:
    """Produce steadily, so a crash lands in the middle of consumption."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        placed = []
        for start in range(0, len(records), per_second // 10):
            futures = [
                await producer.send(topic, value=v, key=k, headers=h)
                for v, k, h in records[start : start + per_second // 10]
            ]
            placed += [(m.partition, m.offset) for m in await asyncio.gather(*futures)]
            await asyncio.sleep(0.1)
    finally:
        await producer.stop()
    return placed


async def test_bridge_sigkilled_mid_stream_and_restarted_runs_every_record_once(
    bridge_processes, tmp_path, temporal_client, temporal_address, kafka_bootstrap
):
    topic = await create_topic(kafka_bootstrap)
    project = unique("kkill")
    group = f"signal-bridge-{project_slug(project)}"
    path = write_config(
        tmp_path,
        project,
        temporal_address,
        [runner("orders", "order.created")],
        [kafka_entry(kafka_bootstrap, topic, max_batch=20)],
    )
    first = BridgeProcess(path, tmp_path / "first.log").start()
    bridge_processes.append(first)
    await first.wait_ready()
    n = 200
    stream = asyncio.create_task(
        _produce_stream(
            kafka_bootstrap, topic, [envelope("order.created", {"n": i}, key=f"k{i % 11}") for i in range(n)]
        )
    )

    async def consuming() -> bool:
        try:
            done = sum((await committed(kafka_bootstrap, group)).values())
        except KafkaError as exc:
            raise AssertionError(f"offsets unavailable: {exc!r}") from exc
        assert done >= 40, f"{done} committed"
        return True

    await assert_eventually(consuming, timeout=60, what="the adapter committing")
    assert not stream.done(), "the producer finished before the crash: nothing left mid-stream"
    first.kill()
    at_kill = sum((await committed(kafka_bootstrap, group)).values())
    assert at_kill < n

    second = BridgeProcess(path, tmp_path / "second.log").start()
    bridge_processes.append(second)
    placed = await stream
    try:
        await assert_runs_exactly(
            temporal_client, project, {kafka_child(project, "orders", topic, p, o) for p, o in placed}, timeout=150
        )
        await assert_all_committed(kafka_bootstrap, group, topic)
    except AssertionError:
        print(second.tail())
        raise
    print(f"\nSIGKILL after {at_kill} of {n} records were committed; the restart ran the rest once")


async def test_two_bridges_in_one_group_split_partitions_and_run_each_record_once(
    bridge_processes, tmp_path, temporal_client, temporal_address, kafka_bootstrap
):
    topic = await create_topic(kafka_bootstrap, partitions=4)
    project = unique("kpair")
    group = f"signal-bridge-{project_slug(project)}"
    path = write_config(
        tmp_path,
        project,
        temporal_address,
        [runner("orders", "order.created")],
        [kafka_entry(kafka_bootstrap, topic, max_batch=50)],
    )
    pair = [BridgeProcess(path, tmp_path / f"bridge-{k}.log").start() for k in range(2)]
    bridge_processes.extend(pair)
    await asyncio.gather(*(p.wait_ready() for p in pair))

    async def split() -> dict[str, set[int]]:
        try:
            members = await group_members(kafka_bootstrap, group)
        except KafkaError as exc:
            raise AssertionError(f"group unavailable: {exc!r}") from exc
        assert len(members) == 2 and all(members.values()), f"group {group}: {members}"
        return members

    members = await assert_eventually(split, timeout=60, what="two members sharing the partitions")
    first, second = members.values()
    assert not first & second and first | second == {0, 1, 2, 3}

    n = 200
    placed = await produce(kafka_bootstrap, topic, [envelope("order.created", {"n": i}, key=f"k{i}") for i in range(n)])
    await assert_runs_exactly(
        temporal_client, project, {kafka_child(project, "orders", topic, p, o) for p, o in placed}
    )
    await assert_all_committed(kafka_bootstrap, group, topic)
    accepted = [metric(await p.metrics(), "signal_bridge_events_accepted_total", adapter="kafka") for p in pair]
    assert all(a > 0 for a in accepted) and sum(accepted) >= n, accepted


# --- poison that once stalled a partition ------------------------------------------------------


def nested_envelope(depth: int, opener: bytes = b"[") -> bytes:
    closer = b"]" if opener == b"[" else b"}"
    inner = opener if opener == b"[" else b'{"k":'
    core = b"1" if opener == b"{" else b""
    return b'{"name": "order.created", "payload": {"a": ' + inner * depth + core + closer * depth + b"}}"


async def read_letters(bootstrap: str, topic: str, expected: int) -> list[Any]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    letters: list[Any] = []
    try:

        async def all_letters() -> bool:
            batch = await consumer.getmany(timeout_ms=500)
            letters.extend(r for recs in batch.values() for r in recs)
            assert len(letters) <= expected, f"{len(letters)} letters for {expected} poison records"
            return len(letters) == expected

        await assert_eventually(all_letters, timeout=60, interval=0.1, what="dead letters")
    finally:
        await consumer.stop()
    return letters


@pytest.mark.timeout(300)
async def test_deep_nan_invalid_utf8_and_oversized_records_are_dead_lettered_and_the_partition_moves_on(
    bridge_factory, temporal_client, temporal_address, kafka_bootstrap
):
    """Records that once stalled a partition for good (nested past the SDK encoder's depth, NaN,
    invalid UTF-8, a 5,000-digit integer, a 600 KB unroutable envelope whose dead letter was 1.2 MB),
    interleaved with good ones: every good record runs once, every poison one is dead-lettered with
    its reason, and the group's committed offsets reach the end of the topic."""
    topic = await create_topic(kafka_bootstrap, partitions=2)
    dlq = f"{topic}.dlq"
    project = unique("kpoison")
    cfg = config(
        project,
        temporal_address,
        [runner("orders", "order.created")],
        kafka=[kafka_entry(kafka_bootstrap, topic, dead_letter_topic=dlq, max_batch=50)],
    )
    bridge = await bridge_factory(cfg)
    big = "x" * 300_000
    oversized = json.dumps({"name": f"order.unheard-of-{big}", "id": f"id-{big}", "payload": {}}).encode()
    poison: dict[int, tuple[Record, str]] = {
        2: ((nested_envelope(2_400), b"p-deep-2400", []), "malformed"),
        5: ((b"[" * 2_475 + b"]" * 2_475, b"p-deep-2475", []), "malformed"),
        8: ((nested_envelope(2_600, b"{"), b"p-deep-2600", []), "malformed"),
        11: ((b'{"name": "order.created", "payload": {"n": NaN}}', b"p-nan", []), "malformed"),
        14: ((b'{"name": "order.created", "payload": {"n": -Infinity}}', b"p-inf", []), "malformed"),
        17: (
            (b'{"name": "order.created", "payload": {"n": "\xff\xfe"}}', b"p-utf8", [("x-keep", b"\xff")]),
            "malformed",
        ),
        20: ((b'{"name": "order.created", "payload": {"n": ' + b"9" * 5_000 + b"}}", b"p-int", []), "malformed"),
        23: (
            (oversized, b"p-oversized", [("traceparent", b"00-abc-def-01")]),
            "malformed",
        ),  # id and name over 4,096 characters
    }
    records = [
        poison[i][0] if i in poison else envelope("order.created", {"orderId": f"o-{i}"}, key=f"k-{i}")
        for i in range(30)
    ]
    placed = await produce(kafka_bootstrap, topic, records)
    good = {kafka_child(project, "orders", topic, *placed[i]) for i in range(30) if i not in poison}

    letters = await read_letters(kafka_bootstrap, dlq, len(poison))
    by_key = {letter.key: (letter, {k: v for k, v in letter.headers}) for letter in letters}
    for i, ((value, key, _), reason) in poison.items():
        letter, headers = by_key[key]
        assert headers["x-dead-letter-reason"] == reason.encode(), (key, headers["x-dead-letter-error"])
        assert (int(headers["x-original-partition"]), int(headers["x-original-offset"])) == placed[i]
        assert letter.value == value  # whole: only the headers had to give
    oversized_headers = by_key[b"p-oversized"][1]
    # Its x-event-name was cut, but the record had no header of that name: the letter holds the
    # record whole, and a replay may take it (it is refused again, as malformed).
    assert "x-dead-letter-trimmed" not in oversized_headers
    assert (
        oversized_headers["x-event-name"].startswith(b"order.unheard-of-xxx")
        and len(oversized_headers["x-event-name"]) <= 4096
    )
    assert oversized_headers["traceparent"] == b"00-abc-def-01"
    assert by_key[b"p-utf8"][1]["x-keep"] == b"\xff"

    await assert_runs_exactly(temporal_client, project, good)
    adapter = bridge.adapters[0]
    await assert_all_committed(kafka_bootstrap, adapter.group_id, topic)
    assert adapter.healthy() and not adapter.paused
    text = bridge.metrics.render().decode()
    assert metric(text, "signal_bridge_events_rejected_total", adapter="kafka", reason="malformed") == 8
    assert metric(text, "signal_bridge_events_rejected_total", adapter="kafka", reason="unroutable") == 0
