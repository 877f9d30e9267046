"""Smoke tests for tests/services/: each provided server really speaks its protocol."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import TypeVar

import aio_pika
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client, WorkflowExecutionStatus

from tests import services

T = TypeVar("T")


def _require(provide: Callable[[], T]) -> T:
    """Skip (or fail, when SIGNAL_BRIDGE_REQUIRE_SERVICES=1) if a dedicated server cannot be started.

    The session-wide endpoints come from the conftest fixtures, which apply the same rule.
    """
    try:
        return provide()
    except services.ServiceUnavailable as exc:
        if os.environ.get("SIGNAL_BRIDGE_REQUIRE_SERVICES") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.mark.temporal
async def test_temporal_answers(temporal_address: str) -> None:
    client = await Client.connect(temporal_address)
    info = await client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace="default"))
    assert info.namespace_info.name == "default"


@pytest.mark.temporal
async def test_temporal_restart_keeps_address_and_state(tmp_path) -> None:
    """The tests' own Temporal (the project's embedded server) comes back on the same address with
    its runs after a stop, as the outage tests need."""
    server = await asyncio.to_thread(_require, lambda: services.LocalTemporal(tmp_path / "temporal").start())
    try:
        address = server.address
        client = await Client.connect(address)
        run_id = f"survives-restart-{uuid.uuid4().hex[:8]}"
        await client.start_workflow("Nobody", id=run_id, task_queue="no-worker")
        await asyncio.to_thread(server.stop)
        assert not server.running
        await asyncio.to_thread(server.start)
        assert server.address == address
        client = await Client.connect(address)
        described = await client.get_workflow_handle(run_id).describe()
        assert described.status == WorkflowExecutionStatus.RUNNING
    finally:
        await asyncio.to_thread(server.close)


def test_run_passes_endpoints_and_exit_status() -> None:
    """`python -m tests.services run -- CMD` (what `make bench` uses): endpoints already in the
    environment are handed on without starting anything, and CMD's status is the exit status."""
    env = {**os.environ, "AMQP_URL": "amqp://given/", "KAFKA_BOOTSTRAP_SERVERS": "given:9092"}
    script = "import os, sys; print(os.environ['AMQP_URL'], os.environ['KAFKA_BOOTSTRAP_SERVERS']); sys.exit(3)"
    done = subprocess.run(
        [sys.executable, "-m", "tests.services", "run", "--services", "kafka,amqp", "--", sys.executable, "-c", script],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert done.stdout.split() == ["amqp://given/", "given:9092"]


@pytest.mark.kafka
async def test_kafka_produce_and_consume(kafka_bootstrap: str) -> None:
    topic = f"services-smoke-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"hello", key=b"k")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, group_id=f"g-{topic}", auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=30)
        await consumer.commit()
    finally:
        await consumer.stop()
    assert (record.key, record.value) == (b"k", b"hello")


async def _publish(url: str, queue_name: str, body: bytes) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue_name, durable=True)
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await channel.default_exchange.publish(message, routing_key=queue_name)


async def _get(url: str, queue_name: str) -> bytes:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, durable=True)
        message = await queue.get(timeout=5, fail=True)
        assert message is not None
        await message.ack()
        return message.body


@pytest.mark.amqp
async def test_rabbitmq_publish_and_get(amqp_url: str) -> None:
    queue_name = f"services-smoke-{uuid.uuid4().hex[:8]}"
    await _publish(amqp_url, queue_name, b"hello")
    assert await _get(amqp_url, queue_name) == b"hello"


@pytest.mark.amqp
async def test_rabbitmq_restart_keeps_url_and_data() -> None:
    """A dedicated broker comes back on the same URL with its durable messages after a restart.

    start/restart block for seconds, so they run in a thread the way an outage test would run
    them while the code under test keeps using the event loop.
    """
    broker = await asyncio.to_thread(_require, lambda: services.LocalRabbitMQ().start())
    try:
        url = broker.url
        await _publish(url, "survives-restart", b"durable")
        await asyncio.to_thread(broker.restart)
        assert broker.url == url
        assert await _get(url, "survives-restart") == b"durable"
    finally:
        await asyncio.to_thread(broker.close)
