"""``signal-bridge replay`` against real Kafka, RabbitMQ and Temporal (docs/replay.md).

Dead letters: events refused as ``unroutable`` by a config without their trigger are replayed
after the config gained it, each starting exactly one run under its *original* id and source, a
second replay starting nothing new, and ``--dry-run`` changing nothing. History: the events of
past target runs are sent again as ``replay:{n}:{id}``, once per event however many runs it
started, and a replay with the same number starts nothing new.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from temporalio import workflow
from temporalio.client import Client
from temporalio.worker import Worker

from bridge import snapshot
from bridge.config import parse_config, project_slug
from bridge.errors import BridgeError
from bridge.event import EventSignal, run_digest, target_workflow_id
from bridge.runtime.replay import replay_amqp, replay_kafka, replay_runs
from dispatcher.contract import RUNNER_WORKFLOW
from tests.helpers import TOKEN, assert_eventually, count_workflows, runner, unique, workflow_ids

ROOT = Path(__file__).resolve().parents[2]


# --- helpers --------------------------------------------------------------------------------------


def write_config(
    path: Path, project: str, temporal_address: str, workflows: list[dict[str, Any]], **extra: Any
) -> Path:
    """The config file both the bridge (reloading it) and the replay read; a new mtime each write."""
    data = {
        "project": project,
        "temporal": {"address": temporal_address},
        "http": {"port": 0, "auth": {"tokens": [TOKEN]}},
        "workflows": workflows,
        **extra,
    }
    stamp = path.stat().st_mtime + 1 if path.exists() else None
    path.write_text(yaml.safe_dump(data))
    if stamp is not None:
        os.utime(path, (stamp, stamp))
    return path


def runs_query(project: str) -> str:
    return f'WorkflowType="{RUNNER_WORKFLOW}" AND TaskQueue="{project_slug(project)}"'


async def assert_runs(client: Client, project: str, expected: set[str], *, settle: float = 0.0) -> None:
    """Exactly the expected runs exist (waited for); with ``settle``, still so that long after."""
    query = runs_query(project)

    async def there() -> bool:
        n = await count_workflows(client, query)
        assert n <= len(expected), f"{n} runs for {len(expected)} expected: something ran twice"
        return n == len(expected)

    await assert_eventually(there, timeout=60, interval=0.5, what=f"{len(expected)} runs")
    if settle:
        await asyncio.sleep(settle)
        assert await count_workflows(client, query) == len(expected)
    assert set(await workflow_ids(client, query)) == expected


def runs_of(project: str, entry: str, source: str, ids: list[str]) -> set[str]:
    return {target_workflow_id(entry, run_digest(project, source, i)) for i in ids}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``signal-bridge`` in its own process: the command an operator types."""
    return subprocess.run(
        [sys.executable, "-m", "bridge.runtime.cli", "--log-level", "WARNING", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )


# --- Kafka ----------------------------------------------------------------------------------------


async def create_topics(bootstrap: str, *names: str, partitions: int = 2) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names])
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes | None]]) -> list[tuple[int, int]]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        metas = await asyncio.gather(*[await producer.send(topic, value=v, key=k) for v, k in records])
    finally:
        await producer.stop()
    return [(m.partition, m.offset) for m in metas]


async def read_all(bootstrap: str, topic: str, expect: int) -> list[Any]:
    """Every record of ``topic`` (at least ``expect`` of them), without a group."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    got: list[Any] = []
    try:

        async def enough() -> bool:
            batch = await consumer.getmany(timeout_ms=500)
            got.extend(r for recs in batch.values() for r in recs)
            return len(got) >= expect

        await assert_eventually(enough, timeout=60, interval=0.1, what=f"{expect} records in {topic}")
    finally:
        await consumer.stop()
    return got


async def end_total(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(2)]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


async def committed(bootstrap: str, group: str) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return {tp: m.offset for tp, m in (await admin.list_consumer_group_offsets(group)).items()}
    finally:
        await admin.close()


def envelope(name: str, n: int, event_id: str | None = None) -> bytes:
    return json.dumps({"name": name, "payload": {"n": n}, **({"id": event_id} if event_id else {})}).encode()


@pytest.mark.kafka
@pytest.mark.temporal
async def test_kafka_dead_letters_replayed_after_a_config_change_start_each_event_once(
    bridge_factory, temporal_client, temporal_address, kafka_bootstrap, tmp_path
):
    project = unique("krp")
    topic, dlq = unique("orders"), unique("orders-dlq")
    await create_topics(kafka_bootstrap, topic, dlq)
    entry = {"bootstrap_servers": kafka_bootstrap, "topics": [topic], "dead_letter_topic": dlq}
    path = tmp_path / "bridge.yaml"
    before = [runner("other", "order.other")]
    write_config(path, project, temporal_address, before, kafka=[entry])
    data = yaml.safe_load(path.read_text())
    bridge = await bridge_factory(parse_config(data), config_path=path, watch=False)

    # Two events with ids of their own, two whose id is their offset, one that stays unroutable.
    records = [
        (envelope("order.created", 1, "e-1"), b"k1"),
        (envelope("order.created", 2), b"k2"),
        (envelope("order.created", 3, "e-3"), b"k3"),
        (envelope("order.created", 4), b"k4"),
        (envelope("order.never", 5, "e-never"), b"k5"),
    ]
    placed = await produce(kafka_bootstrap, topic, records)
    letters = await read_all(kafka_bootstrap, dlq, len(records))
    assert {dict(r.headers)["x-dead-letter-reason"] for r in letters} == {b"unroutable"}

    # The fix: the trigger now exists; the running bridge's dispatcher reloads its routes.
    write_config(path, project, temporal_address, [*before, runner("orders", "order.created")], kafka=[entry])
    assert await bridge.reload()
    fixed = snapshot.load(path)
    ids = ["e-1", f"kafka:{topic}:{placed[1][0]}:{placed[1][1]}", "e-3", f"kafka:{topic}:{placed[3][0]}:{placed[3][1]}"]
    expected = runs_of(project, "orders", f"kafka:{topic}", ids)
    group = f"signal-bridge-replay-{project_slug(project)}"

    # --dry-run: decodes and checks, says what would happen, and changes nothing.
    out = io.StringIO()
    dry = await replay_kafka(fixed, topic=dlq, dry_run=True, out=out)
    assert (dry.tally.read, dry.tally.accepted, dict(dry.tally.refused)) == (5, 4, {"unroutable": 1})
    assert out.getvalue().count("would accept") == 4 and "e-never" in out.getvalue()
    await asyncio.sleep(2)
    assert await count_workflows(temporal_client, runs_query(project)) == 0
    assert await committed(kafka_bootstrap, group) == {}
    assert await end_total(kafka_bootstrap, dlq) == 5

    # The replay, as an operator runs it: each event starts its run once, with its original id.
    done = cli("replay", "kafka", "--config", str(path), "--topic", dlq)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "accepted: 4" in done.stdout and "still refused: 1 (unroutable: 1)" in done.stdout, done.stdout
    assert f"still refused letters were written again to {dlq} with the new reason" in done.stdout, done.stdout
    await assert_runs(temporal_client, project, expected)
    # The letter still refused was written again (new reason, same origin); the replay committed
    # what it read, the five letters there were when it began.
    assert await end_total(kafka_bootstrap, dlq) == 6
    never = [r for r in await read_all(kafka_bootstrap, dlq, 6) if ("x-event-id", b"e-never") in list(r.headers)]
    assert len(never) == 2
    for letter in never:
        headers = {k: v.decode() for k, v in letter.headers}
        assert headers["x-dead-letter-reason"] == "unroutable"
        assert (headers["x-original-topic"], int(headers["x-original-offset"])) == (topic, placed[4][1])
    assert sum((await committed(kafka_bootstrap, group)).values()) == 5

    # A second replay reads only the letter still refused, and starts nothing.
    second = await replay_kafka(fixed, topic=dlq, client=temporal_client)
    assert (second.tally.read, second.tally.accepted, dict(second.tally.refused)) == (1, 0, {"unroutable": 1})
    # A replay in a new group reads every letter again: same ids, so the same runs: nothing new.
    # The three letters of e-never's record (its own and the two replays' rewrites) are settled
    # once and written again once (before, once each: every fresh-group replay doubled them).
    third = await replay_kafka(fixed, topic=dlq, group=unique("fresh"), client=temporal_client)
    assert (third.tally.read, third.tally.accepted, sum(third.tally.refused.values())) == (7, 4, 1)
    assert await end_total(kafka_bootstrap, dlq) == 8
    assert third.existing is not None and third.existing.duplicates == 4 and third.existing.new_runs == 0
    await assert_runs(temporal_client, project, expected, settle=3)


# --- RabbitMQ ----------------------------------------------------------------------------------


async def depth(url: str, queue: str) -> int:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


@pytest.mark.amqp
@pytest.mark.temporal
async def test_amqp_dead_letters_replayed_after_a_config_change_start_each_event_once(
    bridge_factory, temporal_client, temporal_address, amqp_url, tmp_path
):
    project, queue, exchange, dead = unique("arp"), unique("q"), unique("ex"), unique("dlq")
    dlx = f"{exchange}.dlx"
    entry = {
        "url": amqp_url,
        "queue": queue,
        "bindings": [{"exchange": exchange, "exchange_type": "topic", "routing_key": "order.#"}],
        "event": {"format": "raw", "name_from": "routing_key"},
        "dead_letter_exchange": dlx,
    }
    path = tmp_path / "bridge.yaml"
    before = [runner("other", "order.other")]
    write_config(path, project, temporal_address, before, amqp=[entry])
    bridge = await bridge_factory(parse_config(yaml.safe_load(path.read_text())), config_path=path, watch=False)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        letters = await channel.declare_queue(dead, durable=True)
        await letters.bind(dlx, routing_key="#")
        target = await channel.get_exchange(exchange)
        messages = [
            ("order.created", b'{"n": 1}', {"message_id": "m-1"}),
            ("order.created", b'{"n": 2}', {"message_id": "m-2"}),
            ("order.created", b'{"n": 3}', {"message_id": "m-3"}),
            ("order.created", b'{"n": 4}', {"message_id": "m-4"}),
            ("order.never", b'{"n": 5}', {"message_id": "m-never"}),
        ]
        for key, body, props in messages:
            await target.publish(aio_pika.Message(body, **props), routing_key=key, mandatory=True)

        async def all_dead() -> bool:
            return await depth(amqp_url, dead) == len(messages)

        try:
            await assert_eventually(all_dead, timeout=60, what="every message dead-lettered")
            write_config(path, project, temporal_address, [*before, runner("orders", "order.created")], amqp=[entry])
            assert await bridge.reload()
            fixed = snapshot.load(path)
            expected = runs_of(project, "orders", f"amqp:{queue}", ["m-1", "m-2", "m-3", "m-4"])

            out = io.StringIO()
            dry = await replay_amqp(fixed, queue=dead, dry_run=True, out=out)
            assert (dry.tally.read, dry.tally.accepted, dict(dry.tally.refused)) == (5, 4, {"unroutable": 1})
            await asyncio.sleep(2)
            assert await depth(amqp_url, dead) == 5
            assert await count_workflows(temporal_client, runs_query(project)) == 0

            done = await replay_amqp(fixed, queue=dead, client=temporal_client)
            assert (done.tally.read, done.tally.accepted, dict(done.tally.refused)) == (5, 4, {"unroutable": 1})
            assert done.ok and done.existing is not None and done.existing.new_runs == 4
            assert done.notes == [f"still refused messages were published again to {dead} with the new reason"]
            await assert_runs(temporal_client, project, expected)
            assert await depth(amqp_url, dead) == 1  # the still refused one, published again with its reason
            left = await letters.get(no_ack=False, timeout=5)
            assert left.message_id == "m-never"
            assert left.headers["x-dead-letter-reason"] == "unroutable"
            assert (left.headers["x-original-queue"], left.headers["x-original-exchange"]) == (queue, exchange)
            assert left.headers["x-original-routing-key"] == "order.never"
            await left.reject(requeue=True)

            second = await replay_amqp(fixed, queue=dead, client=temporal_client)
            assert (second.tally.read, second.tally.accepted, dict(second.tally.refused)) == (1, 0, {"unroutable": 1})
            assert await depth(amqp_url, dead) == 1
            await assert_runs(temporal_client, project, expected, settle=3)
        finally:
            await channel.queue_delete(dead)


# --- history -------------------------------------------------------------------------------------


async def fan_out_runs(
    bridge_factory, temporal_client: Client, temporal_address: str, tmp_path: Path
) -> tuple[str, Path, Any]:
    """A project whose two entries both take order.created, and three events that started both."""
    project = unique("hrp")
    path = write_config(
        tmp_path / "bridge.yaml",
        project,
        temporal_address,
        [runner("audit", "order.created"), runner("ship", "order.created")],
    )
    fixed = snapshot.load(path)
    bridge = await bridge_factory(fixed.config)
    assert bridge.pipeline is not None
    events = [EventSignal(f"h-{i}", "order.created", {"n": i}, "http:token-1") for i in range(3)]
    await bridge.pipeline.submit(events, "test")
    first = runs_of(project, "audit", "http:token-1", [e.id for e in events])
    first |= runs_of(project, "ship", "http:token-1", [e.id for e in events])
    await assert_runs(temporal_client, project, first)
    return project, path, first


@pytest.mark.temporal
async def test_history_replay_sends_each_event_once_and_again_starts_nothing(
    bridge_factory, temporal_client, temporal_address, tmp_path
):
    project, path, first = await fan_out_runs(bridge_factory, temporal_client, temporal_address, tmp_path)
    fixed = snapshot.load(path)
    query = runs_query(project)

    out = io.StringIO()
    dry = await replay_runs(fixed, query=query, number=7, dry_run=True, client=temporal_client, out=out)
    assert (dry.tally.read, dry.tally.total, dry.tally.duplicates, dry.tally.accepted) == (6, 3, 3, 3)
    assert "replay:7:h-0" in out.getvalue()
    await asyncio.sleep(2)
    assert await count_workflows(temporal_client, query) == 6

    done = await replay_runs(fixed, query=query, number=7, confirm=None, client=temporal_client)
    assert (done.tally.total, done.tally.accepted) == (3, 3) and done.ok
    ids = [f"replay:7:h-{i}" for i in range(3)]
    replayed = runs_of(project, "audit", "http:token-1", ids) | runs_of(project, "ship", "http:token-1", ids)
    await assert_runs(temporal_client, project, first | replayed)

    # The query now finds the replayed runs too: each is its original event (metadata.replay.of),
    # sent once again with the same number: the same ids, nothing new.
    again = await replay_runs(fixed, query=query, number=7, confirm=None, client=temporal_client)
    assert (again.tally.read, again.tally.total, again.tally.accepted) == (12, 3, 3)
    assert again.existing is not None and again.existing.duplicates == 3
    await assert_runs(temporal_client, project, first | replayed, settle=3)


@pytest.mark.temporal
async def test_history_replay_to_one_entry(bridge_factory, temporal_client, temporal_address, tmp_path):
    project, path, first = await fan_out_runs(bridge_factory, temporal_client, temporal_address, tmp_path)
    fixed = snapshot.load(path)
    query = runs_query(project)
    with pytest.raises(BridgeError, match="no workflow entry"):
        await replay_runs(fixed, query=query, to="nope", confirm=None, client=temporal_client)
    done = await replay_runs(fixed, query=query, to="ship", number=8, confirm=None, client=temporal_client)
    assert (done.tally.total, done.tally.accepted) == (3, 3)
    only = runs_of(project, "ship", "http:token-1", [f"replay:8:ship:h-{i}" for i in range(3)])
    await assert_runs(temporal_client, project, first | only, settle=3)
    # The same number to the other entry: other events (with one id, the dispatcher dropped them).
    await replay_runs(fixed, query=query, to="audit", number=8, confirm=None, client=temporal_client)
    audit = runs_of(project, "audit", "http:token-1", [f"replay:8:audit:h-{i}" for i in range(3)])
    await assert_runs(temporal_client, project, first | only | audit, settle=3)


@workflow.defn(name="ContinuesOnce", sandboxed=False)
class ContinuesOnce:
    @workflow.run
    async def run(self, arg: dict[str, Any]) -> str:
        if "event" in arg:
            workflow.continue_as_new({"carried": "state"})
        return "done"


async def test_a_run_that_continued_as_new_is_read_for_its_chains_first_argument(temporal_client: Client) -> None:
    """A query that lists only the last run of a chain (``ExecutionStatus="Running"``, say) still
    finds the event: the run was started with what the one before it passed on."""
    from bridge.runtime import replay_runs as module

    queue, wid = unique("chain"), unique("chain-run")
    arg = {"workflow_id": "w", "exec_id": "x", "input": {}, "trigger": {"n": 1}}
    arg["event"] = {"id": "e-1", "name": "a", "source": "http:ci", "time": "", "metadata": {}}
    async with Worker(temporal_client, task_queue=queue, workflows=[ContinuesOnce]):
        handle = await temporal_client.start_workflow("ContinuesOnce", arg, id=wid, task_queue=queue)
        assert await temporal_client.get_workflow_handle(wid).result() == "done"
    last = (await temporal_client.get_workflow_handle(wid).describe()).run_id
    assert last != handle.result_run_id
    read = await module.first_argument(temporal_client, wid, last)
    assert module.original_of(read) is not None and read["event"]["id"] == "e-1"
