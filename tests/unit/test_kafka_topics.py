"""The Kafka adapter's topics without a broker: the metadata refresh that picks up a topic created
after the start, the one log line per missing (then appearing) topic, what /readyz shows of each
consumer, and no log line above DEBUG per accepted record."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiokafka import TopicPartition
from litestar.testing import AsyncTestClient

from adapters import kafka
from adapters.http import create_app
from bridge.errors import ConfigError
from bridge.pipeline import Pipeline
from bridge.snapshot import Snapshot
from tests.fakes import FakeSink
from tests.helpers import assert_eventually
from tests.unit.http_support import AUTH, make_config
from tests.unit.test_kafka_parse import TP0, TP1, FakeConsumer, adapter_with, batch, good, kafka_config


class TopicsConsumer(FakeConsumer):
    """The fake consumer, plus the cluster metadata: the topics that exist and their partitions."""

    def __init__(self, partitions: set[TopicPartition], existing: dict[str, int] | None = None) -> None:
        super().__init__(partitions)
        self.existing = dict(existing or {})
        self.polls = 0

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        n = self.existing.get(topic)
        return None if n is None else set(range(n))

    async def getmany(self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> dict:
        self.polls += 1
        return await super().getmany(*tps, timeout_ms=timeout_ms, max_records=max_records)


class Client(TopicsConsumer):
    """What ``AIOKafkaConsumer(**kw)`` makes in these tests: no partitions, ``orders`` missing."""

    made: list[Client] = []

    def __init__(self, **kw: Any) -> None:
        super().__init__(set())
        self.kw = kw
        Client.made.append(self)

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def subscribe(self, topics: list[str], listener: Any) -> None: ...


@pytest.fixture
def fake_client(monkeypatch: pytest.MonkeyPatch) -> type[Client]:
    Client.made = []
    monkeypatch.setattr(kafka, "AIOKafkaConsumer", Client)
    return Client


def missing_lines(caplog: pytest.LogCaptureFixture, topic: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "adapters.kafka" and r.levelno == logging.WARNING and f"topic {topic} is not in" in r.getMessage()
    ]


def appeared_lines(caplog: pytest.LogCaptureFixture, topic: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "adapters.kafka" and r.levelno == logging.INFO and f"topic {topic} now exists" in r.getMessage()
    ]


# --- the metadata refresh ----------------------------------------------------------------------


async def test_the_consumer_refreshes_metadata_every_10s_by_default_and_as_configured(fake_client: type[Client]):
    for entry, ms in (({}, 10_000), ({"metadata_refresh_seconds": 3}, 3_000)):
        adapter, _ = adapter_with(FakeSink(), **entry)
        await adapter.start()
        await adapter.stop()
        assert fake_client.made[-1].kw["metadata_max_age_ms"] == ms


@pytest.mark.parametrize(("seconds", "ok"), [(0, False), (1, True), (300, True), (301, False)])
def test_metadata_refresh_seconds_is_bounded(seconds: int, ok: bool):
    if ok:
        assert kafka_config(metadata_refresh_seconds=seconds).kafka[0].metadata_refresh_seconds == seconds
    else:
        with pytest.raises(ConfigError, match="metadata_refresh_seconds"):
            kafka_config(metadata_refresh_seconds=seconds)


# --- missing topics: said once, and once when they appear --------------------------------------


async def test_a_missing_topic_is_warned_once_over_many_polls_and_its_arrival_logged_once(caplog):
    caplog.set_level(logging.DEBUG)
    adapter, _ = adapter_with(FakeSink(), topics=["orders", "refunds"])
    consumer = adapter.consumer = TopicsConsumer({TP0, TP1}, {"orders": 2})  # type: ignore[assignment]
    adapter._task = asyncio.create_task(adapter._run())
    try:
        await assert_eventually(lambda: consumer.polls >= 20, timeout=5, interval=0.005)
        assert not missing_lines(caplog, "refunds"), "nothing is known missing before the group assigns"
        adapter._on_assigned({TP0, TP1})
        start = consumer.polls
        await assert_eventually(lambda: consumer.polls >= start + 50, timeout=5, interval=0.005)
        assert len(missing_lines(caplog, "refunds")) == 1 and not missing_lines(caplog, "orders")
        assert adapter.readiness()["missing_topics"] == ["refunds"]

        consumer.existing["refunds"] = 3
        start = consumer.polls
        await assert_eventually(lambda: consumer.polls >= start + 50, timeout=5, interval=0.005)
        assert len(appeared_lines(caplog, "refunds")) == 1 and len(missing_lines(caplog, "refunds")) == 1
        assert adapter.readiness()["missing_topics"] == []

        del consumer.existing["refunds"]  # deleted again: said again, once
        start = consumer.polls
        await assert_eventually(lambda: consumer.polls >= start + 50, timeout=5, interval=0.005)
        assert len(missing_lines(caplog, "refunds")) == 2
    finally:
        adapter._stopping.set()
        await adapter._task


async def test_the_client_lines_at_every_refresh_are_dropped_for_the_adapters_topics(fake_client, caplog):
    caplog.set_level(logging.WARNING)
    cluster = logging.getLogger("aiokafka.cluster")
    assignor = logging.getLogger("aiokafka.coordinator.assignors.roundrobin")
    adapter, _ = adapter_with(FakeSink(), topics=["orders", "refunds"])
    await adapter.start()
    try:
        for _ in range(5):
            cluster.error("Topic %s not found in cluster metadata", "refunds")
            assignor.warning("No partition metadata for topic %s", "refunds")
        cluster.error("Topic %s not found in cluster metadata", "someone-elses")
        cluster.error("Unable to update metadata from %s", ["refunds"])
    finally:
        await adapter.stop()
    cluster.error("Topic %s not found in cluster metadata", "refunds")  # no adapter reads it any more
    cluster.error({"not": "a format string"})  # a message of any type passes
    assert [r.getMessage() for r in caplog.records if r.name.startswith("aiokafka")] == [
        "Topic someone-elses not found in cluster metadata",
        "Unable to update metadata from ['refunds']",
        "Topic refunds not found in cluster metadata",
        "{'not': 'a format string'}",
    ]


# --- readiness ---------------------------------------------------------------------------------


async def test_readiness_says_joining_then_no_partitions_with_the_missing_topic_then_consuming():
    adapter, _ = adapter_with(FakeSink(), topics=["orders", "refunds"])
    consumer = adapter.consumer = TopicsConsumer(set(), {"orders": 1})  # type: ignore[assignment]
    assert adapter.readiness()["state"] == "stopped"
    adapter._task = asyncio.create_task(adapter._run())
    try:
        assert adapter.readiness() == {
            "check": "kafka:orders,refunds",
            "group_id": "signal-bridge-my-shop",
            "topics": ["orders", "refunds"],
            "state": "joining",
            "assigned_partitions": 0,
            "missing_topics": [],
        }
        adapter._on_assigned(set())  # the other members of the group hold orders' one partition
        state = adapter.readiness()
        assert (state["state"], state["assigned_partitions"], state["missing_topics"]) == (
            "no partitions assigned",
            0,
            ["refunds"],
        )
        assert adapter.healthy(), "no partitions is reported, not a failure"

        consumer._assigned = {TP0, TP1}
        consumer.existing["refunds"] = 2
        adapter._on_assigned({TP0, TP1})
        assert adapter.readiness()["state"] == "consuming" and adapter.readiness()["assigned_partitions"] == 2
        adapter.settler.failures = 1  # Temporal refuses: the partitions are paused
        assert adapter.readiness()["state"] == "paused"
        adapter.settler.failures = 0
    finally:
        adapter._stopping.set()
        await adapter._task
    assert adapter.readiness()["state"] == "stopped"


async def test_readyz_lists_the_consumers_it_is_given_to_token_holders_and_stays_ready(fake_client):
    """The runtime passes its own consumers (bridge.runtime.app.Bridge.consumers); one without
    partitions is reported, and the bridge stays ready."""
    cfg = make_config()
    snap = Snapshot.compile(cfg)
    pipeline = Pipeline(snap.routes, FakeSink())
    entry = kafka_config(topics=["orders"]).kafka[0]
    adapter = kafka.build(entry, pipeline, cfg)

    async def ready() -> dict[str, bool]:
        return {"temporal": True, adapter.name: adapter.healthy()}

    await adapter.start()
    try:
        adapter._on_assigned(set())
        app = create_app(pipeline, snap, ready=ready, consumers=lambda: [adapter.readiness()])
        async with AsyncTestClient(app) as c:
            resp = await c.get("/readyz", headers=AUTH)
            bare = await c.get("/readyz")
        assert resp.status_code == bare.status_code == 200
        assert bare.json() == {"status": "ready"}
        assert resp.json()["kafka"] == [
            {
                "check": "kafka:orders",
                "group_id": "signal-bridge-shop",
                "topics": ["orders"],
                "state": "no partitions assigned",
                "assigned_partitions": 0,
                "missing_topics": ["orders"],
            }
        ]
    finally:
        await adapter.stop()
    async with AsyncTestClient(create_app(pipeline, snap, ready=ready, consumers=list)) as c:
        assert "kafka" not in (await c.get("/readyz", headers=AUTH)).json()


# --- the hot path ------------------------------------------------------------------------------


async def test_accepted_records_log_nothing_above_debug_and_one_debug_line_per_batch(caplog):
    caplog.set_level(logging.DEBUG)
    sink = FakeSink()
    adapter, consumer = adapter_with(sink)
    await adapter._handle(batch([good(i) for i in range(30)], [good(i) for i in range(30, 50)]), adapter._generation)
    assert len(sink.held) == 50 and consumer.commits == [{TP0: 40, TP1: 30}]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == []
    assert len([r for r in caplog.records if r.name == "adapters.kafka"]) == 1
