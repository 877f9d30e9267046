"""A topic created after the bridge started, against a real broker that does not create topics by
itself: the consumer is reported without partitions (and stays ready), the missing topic is logged
once over several metadata refreshes, and once the topic is created its records start their runs
without a restart."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from bridge.runtime.app import Bridge
from tests import services
from tests.helpers import TOKEN, assert_eventually, config, result_of, runner, unique
from tests.integration.test_kafka import envelope, kafka_child, produce
from tests.services import containers
from tests.services.kafka import probe

pytestmark = [pytest.mark.kafka, pytest.mark.temporal]

AUTO_CREATE = "auto.create.topics.enable"
PICKED_UP_WITHIN = 45.0  # a loose bound: the default refresh is 10 s, plus a rebalance


# --- a broker that does not create topics by itself -------------------------------------------


async def creates_topics(bootstrap: str) -> bool:
    """True when the broker creates a topic a client asks about (then no topic stays missing)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        broker = (await admin.describe_cluster())["brokers"][0]["node_id"]
        resource = ConfigResource(ConfigResourceType.BROKER, str(broker), {AUTO_CREATE: None})
        [answer] = await admin.describe_configs([resource])
    finally:
        await admin.close()
    [described] = answer.to_object()["resources"]
    values = {e["config_names"]: e["config_value"] for e in described["config_entries"]}
    return str(values.get(AUTO_CREATE, "true")).lower() == "true"


class LocalKafkaWithoutAutoCreate(services.LocalKafka):
    def _prepare(self) -> None:
        super()._prepare()
        text = self.config_path.read_text()
        assert f"{AUTO_CREATE}=true" in text, text
        self.config_path.write_text(text.replace(f"{AUTO_CREATE}=true", f"{AUTO_CREATE}=false"))


def container_without_auto_create() -> str:
    from testcontainers.kafka import KafkaContainer

    container = containers.start(KafkaContainer().with_kraft().with_env("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false"))
    bootstrap = str(container.get_bootstrap_server())
    containers.wait_probe("kafka container", lambda: probe(bootstrap), 90)
    return bootstrap


@pytest.fixture(scope="module")
async def strict_kafka(kafka_bootstrap: str) -> AsyncIterator[str]:
    """The suite's broker when it does not create topics by itself (the suite's own does), else
    one of this module's own: a container when Docker answers, else from the cached jars."""
    if not await creates_topics(kafka_bootstrap):
        yield kafka_bootstrap
        return
    local: services.LocalKafka | None = None
    try:
        if containers.docker_available():
            bootstrap = await asyncio.to_thread(container_without_auto_create)
        else:
            local = LocalKafkaWithoutAutoCreate()
            await asyncio.to_thread(local.start)
            bootstrap = local.bootstrap
    except services.ServiceUnavailable as exc:
        if os.environ.get("SIGNAL_BRIDGE_REQUIRE_SERVICES") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    assert not await creates_topics(bootstrap)
    yield bootstrap
    if local is not None:
        await asyncio.to_thread(local.close)


# --- helpers -----------------------------------------------------------------------------------


async def readyz(bridge: Bridge) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=5) as http:
        resp = await http.get(
            f"http://127.0.0.1:{bridge.http_port}/readyz", headers={"Authorization": f"Bearer {TOKEN}"}
        )
    return resp.status_code, resp.json()


async def create_topic(bootstrap: str, topic: str, partitions: int = 3) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


def lines(caplog: pytest.LogCaptureFixture, logger: str, level: int, text: str) -> list[str]:
    found = (r.getMessage() for r in caplog.records if r.name == logger and r.levelno == level)
    return [m for m in found if text in m]


# --- the test ----------------------------------------------------------------------------------


@pytest.mark.timeout(480)
async def test_a_topic_created_after_the_start_is_reported_missing_once_then_read_without_a_restart(
    bridge_factory, temporal_client, temporal_address, strict_kafka, caplog
):
    caplog.set_level(logging.INFO, logger="adapters.kafka")
    caplog.set_level(logging.DEBUG, logger="aiokafka.cluster")  # its refreshes, counted below
    topic = unique("late")
    project = unique("klate")
    cfg = config(
        project,
        temporal_address,
        [runner("late", "order.created")],
        kafka=[{"bootstrap_servers": strict_kafka, "topics": [topic]}],
    )
    bridge = await bridge_factory(cfg)
    check = f"kafka:{topic}"

    async def reported_without_partitions() -> bool:
        status, body = await readyz(bridge)
        [consumer] = body["kafka"]
        assert consumer["state"] == "no partitions assigned", consumer
        assert (consumer["check"], consumer["topics"]) == (check, [topic])
        assert (consumer["assigned_partitions"], consumer["missing_topics"]) == (0, [topic])
        assert status == 200 and body["status"] == "ready" and body["checks"][check] is True, body
        return True

    await assert_eventually(reported_without_partitions, timeout=60, interval=0.5, what="the missing topic reported")

    # Several metadata refreshes later, the missing topic is still said once, and the client's own
    # line at every refresh does not reach the log.
    mark = len(caplog.records)

    def refreshed() -> bool:
        n = sum(
            1
            for r in caplog.records[mark:]
            if r.name == "aiokafka.cluster" and str(r.msg).startswith("Updated cluster metadata")
        )
        assert n >= 2, f"{n} metadata refreshes since the topic was reported missing"
        return True

    await assert_eventually(refreshed, timeout=60, interval=0.5, what="two metadata refreshes")
    assert len(lines(caplog, "adapters.kafka", logging.WARNING, f"topic {topic} is not in the cluster")) == 1
    client_lines = [r for r in caplog.records if r.name.startswith("aiokafka") and r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in client_lines if topic in r.getMessage()] == []
    assert (await readyz(bridge))[1]["kafka"][0]["missing_topics"] == [topic]

    await create_topic(strict_kafka, topic)
    created = time.monotonic()
    [(partition, offset)] = await produce(strict_kafka, topic, [envelope("order.created", {"n": 7})])
    wid = kafka_child(project, "late", topic, partition, offset)
    result = await result_of(temporal_client, wid, timeout=PICKED_UP_WITHIN)
    picked_up = time.monotonic() - created
    assert result["tasks"]["render"] == "got 7"

    status, body = await readyz(bridge)
    [consumer] = body["kafka"]
    assert status == 200 and consumer["state"] == "consuming", consumer
    assert (consumer["assigned_partitions"], consumer["missing_topics"]) == (3, [])
    assert len(lines(caplog, "adapters.kafka", logging.INFO, f"topic {topic} now exists")) == 1
    assert len(lines(caplog, "adapters.kafka", logging.WARNING, f"topic {topic} is not in the cluster")) == 1
    print(f"\nthe topic created {picked_up:.1f}s before its first record's run was seen")
